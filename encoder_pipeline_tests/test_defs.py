"""The code location loads, and its graph has the shape the README promises."""

import subprocess
import sys
from pathlib import Path

import dagster as dg

from encoder_pipeline.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


def test_graph_shape_and_lineage():
    graph = defs.resolve_asset_graph()
    parents = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
               for key in graph.get_all_asset_keys()}
    assert parents["clean_corpus"] == {"corpus_source"}
    assert parents["eval_set"] == {"clean_corpus"}
    assert parents["encoder_hard_negatives"] == {"mined_negatives"}
    assert parents["index_sweep"] == {"encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"}
    assert parents["embedding_index"] == {"index_sweep", "clean_corpus"}  # an index refresh reads it
    assert parents["eval_report"] == {"eval_set", "embedding_index", "index_sweep"}
    assert parents["serving_index"] == {"eval_report"}
    assert parents["domain_health"] == set()  # it reads run statuses, not artifacts
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if key.to_user_string() != "domain_health":  # the one asset over every domain
            assert node.partitions_def is not None and node.partitions_def.name == "domain"
        assert node.group_name != "default" and node.description and node.kinds


def test_job_sensors_schedule_resources():
    assert defs.resolve_job_def("train_encoder_job").partitions_def.name == "domain"
    assert defs.resolve_job_def("index_refresh_job").partitions_def.name == "domain"
    assert "domain_health" not in {k.to_user_string() for k in
                                    defs.resolve_job_def("train_encoder_job").asset_layer.executable_asset_keys}
    assert {s.name for s in defs.sensors} == {"domain_specs_sensor", "corpus_drift_sensor",
                                              "automation_condition_sensor", "domain_health_after_success",
                                              "domain_health_after_failure"}
    assert {s.name for s in defs.schedules} == {"weekly_retrain_schedule"}
    assert set(defs.resources) == {"artifacts", "settings", "llm", "published"}


def test_every_upstream_artifact_comes_in_as_a_typed_handle():
    """Each edge of the graph (but the external corpus) is an `ins=` input loaded by the
    `published` input manager: the asset receives its upstream artifacts, it does not look them up."""
    graph = defs.resolve_asset_graph()
    for assets_def in (a for a in defs.assets if isinstance(a, dg.AssetsDefinition)):
        key = assets_def.key
        inputs = {assets_def.keys_by_input_name[name].to_user_string(): spec.input_manager_key
                  for name, spec in assets_def.node_def.input_dict.items()}
        received = {asset: manager for asset, manager in inputs.items() if asset != "corpus_source"}
        parents = {p.to_user_string() for p in graph.get(key).parent_keys} - {"corpus_source"}
        assert set(received) == parents, key
        assert set(received.values()) <= {"published"}, key


def test_dagster_definitions_validate():
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w",
                             "workspace.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "DAGSTER_HOME": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_the_readme_lists_every_check():
    """The README's check table names every asset check with the asset it guards and whether it
    blocks: a new check, or one made blocking, must be documented."""
    table = (ROOT / "README.md").read_text().split("| check | asset | severity | blocking |", 1)[1]
    lines = table.splitlines()[2:]
    rows = [line.split("|")[1:5] for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("|"))]]
    documented = {(check.strip("` "), asset.strip("` "), blocking.strip() == "yes")
                  for names, assets, _, blocking in rows
                  for check in names.split(",") for asset in assets.split(",")}
    declared = {(spec.name, spec.asset_key.to_user_string(), spec.blocking)
                for assets_def in defs.assets if isinstance(assets_def, dg.AssetsDefinition)
                for spec in assets_def.check_specs}
    assert documented == declared


def test_the_shipped_instance_shows_no_onboarding_dialog(tiny_dagster_home):
    """The project's dagster.yaml turns off Dagster's "Join the community" dialog (`nux`), which
    would cover a new user's first page of the UI."""
    with dg.DagsterInstance.from_config(str(tiny_dagster_home)) as instance:
        assert instance.nux_enabled is False and instance.get_settings("telemetry") == {"enabled": False}
