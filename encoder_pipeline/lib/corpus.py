"""Corpus cleaning: normalize, chunk into retrievable units, filter, exact and near-duplicate removal.

Columns in: `doc_id, title, text, anchor` (see `sources.py`). Columns out: `doc_id` (unit id, stable),
`parent_id` (the source document: judgments and metrics are at this level, best chunk wins),
`title`, `text`, `anchor`.

Per-row work runs as Daft expressions and UDFs; the MinHash step follows Daft's dedupe recipe
(normalize -> minhash -> LSH bands -> connected components), see `near_duplicate_groups`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import daft
import numpy as np
import pandas as pd
from daft import col
from daft.functions import minhash, normalize

from encoder_pipeline.lib.sources import CorpusError


@dataclass(frozen=True)
class CleaningConfig:
    max_words: int = 0
    min_words: int = 3
    normalize_whitespace: bool = True
    boilerplate_patterns: tuple[str, ...] = ()
    num_hashes: int = 64
    ngram_size: int = 5
    bands: int = 16
    jaccard_threshold: float = 0.8
    max_documents: int = 0
    seed: int = 0


@dataclass
class CleaningReport:
    counts: dict[str, int] = field(default_factory=dict)
    word_percentiles: dict[str, float] = field(default_factory=dict)
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)


@daft.func
def _normalize_unicode(text: str) -> str:
    return unicodedata.normalize("NFC", text or "")


@daft.func
def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def chunk_words(text: str, max_words: int) -> list[str]:
    """Split on whitespace into pieces of at most max_words words (line layout kept inside a piece)."""
    if max_words <= 0:
        return [text]
    tokens = re.findall(r"\S+\s*", text)
    if len(tokens) <= max_words:
        return [text]
    return ["".join(tokens[i : i + max_words]).strip() for i in range(0, len(tokens), max_words)]


def sample_ids(doc_ids: Iterable[str], limit: int, protected: set[str], seed: int) -> set[str]:
    """A deterministic sample of at most `limit` ids (by salted hash), always keeping protected ids."""
    ids = list(doc_ids)
    if limit <= 0 or len(ids) <= limit:
        return set(ids)
    keyed = sorted(ids, key=lambda d: hashlib.sha1(f"{seed}:{d}".encode()).hexdigest())
    chosen = {d for d in ids if d in protected}
    for doc_id in keyed:
        if len(chosen) >= max(limit, len(protected)):
            break
        chosen.add(doc_id)
    return chosen


def _find(parent: dict[str, str], node: str) -> str:
    while parent[node] != node:
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


def near_duplicate_groups(ids: list[str], signatures: np.ndarray, bands: int,
                          threshold: float) -> list[list[str]]:
    """Connected components of documents whose MinHash Jaccard estimate is >= threshold.

    LSH banding proposes candidate pairs (documents sharing any whole band); each candidate pair is
    verified on the full signature before it joins a component. Components are found with an
    in-memory union-find rather than Daft's star-join recipe: only candidate ids are held, which fits
    in memory far past the corpus sizes one machine trains on.
    """
    rows = signatures.shape[1] // bands
    parent = {doc_id: doc_id for doc_id in ids}
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        block = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        for index, key in enumerate(block):
            buckets.setdefault(key.tobytes(), []).append(index)
        for members in buckets.values():
            head = members[0]
            for other in members[1:]:
                if np.mean(signatures[head] == signatures[other]) >= threshold:
                    root_a, root_b = _find(parent, ids[head]), _find(parent, ids[other])
                    if root_a != root_b:
                        parent[root_b] = root_a
    groups: dict[str, list[str]] = {}
    for doc_id in ids:
        groups.setdefault(_find(parent, doc_id), []).append(doc_id)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _keep_order(doc_id: str, protected: set[str]) -> tuple[int, str]:
    return (0 if doc_id in protected else 1, doc_id)


def clean_corpus(raw: daft.DataFrame, config: CleaningConfig,
                 protected: set[str] = frozenset()) -> tuple[pd.DataFrame, CleaningReport]:
    """Clean a raw corpus; documents in `protected` (judged ones) are never dropped or merged."""
    report = CleaningReport()
    ids = raw.select("doc_id").to_pydict()["doc_id"]
    report.counts["read"] = len(ids)
    if not ids:
        raise CorpusError("the corpus is empty: no documents were read")
    duplicate_ids = len(ids) - len(set(ids))
    if duplicate_ids:
        raise CorpusError(f"the corpus has {duplicate_ids} duplicate document ids, "
                          f"e.g. {pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]!r}")
    missing = protected - set(ids)
    if missing:
        raise CorpusError(f"{len(missing)} judged documents are not in the corpus, "
                          f"e.g. {sorted(missing)[:3]}")
    chosen = sample_ids(ids, config.max_documents, protected, config.seed)
    df = raw if len(chosen) == len(ids) else raw.where(col("doc_id").is_in(list(chosen)))
    report.counts["sampled"] = len(chosen)

    df = df.with_columns({"title": _normalize_unicode(col("title")),
                          "text": _normalize_unicode(col("text"))})
    if config.normalize_whitespace:
        df = df.with_columns({"title": _collapse_whitespace(col("title")),
                              "text": _collapse_whitespace(col("text"))})
    max_words = config.max_words

    @daft.func
    def pieces(text: str) -> list[str]:
        return chunk_words(text, max_words)

    df = df.with_column("parent_id", col("doc_id")).with_column("text", pieces(col("text")))
    df = df.explode("text")
    units = df.to_pandas()
    units["text"] = units["text"].fillna("")
    chunk_number = units.groupby("parent_id").cumcount()
    chunked = units.groupby("parent_id")["parent_id"].transform("size") > 1
    units["doc_id"] = np.where(chunked, units["parent_id"] + "#" + chunk_number.astype(str),
                               units["parent_id"])
    report.counts["units_after_chunking"] = len(units)

    words = (units["title"] + " " + units["text"]).str.split().str.len()
    is_protected = units["parent_id"].isin(protected)
    short = (words < config.min_words) & ~is_protected
    boiler = pd.Series(False, index=units.index)
    for pattern in config.boilerplate_patterns:
        boiler |= units["text"].str.fullmatch(pattern, flags=re.DOTALL)
    boiler &= ~is_protected & ~short
    report.counts["dropped_short_or_empty"] = int(short.sum())
    report.counts["dropped_boilerplate"] = int(boiler.sum())
    units = units[~short & ~boiler].reset_index(drop=True)

    units, dropped_exact, dropped_near = _dedupe(units, config, protected, report)
    report.counts["dropped_exact_duplicates"] = dropped_exact
    report.counts["dropped_near_duplicates"] = dropped_near
    report.counts["kept"] = len(units)
    if units.empty:
        raise CorpusError("no documents left after cleaning; check unit.min_words and the corpus")
    final_words = (units["title"] + " " + units["text"]).str.split().str.len()
    report.word_percentiles = {f"p{q}": float(np.percentile(final_words, q)) for q in (5, 50, 95)}
    return units[["doc_id", "parent_id", "title", "text", "anchor"]], report


def _dedupe(units: pd.DataFrame, config: CleaningConfig, protected: set[str],
            report: CleaningReport) -> tuple[pd.DataFrame, int, int]:
    frame = daft.from_pandas(units[["doc_id", "title", "text"]])
    key = normalize(col("title") + daft.lit(" ") + col("text"), remove_punct=True, lowercase=True,
                    white_space=True)
    frame = frame.select(
        col("doc_id"),
        key.hash().alias("exact_key"),
        minhash(key, num_hashes=config.num_hashes, ngram_size=config.ngram_size,
                seed=config.seed + 1).alias("signature"),
    ).to_pandas()
    by_id = units.set_index("doc_id")
    parent_of = by_id["parent_id"].to_dict()
    order = sorted(frame.index, key=lambda i: _keep_order(parent_of[frame.at[i, "doc_id"]], protected))
    frame = frame.loc[order]
    exact_dup = frame.duplicated("exact_key") & ~frame["doc_id"].map(parent_of).isin(protected)
    dropped = set(frame.loc[exact_dup, "doc_id"])
    survivors = frame[~exact_dup]
    signatures = np.stack(survivors["signature"].to_numpy()).astype(np.uint32)
    groups = near_duplicate_groups(list(survivors["doc_id"]), signatures, config.bands,
                                   config.jaccard_threshold)
    near = set()
    for group in groups:
        ranked = sorted(group, key=lambda d: _keep_order(parent_of[d], protected))
        keeper = ranked[0]
        for other in ranked[1:]:
            if parent_of[other] not in protected:
                near.add(other)
                if len(report.duplicate_examples) < 10:
                    report.duplicate_examples.append((keeper, other))
    kept = units[~units["doc_id"].isin(dropped | near)].reset_index(drop=True)
    return kept, len(dropped), len(near)
