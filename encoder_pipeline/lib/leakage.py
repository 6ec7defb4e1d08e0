"""Eval leakage: one definition, and two independent ways to find it.

**The definition.** A text *matches* an eval text when, after normalization, the two are equal or
near-duplicates: the Jaccard similarity of their sets of character 5-grams is at least
`NEAR_DUPLICATE_JACCARD` (a text shorter than 5 characters is its own only shingle). Normalization:
Unicode NFKC, casefold, whitespace runs -> one space, and each word loses the characters that are not
letters or digits at its two ends ("connection." = "connection", "(UTC)" = "utc"); a word of symbols
alone is kept as it is, since in code docstrings "a + b" and "a - b" are different queries. A training row
*leaks* when

- its query matches an eval query, or
- any of its documents (`positive`, `negative_1..N`) matches an eval document (any form of an eval
  unit: title + text, or the text alone), or
- its `doc_id` is an eval document or one of its units (chunks).

**The filter** (`LeakFilter`) removes leaking rows before a training-data file is written: exact
matches by a set of normalized texts, near-duplicates by MinHash LSH (`MINHASH_PERMUTATIONS` hashes
in `MINHASH_BANDS` bands: a pair at the threshold becomes a candidate with probability 1 - 5e-8),
each candidate verified by its exact Jaccard.

**The audit** (`audit_rows`) is what the blocking `no_eval_leakage` checks run on the published
files: the same definition through its own code: its own normalization and shingling, and an
exhaustive exact Jaccard between every training text and every eval text (sparse shingle-count
products), so that a bug in the filter cannot hide itself.

Sources: Lee et al. 2022 ("Deduplicating training data makes language models better": MinHash
near-duplicates); the BEIR / MTEB practice of removing test queries and documents from training data.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

NEAR_DUPLICATE_JACCARD = 0.8
SHINGLE_CHARS = 5
MINHASH_PERMUTATIONS = 128
MINHASH_BANDS = 32
DOCUMENT_COLUMN = re.compile(r"^(positive|negative_\d+)$")
_EDGE_PUNCTUATION = re.compile(r"^[\W_]+|[\W_]+$")  # \w is str.isalnum() plus "_" (Python's re docs)
_MERSENNE = np.uint64((1 << 61) - 1)


def normalize(text: str) -> str:
    """What "the same text" means (see the module doc): NFKC, casefold, one space between words,
    punctuation at each word's ends dropped (a word of symbols alone kept)."""
    words = unicodedata.normalize("NFKC", text or "").casefold().split()
    return " ".join(_EDGE_PUNCTUATION.sub("", word) or word for word in words)


def _shingle_hashes(normalized: str) -> np.ndarray:
    """Sorted distinct 64-bit hashes of the character 5-grams (polynomial hash over code points)."""
    codes = np.frombuffer(normalized.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < SHINGLE_CHARS:
        codes = np.pad(codes, (0, SHINGLE_CHARS - len(codes)))  # the whole short text, one shingle
    windows = np.lib.stride_tricks.sliding_window_view(codes, SHINGLE_CHARS)
    powers = np.uint64(1_000_003) ** np.arange(SHINGLE_CHARS, dtype=np.uint64)
    return np.unique(windows @ powers)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


class _MinHashIndex:
    """MinHash signatures of a set of texts, banded for LSH lookups."""

    def __init__(self, shingles: Sequence[np.ndarray], seed: int = 0):
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, _MERSENNE, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
        self._b = rng.integers(0, _MERSENNE, size=MINHASH_PERMUTATIONS, dtype=np.uint64)
        self.shingles = list(shingles)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(MINHASH_BANDS)]
        for row, signature in enumerate(self.signatures(self.shingles)):
            for band, key in enumerate(self._band_keys(signature)):
                self.buckets[band].setdefault(key, []).append(row)

    def signatures(self, shingles: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(shingles), MINHASH_PERMUTATIONS), dtype=np.uint64)
        for row, hashes in enumerate(shingles):
            # (a * h + b) with uint64 wrap-around, then min per permutation: a universal hash family
            # good enough for MinHash; every candidate is verified exactly anyway.
            out[row] = (np.outer(hashes, self._a) + self._b).min(axis=0)
        return out

    @staticmethod
    def _band_keys(signature: np.ndarray) -> list[bytes]:
        rows = MINHASH_PERMUTATIONS // MINHASH_BANDS
        return [signature[band * rows:(band + 1) * rows].tobytes() for band in range(MINHASH_BANDS)]

    def candidates(self, signature: np.ndarray) -> set[int]:
        found: set[int] = set()
        for band, key in enumerate(self._band_keys(signature)):
            found.update(self.buckets[band].get(key, ()))
        return found


@dataclass(frozen=True)
class EvalTexts:
    """What training must not touch: eval queries, eval document texts, and the ids of eval documents
    and of their units."""

    queries: tuple[str, ...]
    documents: tuple[str, ...]
    document_ids: frozenset[str] = frozenset()

    @classmethod
    def of(cls, queries: Iterable[str], documents: Iterable[str], document_ids: Iterable[str] = ()
           ) -> EvalTexts:
        return cls(tuple(dict.fromkeys(q for q in queries if q)),
                   tuple(dict.fromkeys(d for d in documents if d)), frozenset(document_ids))


def document_columns(rows: pd.DataFrame) -> list[str]:
    """The columns of a training file that hold document texts: positive, negative_1..N."""
    return [c for c in rows.columns if DOCUMENT_COLUMN.match(c)]


@dataclass
class LeakReport:
    """Which rows leak and why (`reasons[row]`: e.g. "query ~ eval query 'Close the socket.'")."""

    leaking: np.ndarray  # bool per row
    reasons: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.leaking.sum())

    def examples(self, rows: pd.DataFrame, limit: int = 5) -> pd.DataFrame:
        shown = sorted(self.reasons)[:limit]
        return pd.DataFrame({"row": shown, "query": [rows["query"].iloc[r] for r in shown],
                             "why": [self.reasons[r] for r in shown]})


class LeakFilter:
    """Finds the training rows that leak (see the module doc), to drop them before publishing."""

    def __init__(self, eval_texts: EvalTexts):
        self.eval = eval_texts
        self._sides = {kind: self._side(texts) for kind, texts in
                       (("query", eval_texts.queries), ("document", eval_texts.documents))}

    @staticmethod
    def _side(texts: Sequence[str]) -> dict:
        normalized = [normalize(t) for t in texts]
        shingles = [_shingle_hashes(n) for n in normalized]
        return {"texts": list(texts), "exact": {n: i for i, n in enumerate(normalized)},
                "shingles": shingles, "index": _MinHashIndex(shingles) if shingles else None}

    def match(self, text: str, kind: str) -> str | None:
        """The eval text (`kind`: "query" or "document") that `text` matches, else None."""
        side = self._sides[kind]
        normalized = normalize(text)
        if normalized in side["exact"]:
            return side["texts"][side["exact"][normalized]]
        if side["index"] is None:
            return None
        hashes = _shingle_hashes(normalized)
        for row in side["index"].candidates(side["index"].signatures([hashes])[0]):
            if _jaccard(hashes, side["shingles"][row]) >= NEAR_DUPLICATE_JACCARD:
                return side["texts"][row]
        return None

    def find(self, rows: pd.DataFrame) -> LeakReport:
        leaking = np.zeros(len(rows), dtype=bool)
        reasons: dict[int, str] = {}
        checks = [("query", "query")] + [(c, "document") for c in document_columns(rows)]
        memo: dict[tuple[str, str], str | None] = {}
        for column, kind in checks:
            if column not in rows.columns:
                continue
            for row, text in enumerate(rows[column].fillna("").astype(str)):
                if (text, kind) not in memo:
                    memo[(text, kind)] = self.match(text, kind)
                hit = memo[(text, kind)]
                if hit is not None and not leaking[row]:
                    leaking[row] = True
                    reasons[row] = f"{column} ~ eval {kind} {hit[:80]!r}"
        if "doc_id" in rows.columns and self.eval.document_ids:
            for row, doc in enumerate(rows["doc_id"].astype(str)):
                if doc in self.eval.document_ids and not leaking[row]:
                    leaking[row] = True
                    reasons[row] = f"doc_id {doc} is an eval document"
        return LeakReport(leaking, reasons)

    def drop(self, rows: pd.DataFrame) -> tuple[pd.DataFrame, LeakReport]:
        """The rows that do not leak (index reset), and the report on those that did."""
        report = self.find(rows)
        return rows[~report.leaking].reset_index(drop=True), report


# The audit: the same definition, its own code path. ------------------------------------------------

def _audit_normal_form(text: str) -> str:
    words = []
    for word in unicodedata.normalize("NFKC", text or "").casefold().split():
        keep = [i for i, ch in enumerate(word) if ch.isalnum()]
        words.append(word[keep[0]:keep[-1] + 1] if keep else word)
    return " ".join(words)


def _audit_shingles(normalized: str) -> set[str]:
    if len(normalized) <= SHINGLE_CHARS:
        return {normalized}
    return {normalized[i:i + SHINGLE_CHARS] for i in range(len(normalized) - SHINGLE_CHARS + 1)}


def _audit_matches(texts: Sequence[str], eval_texts: Sequence[str], chunk: int = 2048) -> np.ndarray:
    """For each text, whether some eval text has Jaccard >= NEAR_DUPLICATE_JACCARD with it (equal
    normalized texts have Jaccard 1): every pair, by sparse products of shingle indicator rows."""
    found = np.zeros(len(texts), dtype=bool)
    if not texts or not eval_texts:
        return found
    vocabulary: dict[str, int] = {}
    eval_sets = [{vocabulary.setdefault(s, len(vocabulary)) for s in _audit_shingles(_audit_normal_form(t))}
                 for t in eval_texts]
    # Shingles no eval text has cannot be shared: they only count towards a text's size.
    text_sets = [_audit_shingles(_audit_normal_form(t)) for t in texts]

    def matrix(sets: Sequence[set[int]]) -> sparse.csr_matrix:
        indptr, indices = [0], []
        for columns in sets:
            indices.extend(sorted(columns))
            indptr.append(len(indices))
        data = np.ones(len(indices), dtype=np.int32)
        return sparse.csr_matrix((data, indices, indptr), shape=(len(sets), len(vocabulary)))

    evals_t = matrix(eval_sets).T.tocsr()
    eval_sizes = np.array([len(s) for s in eval_sets])
    for start in range(0, len(texts), chunk):
        part_sets = text_sets[start:start + chunk]
        part = matrix([{vocabulary[s] for s in shingles if s in vocabulary} for shingles in part_sets])
        sizes = np.array([len(s) for s in part_sets])
        shared = (part @ evals_t).tocoo()
        union = sizes[shared.row] + eval_sizes[shared.col] - shared.data
        hits = shared.row[shared.data >= NEAR_DUPLICATE_JACCARD * union]
        found[start + np.unique(hits)] = True
    return found


def audit_rows(rows: pd.DataFrame, eval_texts: EvalTexts) -> tuple[int, list[str]]:
    """How many rows of a published training file leak, and up to five of them in words."""
    leaking = np.zeros(len(rows), dtype=bool)
    why: dict[int, str] = {}
    columns = [("query", eval_texts.queries)] + [(c, eval_texts.documents) for c in document_columns(rows)]
    for column, against in columns:
        if column not in rows.columns:
            continue
        values = rows[column].fillna("").astype(str).tolist()
        distinct = list(dict.fromkeys(values))
        matched = dict(zip(distinct, _audit_matches(distinct, list(against)), strict=True))
        for row, value in enumerate(values):
            if matched[value] and not leaking[row]:
                leaking[row] = True
                why[row] = f"{column} {value[:60]!r} matches an eval text"
    if "doc_id" in rows.columns:
        for row, doc in enumerate(rows["doc_id"].astype(str)):
            if doc in eval_texts.document_ids and not leaking[row]:
                leaking[row] = True
                why[row] = f"doc_id {doc} is an eval document"
    return int(leaking.sum()), [why[r] for r in sorted(why)[:5]]
