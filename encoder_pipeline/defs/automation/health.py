"""domain_health: every domain partition's state at a glance (lib/health.py), refreshed after every
run by two run-status sensors (success, failure), and by `encoder-pipeline materialize` after its
in-process run (which no daemon watches)."""

import dagster as dg

from encoder_pipeline.defs.shared import md_table
from encoder_pipeline.defs.training.assets import RUNGS
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.health import domain_health as health_of
from encoder_pipeline.lib.health import health_table, state_counts
from encoder_pipeline.lib.layout import (
    CLEAN_CORPUS,
    EMBEDDING_INDEX,
    EVAL_REPORT,
    EVAL_SET,
    HEURISTIC_PAIRS,
    INDEX_SWEEP,
    MINED_NEGATIVES,
    SERVING_INDEX,
    SYNTHETIC_QUERIES,
    read_report,
)
from encoder_pipeline.lib.search import NothingServed, served_index
from encoder_pipeline.resources import ArtifactStoreResource

GROUP = "automation"
# Through the report: what a healthy domain has built (serving_index waits on the promotion gate).
REQUIRED_STAGES = [CLEAN_CORPUS, EVAL_SET, HEURISTIC_PAIRS, SYNTHETIC_QUERIES, MINED_NEGATIVES, *RUNGS,
                   INDEX_SWEEP, EMBEDDING_INDEX, EVAL_REPORT]
STAGES = [*REQUIRED_STAGES, SERVING_INDEX]
PARTITION_TAGS = {"dagster/partition", "dagster/asset_partition_range_start"}  # a run of domain partitions


def _verdict(store: ArtifactStore, domain: str) -> str:
    try:
        return read_report(store, domain)["verdict"]
    except MissingArtifact:
        return ""


def _served(store: ArtifactStore, domain: str) -> str:
    try:
        served = served_index(domain, store)
    except NothingServed:
        return "nothing"
    choice = served.choice
    return f"{served.version} ({choice.get('rung')}, {choice.get('precision')}@{choice.get('dims')})"


@dg.asset(
    group_name=GROUP,
    kinds={"dagster"},
    owners=["team:retrieval"],
    description=(
        "Every domain at a glance: healthy, failed (at which stage), running, partly built or never built, "
        "from the latest status of each stage's partition, with the report's verdict and what `search` "
        "serves. Dagster's graph marks an asset failed when any one domain failed; this table tells the "
        "domains apart. Refreshed after every training or refresh run."
    ),
)
def domain_health(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource) -> dg.MaterializeResult:
    instance, store = context.instance, artifacts.store()
    domains = sorted(instance.get_dynamic_partitions(domain_partitions.name))
    statuses = {stage: (instance.get_status_by_partition(dg.AssetKey(stage), domains, domain_partitions)
                        or {}) if domains else {} for stage in STAGES}
    rows = [health_of(domain, {stage: getattr(statuses[stage].get(domain), "value", None) for stage in STAGES},
                      REQUIRED_STAGES, _verdict(store, domain), _served(store, domain))
            for domain in domains]
    counts = state_counts(rows)
    context.log.info(", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no domains")
    return dg.MaterializeResult(metadata={
        "domains": md_table(health_table(rows)),
        **{f"domains_{state.replace(' ', '_')}": dg.MetadataValue.int(n) for state, n in counts.items()},
    })


domain_health_job = dg.define_asset_job(
    "domain_health_job", selection=[domain_health],
    description="Refresh domain_health: every domain partition's state at a glance.")


def _refresh_after(status: dg.DagsterRunStatus) -> dg.RunStatusSensorDefinition:
    # Every job of the location (the UI's Materialize button launches Dagster's implicit asset jobs,
    # not train_encoder_job), but only runs of domain partitions: domain_health's own runs have none.
    @dg.run_status_sensor(name=f"domain_health_after_{status.value.lower()}", run_status=status,
                          request_job=domain_health_job, default_status=dg.DefaultSensorStatus.RUNNING,
                          minimum_interval_seconds=15)  # cheap: reads one run's tags
    def refresh(context: dg.RunStatusSensorContext) -> dg.RunRequest | dg.SkipReason:
        run = context.dagster_run
        if not PARTITION_TAGS & set(run.tags):
            return dg.SkipReason(f"run {run.run_id} materialized no domain partition")
        return dg.RunRequest(run_key=f"after:{run.run_id}")

    return refresh


health_sensors = [_refresh_after(dg.DagsterRunStatus.SUCCESS), _refresh_after(dg.DagsterRunStatus.FAILURE)]
