"""The whole asset graph materialized in-process for a tiny `code` partition, real components."""

import json

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline.defs.training.assets import dev_set
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.index import EncoderMismatch, load_index
from encoder_pipeline.lib.layout import read_corpus_units, read_eval_split
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets

ALL_ASSETS = {
    "clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives",
    "encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives", "index_sweep",
    "embedding_index", "eval_report", "serving_index",
}
FIGURES = ("ladder.png", "sweep.png", "latency.png")


def test_every_asset_materializes_with_lineage(tiny_code_run):
    """Every asset, serving_index only when safe_to_promote passed (at tiny scale the candidate may
    be refused legitimately): then eval_report's step fails on its blocking check and nothing else."""
    result, store = tiny_code_run
    [promotion] = [c for c in result.get_asset_check_evaluations() if c.check_name == "safe_to_promote"]
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == (ALL_ASSETS if promotion.passed else ALL_ASSETS - {"serving_index"})
    assert [e.step_key for e in result.get_step_failure_events()] == ([] if promotion.passed
                                                                      else ["eval_report"])
    assert result.success is promotion.passed
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
    assert not set(pairs["doc_id"]) & set(split["held_out_doc_ids"])
    assert not set(pairs["query"]) & {*split["eval"]["queries"].values(), *split["dev"]["queries"].values()}


def test_dev_slice_scores_against_its_positives_and_neighbouring_training_units(tiny_code_run):
    _, store = tiny_code_run
    split = read_eval_split(store, "code")
    units = read_corpus_units(store, "code")
    parent_of = dict(zip(units["doc_id"], units["parent_id"], strict=True))
    dev = dev_set(store, "code", seed=0, distractors=5)
    assert dev.queries == split.dev.queries and split.dev.evidence in ("structural", "synthetic")
    positives = {parent_of[d] for rels in dev.relevant.values() for d in rels}
    assert positives == split.dev.doc_ids
    assert len(dev.corpus) == sum(len(rels) for rels in dev.relevant.values()) + 5
    distractors = set(dev.corpus) - {d for rels in dev.relevant.values() for d in rels}
    assert len(distractors) == 5 and not {parent_of[d] for d in distractors} & split.held_out_doc_ids
    assert dev_set(store, "code", seed=0, distractors=5).corpus == dev.corpus  # seeded


def test_synthetic_queries_are_real_generations(tiny_code_run):
    result, _ = tiny_code_run
    event = next(e for e in result.get_asset_materialization_events()
                 if e.asset_key.to_user_string() == "synthetic_queries")
    metadata = event.materialization.metadata
    assert metadata["queries_completions"].value > 0
    assert metadata["completion_tokens"].value > 0
    assert metadata["llm"].value.startswith("local:")


def test_report_is_written_and_complete(tiny_code_run):
    result, store = tiny_code_run
    report_dir = store.latest("code", "eval_report")
    report = json.loads((report_dir / "report.json").read_text())
    # the ladder on the training sample, what users get on the whole corpus (the sample is smaller)
    haystacks = {name: metrics["haystack"] for name, metrics in report["systems"].items()}
    assert haystacks == {"bm25": "sample", "off_the_shelf": "sample", "encoder_heuristic": "sample",
                         "encoder_synthetic": "sample", "encoder_hard_negatives": "sample",
                         "bm25@corpus": "corpus", "off_the_shelf@corpus": "corpus",
                         "served_index": "corpus", "hybrid_bm25_served": "corpus"}
    assert report["haystacks"]["sample"]["units"] < report["haystacks"]["corpus"]["units"]
    assert report["before"]["ndcg@10"] == report["systems"]["off_the_shelf@corpus"]["ndcg@10"]
    for metrics in report["systems"].values():
        assert 0.0 <= metrics["ndcg@10"] <= 1.0 and 0.0 <= metrics["recall@100"] <= 1.0
    assert report["after"]["p95_ms"] > 0 and report["after"]["index_mb"] > 0
    assert report["human_judged"] is False
    assert report["verdict"]
    assert report["build_costs"]["training_seconds"] > 0 and report["build_costs"]["llm_tokens"] > 0
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()
              if c.asset_key.to_user_string() == "eval_report"}
    assert set(checks) == {"ndcg_at_10_target", "p95_latency_target", "index_size_target",
                           "cost_target", "beats_off_the_shelf", "safe_to_promote"}
    assert all(c.severity == dg.AssetCheckSeverity.WARN for name, c in checks.items()
               if name != "safe_to_promote")
    assert checks["safe_to_promote"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["safe_to_promote"].passed == report["promotion"]["safe"]
    assert (report_dir / "report.md").read_text().startswith("# code")


def test_report_ladder_has_paired_tests(tiny_code_run):
    _, store = tiny_code_run
    report = json.loads((store.latest("code", "eval_report") / "report.json").read_text())
    ladder = report["ladder"]
    assert list(ladder) == ["off_the_shelf", "encoder_heuristic", "encoder_synthetic",
                            "encoder_hard_negatives"]
    for rung in ("encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"):
        assert 0.0 < ladder[rung]["p_vs_below"] <= 1.0 and 0.0 < ladder[rung]["p_vs_off_the_shelf"] <= 1.0
    assert ladder["encoder_synthetic"]["below"] == "encoder_heuristic"
    worse = [r for r in ladder if ladder[r]["diff_vs_below"] is not None and ladder[r]["diff_vs_below"] < 0]
    assert len(report["regressions"]) == len(worse)
    markdown = (store.latest("code", "eval_report") / "report.md").read_text()
    assert "p vs below" in markdown and "## Targets" in markdown and "## Migration" in markdown
    assert "## What users get (the whole corpus:" in markdown and "## Ladder (the training sample:" in markdown


def test_report_hybrid_sweep_and_migration(tiny_code_run):
    _, store = tiny_code_run
    report = json.loads((store.latest("code", "eval_report") / "report.json").read_text())
    assert report["hybrid"]["runs"] == ["bm25@corpus", "served_index"]
    assert 0.0 <= report["hybrid"]["ndcg@10"] <= 1.0
    migration = report["migration"]
    assert migration["old"].startswith("off-the-shelf")  # nothing was served before this run
    assert 0.0 <= migration["top10_overlap"] <= 1.0 and 0.0 <= migration["top1_agreement"] <= 1.0
    assert migration["queries"] == report["eval_queries"]
    assert report["sweep"]["points"] and report["sweep"]["chosen"] in report["sweep"]["points"]
    assert len(report["latency_ms_per_query"]) == report["latency_queries"]
    assert set(report["targets_pass_fail"]) == {"nDCG@10", "p95 latency ms", "index MB", "$/1k queries"}


def test_report_figures_are_written_and_embedded(tiny_code_run):
    from PIL import Image

    result, store = tiny_code_run
    report_dir = store.latest("code", "eval_report")
    for name in FIGURES:
        image = Image.open(report_dir / name)
        image.verify()
        assert image.format == "PNG"
        assert f"]({name})" in (report_dir / "report.md").read_text()
    event = next(e for e in result.get_asset_materialization_events()
                 if e.asset_key.to_user_string() == "eval_report")
    markdown = event.materialization.metadata["report"].value
    assert markdown.count("](data:image/png;base64,") == len(FIGURES)


def test_serving_index_publishes_the_promoted_candidate(tiny_code_served):
    """Promoted by the run when its report said safe, else by `promote --force`, which says so."""
    store = tiny_code_served.store
    report = json.loads((store.latest("code", "eval_report") / "report.json").read_text())
    assert report["promotion"]["safe"] is not tiny_code_served.forced
    served = store.latest("code", "serving_index")
    candidate = store.latest("code", "embedding_index")
    choice = json.loads((served / "choice.json").read_text())
    assert choice == json.loads((candidate / "choice.json").read_text())
    assert load_index(served, choice["revision"]).index.ntotal > 0
    promotion = json.loads((served / "promotion.json").read_text())
    assert promotion["verdict"] == report["verdict"] and promotion["reason"] == report["promotion"]["reason"]
    assert promotion["forced"] is tiny_code_served.forced
    assert promotion["embedding_index_version"] == candidate.name and promotion["previous"] is None
    metadata = tiny_code_served.metadata
    assert metadata["promoted_revision"].value == choice["revision"]
    assert metadata["previous_revision"].value == "none"
    assert metadata["forced"].value is tiny_code_served.forced
    assert metadata["reason"].value == report["promotion"]["reason"]


def test_index_refuses_another_encoder(tiny_code_run):
    _, store = tiny_code_run
    index_dir = store.latest("code", "embedding_index")
    choice = json.loads((index_dir / "choice.json").read_text())
    assert load_index(index_dir, choice["revision"]).index.ntotal > 0
    with pytest.raises(EncoderMismatch):
        load_index(index_dir, "some-other-encoder")


def test_a_second_promotion_compares_with_what_is_served(tiny_code_served):
    """Last in this module: re-runs the report and the promotion on the same artifacts, so the
    report now measures against the served index (the same candidate: it scores the same) and
    serving_index records its predecessor. A candidate refused the first time is refused again, by
    the off-the-shelf model alone, and stays served only as the forced promotion it was."""
    store = tiny_code_served.store
    first = store.latest("code", "serving_index")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    again = dg.materialize(graph_assets(), selection=["eval_report", "serving_index"],
                           instance=instance, partition_key="code", raise_on_error=False,
                           resources={
        PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(store.root)),
        "settings": PipelineSettings(profile="tiny"),
        "llm": LLMResource(),
    })
    report = json.loads((store.latest("code", "eval_report") / "report.json").read_text())
    assert report["currently_served"]["remeasured"] and "currently_served" in report["systems"]
    assert report["systems"]["currently_served"] == report["systems"]["served_index"]
    assert report["migration"]["old"].startswith("currently served")
    assert report["migration"]["top10_overlap"] == 1.0  # the same encoder and index as the candidate
    assert report["promotion"]["safe"] is not tiny_code_served.forced
    assert again.success is report["promotion"]["safe"]
    second = store.latest("code", "serving_index")
    if tiny_code_served.forced:
        assert "currently served" not in report["promotion"]["reason"]
        assert second == first  # skipped: a refused candidate is only ever served by --force
        return
    assert second != first and first.exists()
    promotion = json.loads((second / "promotion.json").read_text())
    assert promotion["previous"]["version"] == first.name and promotion["forced"] is False
