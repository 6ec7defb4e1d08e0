"""Structural (query, positive) pairs, the held-out eval split, and the consistency filter.

Columns out of `extract_pairs`: `query`, `positive` (the text the encoder sees), `doc_id`.
Sources: E5 / CCPairs (structural pairs + a consistency filter), the seeds' docstring -> code and
heading -> section pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sentence_transformers import util

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.leakage import EvalTexts, normalize

MIN_QUERY_WORDS = 3


def _salted(key: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def structural_query(units: pd.DataFrame, extractor: str) -> pd.Series:
    """The query a unit's structure gives: its docstring summary, or its title/heading."""
    query = units["anchor"] if extractor == "docstring" else units["title"]
    return query.fillna("").str.strip()


def positive_texts(units: pd.DataFrame, extractor: str) -> list[str]:
    """For title -> body pairs the title is the query, so the positive is the body alone."""
    if extractor == "title":
        return list(units["text"])
    return document_texts(units["title"], units["text"])


def has_structural_query(units: pd.DataFrame, extractor: str) -> pd.Series:
    return structural_query(units, extractor).str.split().str.len().fillna(0) >= MIN_QUERY_WORDS


@dataclass
class EvalSplit:
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    eval_doc_ids: set[str]  # parent ids: held out of every training row
    human_judged: bool


MAX_HELD_OUT_FRACTION = 0.3  # of the distinct structural queries: the rest must stay to train on


def held_out_split(units: pd.DataFrame, extractor: str, num_queries: int, seed: int,
                   max_fraction: float = MAX_HELD_OUT_FRACTION) -> EvalSplit:
    """An eval split from structure on a held-out slice of documents (never from synthetic queries).

    A query is a distinct structural text (docstring summary, heading); every document carrying it
    is relevant, so the sibling paragraphs under one heading are judged positives together, never
    negatives of each other. Whole source documents are held out (all their chunks), queries chosen
    by a salted hash so the split is stable as the corpus grows. At most `max_fraction` of the
    distinct queries are held out, so a small corpus keeps most of its structure for training.
    """
    candidates = units[has_structural_query(units, extractor)].drop_duplicates("parent_id")
    texts = structural_query(candidates, extractor)
    # Queries that normalize to the same text ("Close the connection" / "close the connection.") are
    # one query: all their documents are relevant and held out together (lib.leakage's definition).
    keys = texts.map(normalize).to_numpy()
    parents_by_query = candidates.groupby(keys, sort=False)["parent_id"].agg(list)
    shown = texts.groupby(keys, sort=False).first()
    wanted = min(num_queries, max(1, int(len(parents_by_query) * max_fraction)))
    chosen = sorted(parents_by_query.index, key=lambda q: _salted(q, seed))[:wanted]
    queries, qrels, held = {}, {}, set()
    for key in chosen:
        qid = f"q-{_salted(key, seed)[:12]}"
        queries[qid] = shown[key]
        qrels[qid] = {parent: 1 for parent in parents_by_query[key]}
        held.update(parents_by_query[key])
    return EvalSplit(queries, qrels, held, human_judged=False)


def eval_texts(split: EvalSplit, units: pd.DataFrame) -> EvalTexts:
    """What the leakage filter keeps out of training: the eval queries, every form of every eval
    unit (title + text as the encoder sees it, the text alone as a title -> body positive), and the
    ids of the eval documents and of their units."""
    held = units[units["parent_id"].isin(split.eval_doc_ids)]
    documents = [*document_texts(held["title"], held["text"]), *held["text"]]
    return EvalTexts.of(split.queries.values(), documents, {*split.eval_doc_ids, *held["doc_id"]})


def sample_judged(queries: dict[str, str], qrels: dict[str, dict[str, int]], size: int, seed: int
                  ) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """A stable sample of `size` judged queries (0: all), for small-scale runs."""
    if not size or size >= len(queries):
        return queries, qrels
    chosen = sorted(queries, key=lambda q: _salted(q, seed))[:size]
    return {q: queries[q] for q in chosen}, {q: qrels[q] for q in chosen}


def judged_split(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> EvalSplit:
    judged_docs = {doc for rels in qrels.values() for doc in rels}
    return EvalSplit(queries, qrels, judged_docs, human_judged=True)


def extract_pairs(units: pd.DataFrame, extractor: str, exclude_parents: set[str]) -> pd.DataFrame:
    """Every structural pair from documents outside `exclude_parents` (the eval documents)."""
    usable = units[has_structural_query(units, extractor) & ~units["parent_id"].isin(exclude_parents)]
    return pd.DataFrame({
        "query": structural_query(usable, extractor).to_numpy(),
        "positive": positive_texts(usable, extractor),
        "doc_id": usable["doc_id"].to_numpy(),
    })


def top_k_ids(query_embeddings: np.ndarray, corpus_embeddings: np.ndarray, corpus_ids: list[str],
              top_k: int) -> list[list[tuple[str, float]]]:
    """Exact cosine top-k (embeddings are normalized), chunked by sentence-transformers."""
    hits = util.semantic_search(torch.from_numpy(query_embeddings), torch.from_numpy(corpus_embeddings),
                                top_k=min(top_k, len(corpus_ids)), score_function=util.dot_score)
    return [[(corpus_ids[h["corpus_id"]], float(h["score"])) for h in row] for row in hits]


def rank_of_positive(query_embeddings: np.ndarray, positive_ids: list[str],
                     corpus_embeddings: np.ndarray, corpus_ids: list[str], top_k: int) -> np.ndarray:
    """1-based rank of each query's positive within the top-k, 0 where it is not in the top-k."""
    ranks = np.zeros(len(positive_ids), dtype=int)
    for i, (hits, positive) in enumerate(
        zip(top_k_ids(query_embeddings, corpus_embeddings, corpus_ids, top_k), positive_ids, strict=True)
    ):
        ids = [doc_id for doc_id, _ in hits]
        ranks[i] = ids.index(positive) + 1 if positive in ids else 0
    return ranks


def split_dev(pairs: pd.DataFrame, fraction: float, max_size: int, seed: int
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Carve a dev slice from the training pairs (by document) for checkpoint and config choices."""
    size = min(max_size, int(len(pairs) * fraction))
    order = sorted(pairs["doc_id"].unique(), key=lambda d: _salted(d, seed + 7))
    dev_docs = set(order[:size])
    dev = pairs["doc_id"].isin(dev_docs)
    return pairs[~dev].reset_index(drop=True), pairs[dev].reset_index(drop=True)
