"""domain_health: each domain's state from its stages' partition statuses (lib/health.py), and the
asset over a real Dagster instance where one domain is built, one failed in a real run, one is
partly built and one was never built. The CLI's refresh after a failed run is in
test_reliability_input.py::test_cli_materialize_exits_1_when_the_run_fails."""

import dagster as dg
import pytest

from encoder_pipeline.defs.automation.health import REQUIRED_STAGES, STAGES, domain_health, health_sensors
from encoder_pipeline.defs.corpus.assets import clean_corpus
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import health
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)

DONE = {stage: "MATERIALIZED" for stage in REQUIRED_STAGES}


@pytest.mark.parametrize(("statuses", "state", "detail"), [
    (DONE, health.HEALTHY, ""),
    ({**DONE, "serving_index": "MATERIALIZED"}, health.HEALTHY, ""),
    ({**DONE, "eval_set": "FAILED", "index_sweep": "FAILED"}, health.FAILED, "failed at eval_set"),
    ({**DONE, "serving_index": "FAILED"}, health.FAILED, "failed at serving_index"),  # beyond the required
    ({**DONE, "encoder_synthetic": "IN_PROGRESS"}, health.RUNNING, "running encoder_synthetic"),
    ({"clean_corpus": "MATERIALIZED", "eval_set": "MATERIALIZED"}, health.PARTLY_BUILT,
     f"missing heuristic_pairs and {len(REQUIRED_STAGES) - 3} more"),
    ({**DONE, "eval_report": None}, health.PARTLY_BUILT, "missing eval_report"),
    ({}, health.NEVER_BUILT, ""),
    ({"serving_index": None}, health.NEVER_BUILT, ""),
])
def test_a_domain_state_from_its_stages(statuses, state, detail):
    row = health.domain_health("d", statuses, REQUIRED_STAGES)
    assert (row.state, row.detail) == (state, detail)
    assert row.stages == len(REQUIRED_STAGES)
    assert row.built == sum(statuses.get(stage) == "MATERIALIZED" for stage in REQUIRED_STAGES)


def test_the_table_puts_the_worst_first_and_counts_every_state():
    rows = [health.domain_health(name, statuses, REQUIRED_STAGES) for name, statuses in
            [("alpha", DONE), ("beta", {}), ("gamma", {"clean_corpus": "FAILED"}), ("delta", DONE)]]
    table = health.health_table(rows)
    assert list(table["domain"]) == ["gamma", "alpha", "delta", "beta"]
    assert list(table["state"]) == ["failed", "healthy", "healthy", "never built"]
    assert health.state_counts(rows) == {"failed": 1, "running": 0, "partly built": 0, "healthy": 2,
                                         "never built": 1}


def test_domain_health_tells_the_domains_apart_on_a_real_instance(tmp_path, monkeypatch):
    """Dagster's graph shows clean_corpus red for all four domains here; domain_health one line each."""
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "no_specs"))  # `broken` has no spec
    resources = {PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
                 "settings": PipelineSettings(profile="tiny"), "llm": LLMResource()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(domain_partitions.name, ["built", "broken", "half", "fresh"])
        for stage in REQUIRED_STAGES:  # `built` was materialized elsewhere (reported, as the CLI's runs are)
            instance.report_runless_asset_event(dg.AssetMaterialization(stage, partition="built"))
        failed = dg.materialize([clean_corpus], instance=instance, partition_key="broken",
                                resources=resources, raise_on_error=False)
        assert not failed.success  # a real run's failure, recorded per partition by Dagster
        instance.report_runless_asset_event(dg.AssetMaterialization("clean_corpus", partition="half"))
        result = dg.materialize([domain_health], instance=instance, resources=resources)
        # after the failed run, the failure sensor asks for a refresh; after domain_health's own run, not
        refreshed = [_sensed(instance, "domain_health_after_failure", failed),
                     _sensed(instance, "domain_health_after_success", result)]
    assert isinstance(refreshed[0], dg.RunRequest) and refreshed[0].run_key == f"after:{failed.run_id}"
    assert isinstance(refreshed[1], dg.SkipReason)
    metadata = result.asset_materializations_for_node("domain_health")[0].metadata
    lines = metadata["domains"].value.splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [row[:4] for row in cells] == [
        ["broken", "failed", f"0 of {len(REQUIRED_STAGES)}", "failed at clean_corpus"],
        ["half", "partly built", f"1 of {len(REQUIRED_STAGES)}", f"missing eval_set and {len(REQUIRED_STAGES) - 2} more"],
        ["built", "healthy", f"{len(REQUIRED_STAGES)} of {len(REQUIRED_STAGES)}", ""],
        ["fresh", "never built", f"0 of {len(REQUIRED_STAGES)}", ""],
    ]
    assert [row[5] for row in cells] == ["nothing"] * 4  # nothing promoted anywhere
    assert {key: metadata[f"domains_{key}"].value for key in ("failed", "running", "healthy", "never_built",
                                                              "partly_built")} == {
        "failed": 1, "running": 0, "healthy": 1, "never_built": 1, "partly_built": 1}
    assert STAGES[-1] == "serving_index" and "serving_index" not in REQUIRED_STAGES



def _sensed(instance, name, result):
    """What the run-status sensor `name` answers to the run behind `result`."""
    sensor = next(s for s in health_sensors if s.name == name)
    run = instance.get_run_by_id(result.run_id)
    event = next(e for e in result.all_events if e.event_type_value in ("PIPELINE_FAILURE", "PIPELINE_SUCCESS",
                                                                         "RUN_FAILURE", "RUN_SUCCESS"))
    return sensor(dg.build_run_status_sensor_context(name, event, instance, run))
