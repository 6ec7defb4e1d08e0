"""lib/layout.py, the artifacts' contract: one typed handle per asset, on one published version."""

import json

import pandas as pd
import pytest

from encoder_pipeline.lib.artifacts import (
    ArtifactStore,
    Manifest,
    MissingArtifact,
    start_reading,
    versions_read,
)
from encoder_pipeline.lib.layout import (
    CORPUS_FILE,
    EVAL_FILE,
    TRAINING_FILE,
    CorpusArtifact,
    RungArtifact,
    StaleArtifact,
    handle,
    latest,
)

DOMAIN = "demo"


def _publish(store: ArtifactStore, asset: str, version: str, files: dict) -> None:
    with store.publish(Manifest(DOMAIN, asset, version, 0, {}, corpus_fingerprint=f"fp-{version}")) as staging:
        for name, write in files.items():
            write(staging / name)


def _corpus(in_sample: list[bool]):
    units = pd.DataFrame({"doc_id": [f"d{i}" for i in range(len(in_sample))], "in_sample": in_sample})
    return lambda path: units.to_parquet(path, index=False)


def test_a_handle_reads_its_own_version_and_latest_records_what_was_read(tmp_path):
    store = ArtifactStore(tmp_path)
    _publish(store, "clean_corpus", "v1", {CORPUS_FILE: _corpus([True, False])})
    _publish(store, "clean_corpus", "v2", {CORPUS_FILE: _corpus([True, True, False])})
    start_reading()
    corpus = latest(store, DOMAIN, "clean_corpus")
    assert isinstance(corpus, CorpusArtifact) and corpus.version == "v2"
    assert len(corpus.units()) == 3 and list(corpus.sample()["doc_id"]) == ["d0", "d1"]
    assert corpus.fingerprint == "fp-v2"
    assert versions_read() == {(DOMAIN, "clean_corpus"): "v2"}  # what publish records as upstream
    older = handle(store, DOMAIN, "clean_corpus", "v1")  # a version a manifest names: not the latest
    assert len(older.units()) == 2 and older.fingerprint == "fp-v1"


def test_rungs_have_their_model_and_training_result(tmp_path):
    store = ArtifactStore(tmp_path)
    _publish(store, "encoder_synthetic", "r1",
             {TRAINING_FILE: lambda path: path.write_text(json.dumps({"dev_ndcg_at_10": 0.5}))})
    rung = latest(store, DOMAIN, "encoder_synthetic")
    assert isinstance(rung, RungArtifact) and rung.training() == {"dev_ndcg_at_10": 0.5}
    assert rung.model_path == tmp_path / DOMAIN / "encoder_synthetic" / "r1" / "model"


def test_missing_and_stale_artifacts_say_what_to_materialize(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(MissingArtifact, match="'eval_set' has not been materialized for domain 'demo'"):
        latest(store, DOMAIN, "eval_set")
    _publish(store, "eval_set", "old", {EVAL_FILE: lambda path: path.write_text(json.dumps({"queries": {}}))})
    with pytest.raises(StaleArtifact, match="materialize eval_set again"):
        latest(store, DOMAIN, "eval_set").split()
