"""Assets invoked directly (`dg.build_asset_context`), one stage at a time, with the upstream handles
a test hands them: an asset uses what it receives through `ins=` and records those versions, whatever
is latest. On a copy of the session's tiny `code` build."""

import json
import shutil

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline.defs.corpus.assets import eval_set
from encoder_pipeline.defs.evaluation.assets import ReportConfig, eval_report
from encoder_pipeline.defs.indexing.assets import embedding_index
from encoder_pipeline.defs.serving.assets import PromotionConfig, serving_index
from encoder_pipeline.defs.training.assets import ladder_encoders
from encoder_pipeline.defs.training_data.assets import heuristic_pairs
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.layout import (
    CHOICE_FILE,
    CORPUS_FILE,
    EVAL_FILE,
    PAIRS_FILE,
    PROMOTION_FILE,
    REPORT_FILE,
    TRAINING_FILE,
    handle,
    latest,
)
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

D = "code"


@pytest.fixture
def store(tiny_code_run, tmp_path) -> ArtifactStore:
    """The tiny build's artifacts, copied (a direct invocation publishes into the copy)."""
    _, built = tiny_code_run
    shutil.copytree(built.root / D, tmp_path / D, ignore=shutil.ignore_patterns("_checkpoints", "_llm_cache"))
    return ArtifactStore(tmp_path)


def _context() -> dg.AssetExecutionContext:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [D])
    return dg.build_asset_context(partition_key=D, instance=instance)  # a context manager too


def _invoke(asset: dg.AssetsDefinition, store: ArtifactStore, **inputs) -> dg.MaterializeResult:
    with _context() as context:
        return asset(context, artifacts=ArtifactStoreResource(root=str(store.root)),
                     settings=PipelineSettings(profile="tiny"), **inputs)


def _republish(store: ArtifactStore, asset: str, file: str) -> None:
    """A newer version of `asset` with the same content, published meanwhile: what an asset handed
    the older one must not read."""
    older = latest(store, D, asset)
    manifest = older.manifest()
    with store.publish(Manifest(D, asset, "newer", 0, {}, manifest.get("corpus_fingerprint", ""),
                                manifest.get("upstream", {}))) as staging:
        shutil.copytree(older.path, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("manifest.json"))
    newer = latest(store, D, asset)
    assert newer.version != older.version and (newer.path / file).exists()


def test_corpus_eval_set_splits_the_corpus_it_is_handed(store, stand_in_llm):
    corpus = latest(store, D, "clean_corpus")
    _republish(store, "clean_corpus", CORPUS_FILE)
    with _context() as context:
        result = eval_set(context, corpus=corpus, artifacts=ArtifactStoreResource(root=str(store.root)),
                          settings=PipelineSettings(profile="tiny"), llm=stand_in_llm)
    split = latest(store, D, "eval_set")
    assert split.manifest()["upstream"] == {"clean_corpus": corpus.version}
    assert (split.path / EVAL_FILE).exists()
    held_out = set(split.split().held_out_doc_ids)
    assert held_out and held_out <= set(corpus.sample()["parent_id"])
    assert result.metadata["queries"].value == len(split.split().queries) > 0


def test_training_a_rung_trains_on_the_pairs_it_is_handed(store):
    rung = next(asset for asset in ladder_encoders if asset.key.to_user_string() == "encoder_heuristic")
    pairs = latest(store, D, "heuristic_pairs")
    _republish(store, "heuristic_pairs", PAIRS_FILE)
    result = _invoke(rung, store, pairs=pairs)
    trained = latest(store, D, "encoder_heuristic")
    assert trained.manifest()["upstream"]["heuristic_pairs"] == pairs.version
    training = json.loads((trained.path / TRAINING_FILE).read_text())
    assert training["training_rows"] == len(pairs.rows()) == result.metadata["training_rows"].value
    assert training["merge"]["rule"] and 0.0 <= training["fine_tuned_weight"] <= 1.0
    assert (trained.path / "model" / "config.json").exists()


def test_the_sweep_picks_its_rung_from_the_dev_scores_training_recorded(store):
    """The index sweep's choice of rung reads the per-query dev scores each rung's training recorded
    (no rung's model is loaded) when its dev slice is the one they trained on; another dev slice
    (here: fewer distractors) loads and scores each rung's model."""
    from encoder_pipeline.defs.indexing.assets import rung_to_serve
    from encoder_pipeline.defs.training.assets import RUNGS, dev_set
    from encoder_pipeline.lib.encoders import load_encoder

    distractors = PipelineSettings(profile="tiny").sizes().dev_distractors
    rungs = {rung: latest(store, D, rung) for rung in RUNGS}
    loaded = []

    def load(path: str):
        loaded.append(path)
        return load_encoder(path)

    _, scores, _ = rung_to_serve(rungs, dev_set(store, D, 0, distractors), load, seed=0)
    assert loaded == []
    assert scores == {rung: pytest.approx(rungs[rung].training()["dev_ndcg_at_10"], abs=1e-4) for rung in RUNGS}
    rung_to_serve(rungs, dev_set(store, D, 0, distractors // 2), load, seed=0)
    assert loaded == [str(rungs[rung].model_path) for rung in RUNGS]


def test_evaluation_eval_report_judges_the_candidate_it_is_handed(store):
    evaluation, candidate, swept = (latest(store, D, asset) for asset in ("eval_set", "embedding_index",
                                                                          "index_sweep"))
    _republish(store, "embedding_index", CHOICE_FILE)
    with _context() as context:
        eval_report(context, config=ReportConfig(randomization_iterations=200), evaluation=evaluation,
                    candidate=candidate, swept=swept, artifacts=ArtifactStoreResource(root=str(store.root)),
                    settings=PipelineSettings(profile="tiny"))
    judged = latest(store, D, "eval_report")
    upstream = judged.manifest()["upstream"]
    assert upstream["embedding_index"] == candidate.version and upstream["eval_set"] == evaluation.version
    report = json.loads((judged.path / REPORT_FILE).read_text())
    assert report["after"]["ndcg@10"] >= 0 and report["verdict"]


def test_training_data_heuristic_pairs_reads_the_corpus_and_split_it_is_handed(store):
    corpus, split = latest(store, D, "clean_corpus"), latest(store, D, "eval_set")
    _republish(store, "eval_set", EVAL_FILE)  # must not be what these pairs were built against
    result = _invoke(heuristic_pairs, store, corpus=corpus, split=split)
    pairs = latest(store, D, "heuristic_pairs")
    assert pairs.manifest()["upstream"] == {"clean_corpus": corpus.version, "eval_set": split.version}
    rows = pd.read_parquet(pairs.path / PAIRS_FILE)
    held_out = split.split().held_out_doc_ids
    units = corpus.units().set_index("doc_id")["parent_id"]
    assert len(rows) and not set(units[rows["doc_id"]]) & set(held_out)
    assert result.metadata["pairs_training"].value == len(rows)
    assert all(check.passed for check in result.check_results)  # no_eval_leakage, on what it published


def test_indexing_embedding_index_builds_what_the_sweep_it_is_handed_chose(store):
    sweep, cleaned = latest(store, D, "index_sweep"), latest(store, D, "clean_corpus")
    result = _invoke(embedding_index, store, sweep=sweep, cleaned=cleaned)
    built = latest(store, D, "embedding_index")
    chosen, choice = sweep.sweep()["chosen"], built.choice()
    assert (choice["dims"], choice["precision"]) == (chosen["dims"], chosen["precision"])
    assert choice["vectors"] == len(cleaned.units()) == result.metadata["vectors"].value
    upstream = built.manifest()["upstream"]
    assert upstream["index_sweep"] == sweep.version and upstream["clean_corpus"] == cleaned.version


def test_serving_serving_index_promotes_what_the_report_it_is_handed_judged(store):
    judged = latest(store, D, "eval_report")
    candidate = judged.manifest()["upstream"]["embedding_index"]
    with _context() as context:
        # forced when the tiny report refused its candidate (as tiny_code_served does): either way promoted
        serving_index(context, config=PromotionConfig(force=True), judged=judged,
                      artifacts=ArtifactStoreResource(root=str(store.root)), settings=PipelineSettings(profile="tiny"))
    served = latest(store, D, "serving_index")
    promotion = json.loads((served.path / PROMOTION_FILE).read_text())
    assert promotion["eval_report_version"] == judged.version
    assert promotion["embedding_index_version"] == candidate
    assert promotion["forced"] is (not judged.report()["promotion"]["safe"])
    assert served.manifest()["upstream"] == {"embedding_index": candidate, "eval_report": judged.version}
    assert handle(store, D, "embedding_index", candidate).choice()["revision"] == served.choice()["revision"]
