"""Domain automation: spec files become partitions; corpus changes and a weekly timer request retrains.

- `domain_specs_sensor` (on by default): a new spec file under data/domains/ becomes a new `domain`
  partition without restarting `dagster dev`.
- `corpus_change_sensor` and `weekly_retrain_schedule` (off by default): turn them on in the UI.
"""

import json

import dagster as dg

from encoder_pipeline.domains import SpecError, domain_names, domain_partitions, load_domain
from encoder_pipeline.lib.sources import fingerprint_files

train_encoder_job = dg.define_asset_job(
    "train_encoder_job",
    selection=dg.AssetSelection.all(),
    partitions_def=domain_partitions,
    description="Materialize the whole graph (corpus -> report) for one domain partition.",
)


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def domain_specs_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Register a `domain` partition for every spec file in data/domains/."""
    existing = set(context.instance.get_dynamic_partitions(domain_partitions.name))
    new = [name for name in domain_names() if name not in existing]
    if not new:
        return dg.SkipReason("every spec file already has a partition")
    return dg.SensorResult(
        dynamic_partitions_requests=[domain_partitions.build_add_request(new)],
    )


def corpus_fingerprint(domain: str) -> str | None:
    """The source files' fingerprint, or None when the spec is invalid or the corpus is absent."""
    try:
        spec = load_domain(domain)
    except SpecError:
        return None
    location = spec.corpus_location() if spec.corpus.format != "python_stdlib" else ""
    if spec.corpus.format == "beir":
        location = location.rstrip("/") + "/corpus.jsonl"
    fingerprint = fingerprint_files(spec.corpus.format, location)
    return fingerprint


@dg.sensor(job=train_encoder_job, minimum_interval_seconds=300,
           default_status=dg.DefaultSensorStatus.STOPPED)
def corpus_change_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Request a retrain of a domain partition when its corpus source files change.

    The cursor maps each domain to the fingerprint last seen; the first sighting only records it.
    The run key (domain + fingerprint) makes a given change trigger at most one run.
    """
    seen = json.loads(context.cursor) if context.cursor else {}
    partitions = set(context.instance.get_dynamic_partitions(domain_partitions.name))
    requests, current = [], dict(seen)
    for domain in sorted(partitions):
        fingerprint = corpus_fingerprint(domain)
        if fingerprint is None:
            continue
        current[domain] = fingerprint
        if domain in seen and seen[domain] != fingerprint:
            requests.append(dg.RunRequest(
                run_key=f"{domain}:{fingerprint}", partition_key=domain,
                tags={"encoder_pipeline/reason": f"corpus changed ({seen[domain]} -> {fingerprint})"},
            ))
    if not requests and current == seen:
        return dg.SkipReason("no corpus changed")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True))


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
