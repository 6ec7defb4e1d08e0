"""Domain automation: spec files become partitions; corpus drift and a weekly timer request retrains.

- `domain_specs_sensor` (on by default): a new spec file under data/domains/ becomes a new `domain`
  partition without restarting `dagster dev`.
- `corpus_drift_sensor` (off by default): observes each domain's `corpus_source` and, under the
  spec's `[drift]` thresholds, requests a retrain (`train_encoder_job`) or an incremental index
  refresh (`index_refresh_job`).
- `weekly_retrain_schedule` (off by default): the fallback, every domain on Mondays.
"""

import json
import time

import dagster as dg

from encoder_pipeline.defs.corpus import drift
from encoder_pipeline.domains import (
    DomainSpec,
    SpecError,
    domain_partitions,
    load_domain,
    partition_sync,
)
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.drift import corpus_snapshot, decide
from encoder_pipeline.lib.drift import fingerprint as drift_fingerprint
from encoder_pipeline.lib.sources import CorpusError
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

REASON_TAG = "encoder_pipeline/reason"
PARTITION_TAG = "dagster/partition"
IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]

train_encoder_job = dg.define_asset_job(
    "train_encoder_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("automation"),  # domain_health is not per domain
    partitions_def=domain_partitions,
    description="Materialize the whole graph (corpus -> report) for one domain partition.",
)

index_refresh_job = dg.define_asset_job(
    "index_refresh_job",
    selection=dg.AssetSelection.assets("clean_corpus", "embedding_index", "eval_report", "serving_index"),
    partitions_def=domain_partitions,
    description="The corpus changed but the encoder stays: re-clean the corpus, update the served "
    "configuration's index incrementally (new and changed units embedded, removed ones dropped), "
    "re-run the report, and promote only if its blocking checks pass.",
)


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def domain_specs_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Keep the `domain` partitions matching data/domains/: a partition for every valid spec file,
    none for an invalid one (logged), and none left for a spec file that is gone (its artifacts
    stay on disk until `gc`)."""
    sync = partition_sync(context.instance.get_dynamic_partitions(domain_partitions.name))
    for name, error in sync.invalid.items():
        context.log.warning(f"spec '{name}' is invalid and not registered: {error}")
    if not sync.add and not sync.remove:
        invalid = f"; invalid, not registered: {', '.join(sync.invalid)}" if sync.invalid else ""
        return dg.SkipReason(f"the partitions match the spec files{invalid}")
    return dg.SensorResult(dynamic_partitions_requests=[
        *([domain_partitions.build_add_request(sync.add)] if sync.add else []),
        *([domain_partitions.build_delete_request(sync.remove)] if sync.remove else []),
    ])


def _in_flight(instance: dg.DagsterInstance, domain: str) -> str | None:
    """The id of a queued or running run of this domain partition, if any."""
    records = instance.get_run_records(
        dg.RunsFilter(tags={PARTITION_TAG: domain}, statuses=IN_FLIGHT), limit=1)
    return records[0].dagster_run.run_id if records else None


def _last_retrain(instance: dg.DagsterInstance, domain: str, requested_at: float) -> float:
    """When this domain last retrained: the newest train_encoder_job run (the sensor's, the
    schedule's or a manual one) or the sensor's own last request, whichever is later."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=train_encoder_job.name, tags={PARTITION_TAG: domain}), limit=1)
    return max([requested_at, *(r.create_timestamp.timestamp() for r in records)])


def _request(domain: str, job: str, key: str, reason: str) -> dg.RunRequest:
    return dg.RunRequest(run_key=key, job_name=job, partition_key=domain, tags={REASON_TAG: reason})


def _domain_tick(context: dg.SensorEvaluationContext, store: ArtifactStore, settings: PipelineSettings,
                 spec: DomainSpec, seen: dict, now: float
                 ) -> tuple[dict, dg.AssetObservation | None, dg.RunRequest | None, str]:
    """One domain: (its new cursor entry, an observation, a run request, what happened)."""
    domain = spec.name
    files, against = drift.files_fingerprint(spec), drift.versions(store, domain)
    event = None
    if files is None or files != seen.get("files") or against != seen.get("against"):
        raw = drift.read_source(spec)
        current = corpus_snapshot(raw)
        fingerprint = drift_fingerprint(current)
        if fingerprint != seen.get("fingerprint") or against != seen.get("against"):
            measured = drift.measure(spec, store, settings, raw, current)
            decision = decide(measured, drift.thresholds(spec))
            event = drift.observation(domain, measured, decision.action, decision.reason)
            seen = {"fingerprint": fingerprint, "decision": [decision.action, decision.reason],
                    "refreshable": measured.fingerprint != (measured.indexed_fingerprint
                                                            or measured.training_fingerprint),
                    "requested": [], "retrain_requested_at": seen.get("retrain_requested_at", 0.0)}
        seen = {**seen, "files": files, "against": against}
    action, reason = seen.get("decision", ["none", ""])
    keys = {a: f"{domain}:{a}:{seen.get('fingerprint')}:{against['trained']}" for a in ("retrain", "refresh")}
    if action == "none":
        return seen, event, None, f"{domain}: {reason or 'nothing to do'}"
    if keys[action] in seen["requested"]:
        return seen, event, None, f"{domain}: {action} already requested"
    running = _in_flight(context.instance, domain)
    if running:  # never flood: one run per domain at a time
        return seen, event, None, f"{domain}: {action} waits for run {running}"
    if action == "retrain":
        wait_s = (spec.drift.min_hours_between_retrains * 3600
                  - (now - _last_retrain(context.instance, domain, seen["retrain_requested_at"])))
        if wait_s <= 0:
            seen = {**seen, "requested": [*seen["requested"], keys["retrain"]], "retrain_requested_at": now}
            return seen, event, _request(domain, train_encoder_job.name, keys["retrain"], reason), reason
        if not seen["refreshable"] or keys["refresh"] in seen["requested"]:
            return seen, event, None, f"{domain}: retrain deferred {wait_s / 3600:.1f} h (minimum interval)"
        # Keep search current while the retrain waits out the minimum interval.
        reason = (f"{reason}; retrain deferred {wait_s / 3600:.1f} h (minimum interval), "
                  "refreshing the index meanwhile")
    seen = {**seen, "requested": [*seen["requested"], keys["refresh"]]}
    return seen, event, _request(domain, index_refresh_job.name, keys["refresh"], reason), reason


@dg.sensor(jobs=[train_encoder_job, index_refresh_job], minimum_interval_seconds=600,
           default_status=dg.DefaultSensorStatus.STOPPED)
def corpus_drift_sensor(context: dg.SensorEvaluationContext, artifacts: ArtifactStoreResource,
                        settings: PipelineSettings) -> dg.SensorResult | dg.SkipReason:
    """Observe each domain's corpus and request a retrain when its drift since training crosses the
    spec's `[drift]` thresholds, else an incremental index refresh when it changed at all.

    Each observation (on `corpus_source`) is recorded when the corpus or what it is measured against
    changes. Never floods: nothing is requested for a domain while a run of its partition is queued
    or running, a retrain waits `min_hours_between_retrains` after the last one (refreshing the
    index meanwhile), and a run key per (action, corpus fingerprint, training version) requests each
    at most once. The cursor keeps, per domain, the files and content fingerprints seen, the last
    decision, the requests made and when the last retrain was requested.
    """
    state = json.loads(context.cursor) if context.cursor else {}
    store, now = artifacts.store(), time.time()
    requests, events, notes = [], [], []
    for domain in sorted(context.instance.get_dynamic_partitions(domain_partitions.name)):
        try:
            spec = load_domain(domain)
            state[domain], event, request, note = _domain_tick(context, store, settings, spec,
                                                               state.get(domain, {}), now)
        except (SpecError, CorpusError) as error:  # an invalid spec or an absent corpus: not observable
            notes.append(f"{domain}: {error}")
            continue
        events += [event] if event else []
        requests += [request] if request else []
        notes.append(note)
    cursor = json.dumps(state, sort_keys=True)
    if not requests and not events and cursor == (context.cursor or "{}"):
        return dg.SkipReason("; ".join(notes) or "no domain partitions")
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=cursor,
                           skip_reason=None if requests else "; ".join(notes))


@dg.schedule(job=train_encoder_job, cron_schedule="0 3 * * 1",
             default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_retrain_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    """Fallback retrain of every domain partition, Mondays 03:00."""
    week = context.scheduled_execution_time.strftime("%G-W%V")
    return [
        dg.RunRequest(run_key=f"{domain}:{week}", partition_key=domain,
                      tags={"encoder_pipeline/reason": f"weekly retrain {week}"})
        for domain in sorted(context.instance.get_dynamic_partitions(domain_partitions.name))
    ]
