"""Retrieval metrics (pytrec_eval), the BM25 baseline (bm25s) and timed single-query latency.

Runs are `{query_id: {doc_id: score}}` at the source-document level: a chunked document scores as
its best chunk, so judgments on documents need no remapping.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import bm25s
import faiss
import numpy as np
import pytrec_eval
import torch

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

MEASURES = {"ndcg_cut_10", "recall_100", "recall_10"}


def to_parent_run(hits: Sequence[Sequence[tuple[int, float]]], query_ids: Sequence[str],
                  parents: Sequence[str]) -> Run:
    """Row hits -> a document-level run; a document's score is its best chunk's."""
    run: Run = {}
    for qid, row in zip(query_ids, hits, strict=True):
        docs: dict[str, float] = {}
        for position, score in row:
            parent = parents[position]
            if parent not in docs or score > docs[parent]:
                docs[parent] = score
        run[qid] = docs
    return run


def evaluate(run: Run, qrels: Qrels) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean and per-query nDCG@10, MRR@10, Recall@10 and Recall@100 (pytrec_eval)."""
    qrels = {q: rels for q, rels in qrels.items() if q in run}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    rows = {
        q: {
            "ndcg@10": v["ndcg_cut_10"],
            "mrr@10": mrr[q]["recip_rank"],
            "recall@10": v["recall_10"],
            "recall@100": v["recall_100"],
        }
        for q, v in per_query.items()
    }
    means = {m: float(np.mean([r[m] for r in rows.values()])) for m in
             ("ndcg@10", "mrr@10", "recall@10", "recall@100")}
    return means, rows


def dense_run(query_vectors: np.ndarray, corpus_vectors: np.ndarray, query_ids: Sequence[str],
              parents: Sequence[str], k: int = 100) -> Run:
    """Exact inner-product search (FAISS flat) over normalized vectors, as a document-level run."""
    from encoder_pipeline.lib.index import build_index

    flat = build_index(corpus_vectors, "flat")
    scores, rows = flat.search(np.ascontiguousarray(query_vectors), min(k, flat.ntotal))
    hits = [list(zip(r.tolist(), s.tolist(), strict=True)) for r, s in zip(rows, scores, strict=True)]
    return to_parent_run(hits, query_ids, parents)


def bm25_retriever(corpus_texts: Sequence[str]) -> bm25s.BM25:
    """bm25s over `corpus_texts` (English stopwords removed), queried by position."""
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(corpus_texts), stopwords="en", show_progress=False),
                    show_progress=False)
    return retriever


class BM25Index:
    """bm25s over a corpus's units, indexed once and queried batch after batch (a judging session
    asks for a few queries at a time; re-indexing the corpus each time would dominate)."""

    def __init__(self, corpus_texts: Sequence[str], parents: Sequence[str]):
        self.parents, self.size = list(parents), len(corpus_texts)
        self.retriever = bm25_retriever(corpus_texts)

    def run(self, queries: dict[str, str], k: int = 100) -> Run:
        qids = list(queries)
        rows, scores = self.retriever.retrieve(
            bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False),
            k=min(k, self.size), show_progress=False, n_threads=1,
        )
        hits = [[(int(r), float(s)) for r, s in zip(rr, ss, strict=True) if s > 0]
                for rr, ss in zip(rows, scores, strict=True)]
        return to_parent_run(hits, qids, self.parents)


def bm25_run(corpus_texts: Sequence[str], parents: Sequence[str], queries: dict[str, str],
             k: int = 100) -> Run:
    return BM25Index(corpus_texts, parents).run(queries, k)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Serve as a one-worker-per-core server does: torch and FAISS on a single thread.

    Two intra-op threads on a 2-core box turn a 7 ms query into hundreds of ms as soon as anything
    else runs (measured here), so multi-threaded single-query timings say more about the neighbours
    than about the index.
    """
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def latency_ms(answer: Callable[[str], object], queries: Sequence[str], warmup: int = 5
               ) -> dict[str, float]:
    """p50/p95/mean wall time of answering one query at a time (encode + search), warm, no cache,
    on one thread."""
    times = []
    with one_thread():
        for query in queries[:warmup]:
            answer(query)
        for query in queries:
            started = time.perf_counter()
            answer(query)
            times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
            "mean_ms": float(np.mean(times)), "queries": len(times)}


def usd_per_1k_queries(mean_ms: float, usd_per_hour: float) -> float:
    """Serving cost: machine time per query at a given hourly price, one query at a time."""
    return mean_ms / 1000 / 3600 * usd_per_hour * 1000
