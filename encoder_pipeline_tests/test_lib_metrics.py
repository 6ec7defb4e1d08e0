"""Metrics through pytrec_eval, document-level aggregation of chunks, BM25 and the index."""

import numpy as np
import pytest

from encoder_pipeline.lib.index import EncoderMismatch, build_index, load_index, save_index, served_bytes
from encoder_pipeline.lib.metrics import bm25_run, evaluate, latency_ms, to_parent_run, usd_per_1k_queries


def test_metrics_on_a_hand_made_run():
    qrels = {"q1": {"a": 1}, "q2": {"z": 1}}
    run = {"q1": {"x": 0.9, "a": 0.8, "y": 0.1}, "q2": {"x": 0.5}}
    means, per_query = evaluate(run, qrels)
    assert per_query["q1"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q1"]["ndcg@10"] == pytest.approx(1 / np.log2(3))
    assert per_query["q2"]["recall@100"] == 0.0
    assert means["mrr@10"] == pytest.approx(0.25)


def test_mrr_is_cut_at_ten():
    run = {"q": {f"d{i}": 1.0 - i / 100 for i in range(20)}}
    means, _ = evaluate(run, {"q": {"d15": 1}})
    assert means["mrr@10"] == 0.0 and means["recall@100"] == 1.0


def test_chunks_score_as_their_best_chunk():
    parents = ["doc1", "doc1", "doc2"]
    run = to_parent_run([[(1, 0.9), (0, 0.2), (2, 0.5)]], ["q"], parents)
    assert run == {"q": {"doc1": 0.9, "doc2": 0.5}}


def test_bm25_finds_the_document_on_real_text(stdlib_units):
    texts = list(stdlib_units["title"] + "\n" + stdlib_units["text"])
    target = stdlib_units.iloc[7]
    run = bm25_run(texts, list(stdlib_units["parent_id"]), {"q": target["title"]})
    assert max(run["q"], key=run["q"].get) == target["parent_id"]


def test_latency_and_cost():
    stats = latency_ms(lambda q: sum(range(1000)), [f"q{i}" for i in range(50)])
    assert 0 < stats["p50_ms"] <= stats["p95_ms"] and stats["queries"] == 50
    assert usd_per_1k_queries(mean_ms=36.0, usd_per_hour=0.10) == pytest.approx(0.001)


def test_int8_index_round_trip_and_encoder_binding(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(vectors, "sq8")
    size = save_index(tmp_path, index, [f"d{i}" for i in range(500)], [f"d{i}" for i in range(500)],
                      [""] * 500, "rev-a", "sq8", 0.01)
    assert size == served_bytes(tmp_path) and size < vectors.nbytes / 2
    loaded = load_index(tmp_path, "rev-a")
    hits = loaded.search(vectors[:20], 1)
    assert [h[0][0] for h in hits] == list(range(20))
    with pytest.raises(EncoderMismatch, match="rev-a"):
        load_index(tmp_path, "rev-b")
