"""The code location loads, and its graph has the shape the README promises."""

import subprocess
import sys
from pathlib import Path

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
    assert parents["eval_report"] == {"embedding_index", "index_sweep"}
    assert parents["serving_index"] == {"eval_report"}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.partitions_def is not None and node.partitions_def.name == "domain"
        assert node.group_name != "default" and node.description and node.kinds


def test_job_sensors_schedule_resources():
    assert defs.resolve_job_def("train_encoder_job").partitions_def.name == "domain"
    assert defs.resolve_job_def("index_refresh_job").partitions_def.name == "domain"
    assert {s.name for s in defs.sensors} == {"domain_specs_sensor", "corpus_drift_sensor",
                                              "automation_condition_sensor"}
    assert {s.name for s in defs.schedules} == {"weekly_retrain_schedule"}
    assert set(defs.resources) == {"artifacts", "settings", "llm"}


def test_dagster_definitions_validate():
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", "-w",
                             "workspace.yaml"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "DAGSTER_HOME": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All code locations passed validation" in result.stderr + result.stdout
