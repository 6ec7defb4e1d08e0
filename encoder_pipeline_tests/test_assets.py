"""The whole asset graph materialized in-process for a tiny `code` partition, real components."""

import json

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.index import EncoderMismatch, load_index
from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings

ALL_ASSETS = {
    "clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives",
    "encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives", "embedding_index",
    "eval_report",
}


@pytest.fixture(scope="module")
def tiny_code_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    result = dg.materialize(
        assets,
        instance=instance,
        partition_key="code",
        resources={
            "artifacts": ArtifactStoreResource(root=str(root)),
            "settings": PipelineSettings(profile="tiny"),
            "llm": LLMResource(),
        },
    )
    return result, ArtifactStore(root)


def test_every_asset_materializes_with_lineage(tiny_code_run):
    result, store = tiny_code_run
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == ALL_ASSETS
    manifest = store.manifest("code", "eval_report")
    assert set(manifest["upstream"]) >= {"clean_corpus", "eval_set", "embedding_index"}
    assert manifest["corpus_fingerprint"] == store.manifest("code", "clean_corpus")["corpus_fingerprint"]
    assert "torch" in manifest["libraries"] and manifest["config_hash"]


def test_no_training_row_touches_the_eval_set(tiny_code_run):
    result, store = tiny_code_run
    leakage = [c for c in result.get_asset_check_evaluations() if c.check_name == "no_eval_leakage"]
    assert len(leakage) == 3 and all(c.passed for c in leakage)
    split = json.loads((store.latest("code", "eval_set") / "eval_set.json").read_text())
    pairs = pd.read_parquet(store.latest("code", "heuristic_pairs") / "pairs.parquet")
    assert not set(pairs["doc_id"]) & set(split["eval_doc_ids"])
    assert not set(pairs["query"]) & set(split["queries"].values())


def test_synthetic_queries_are_real_generations(tiny_code_run):
    result, store = tiny_code_run
    event = next(e for e in result.get_asset_materialization_events()
                 if e.asset_key.to_user_string() == "synthetic_queries")
    metadata = event.materialization.metadata
    assert metadata["queries_completions"].value > 0
    assert metadata["completion_tokens"].value > 0
    assert metadata["llm"].value.startswith("local:")


def test_report_is_written_and_complete(tiny_code_run):
    result, store = tiny_code_run
    report = json.loads((store.latest("code", "eval_report") / "report.json").read_text())
    assert set(report["systems"]) == {"bm25", "off_the_shelf", "encoder_heuristic",
                                      "encoder_synthetic", "encoder_hard_negatives", "served_index"}
    for metrics in report["systems"].values():
        assert 0.0 <= metrics["ndcg@10"] <= 1.0 and 0.0 <= metrics["recall@100"] <= 1.0
    assert report["after"]["p95_ms"] > 0 and report["after"]["index_mb"] > 0
    assert report["human_judged"] is False
    assert report["verdict"]
    assert report["build_costs"]["training_seconds"] > 0 and report["build_costs"]["llm_tokens"] > 0
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()
              if c.asset_key.to_user_string() == "eval_report"}
    assert set(checks) == {"ndcg_at_10_target", "p95_latency_target", "index_size_target",
                           "cost_target", "beats_off_the_shelf"}
    assert all(c.severity == dg.AssetCheckSeverity.WARN for c in checks.values())
    assert (store.latest("code", "eval_report") / "report.md").read_text().startswith("# code")


def test_index_refuses_another_encoder(tiny_code_run):
    _, store = tiny_code_run
    index_dir = store.latest("code", "embedding_index")
    choice = json.loads((index_dir / "choice.json").read_text())
    assert load_index(index_dir, choice["revision"]).index.ntotal > 0
    with pytest.raises(EncoderMismatch):
        load_index(index_dir, "some-other-encoder")
