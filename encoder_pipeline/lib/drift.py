"""Corpus drift: how far a domain's source corpus has moved from the snapshot its encoder was trained on.

A *snapshot* of a raw corpus (`sources.read_corpus` columns) is one row per source document:
`doc_id`, `hash` (Daft's 64-bit hash of title + text) and `tokens` (its word count under
TOKEN_PATTERN), plus a vocabulary: each term's document frequency, the VOCABULARY_SIZE most frequent
kept. clean_corpus writes the snapshot of what it read beside its units, so the snapshot an encoder
was trained on is the one in the clean_corpus version its training run read.

Drift of the corpus now against a training snapshot:
- documents added / changed / removed (by id and hash); `changed_fraction` is their sum over the
  training snapshot's document count;
- vocabulary shift: `new_token_share`, the share of the current corpus's tokens that lie in added or
  changed documents and belong to terms the training vocabulary lacks (estimated on at most
  VOCABULARY_SAMPLE of those documents), and the most frequent such terms;
- a canary: the served encoder's eval Recall@10 over its index as built, and over the same index with
  the corpus's changes applied (documents removed or changed dropped, added or changed ones embedded
  and appended, `index.update_index`).

`decide` turns a drift into an action under a domain's thresholds: retrain, refresh the index
incrementally, or nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import daft
import numpy as np
import pandas as pd
from daft import col
from daft.functions import list_count, list_distinct, lower, regexp_extract_all

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.index import UPDATABLE_PRECISIONS, LoadedIndex, update_index
from encoder_pipeline.lib.metrics import evaluate, to_parent_run

SNAPSHOT_FILE = "source_snapshot.parquet"
VOCABULARY_FILE = "source_vocabulary.parquet"
TOKEN_PATTERN = r"[^\W\d_]\w{2,}"  # words of 3+ characters starting with a letter; identifiers whole
VOCABULARY_SIZE = 200_000  # a larger tail is mostly ids and typos
VOCABULARY_SAMPLE = 5_000  # changed documents read to estimate the vocabulary shift
NEW_TERMS_SHOWN = 10
CANARY_K = 100  # units retrieved per query, then cut to the top 10 documents, as the report does
# Past this many documents to embed, the canary would outlast a sensor tick; a change that large
# crosses the changed-fraction threshold of any corpus under ~20k documents anyway.
CANARY_MAX_DOCUMENTS = 2_000

Action = Literal["none", "refresh", "retrain"]


def _content() -> daft.Expression:
    return col("title") + daft.lit("\n") + col("text")


def _terms(content: daft.Expression) -> daft.Expression:
    return regexp_extract_all(lower(content), TOKEN_PATTERN)


def tokenize(text: str) -> list[str]:
    """The terms of a text, as the snapshot's vocabulary counts them."""
    return re.findall(TOKEN_PATTERN, text.lower())


def corpus_snapshot(raw: daft.DataFrame) -> pd.DataFrame:
    """doc_id, hash, tokens for every document of a raw corpus (one streamed pass, no text kept)."""
    frame = raw.select(col("doc_id"), _content().hash().alias("hash"),
                       list_count(_terms(_content())).cast(daft.DataType.int64()).alias("tokens"))
    return frame.to_pandas()


def corpus_vocabulary(raw: daft.DataFrame, size: int = VOCABULARY_SIZE) -> pd.DataFrame:
    """term, df: the `size` terms found in the most documents."""
    terms = raw.select(col("doc_id"), list_distinct(_terms(_content())).alias("term")).explode(col("term"))
    counts = (terms.where(col("term").not_null()).groupby("term").agg(col("doc_id").count().alias("df"))
              .sort(["df", "term"], desc=[True, False]).limit(size))
    return counts.to_pandas()


def fingerprint(documents: pd.DataFrame) -> str:
    """A content fingerprint of a snapshot: the same documents (ids and hashes) give the same one."""
    ordered = documents[["doc_id", "hash"]].sort_values("doc_id", kind="stable")
    digest = hashlib.sha256(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def write_snapshot(raw: daft.DataFrame, folder: Path) -> str:
    """Write the raw corpus's snapshot and vocabulary into `folder`; returns its fingerprint."""
    documents = corpus_snapshot(raw)
    documents.to_parquet(Path(folder) / SNAPSHOT_FILE, index=False)
    corpus_vocabulary(raw).to_parquet(Path(folder) / VOCABULARY_FILE, index=False)
    return fingerprint(documents)


@dataclass(frozen=True)
class Snapshot:
    documents: pd.DataFrame  # doc_id, hash, tokens
    vocabulary: frozenset[str]  # empty when none was written

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.documents)


def read_snapshot(folder: Path) -> Snapshot | None:
    """The snapshot written into `folder`, or None (written before snapshots existed, or deleted)."""
    folder = Path(folder)
    if not (folder / SNAPSHOT_FILE).exists():
        return None
    vocabulary = folder / VOCABULARY_FILE
    terms = pd.read_parquet(vocabulary)["term"] if vocabulary.exists() else []
    return Snapshot(pd.read_parquet(folder / SNAPSHOT_FILE), frozenset(terms))


@dataclass(frozen=True)
class CorpusDiff:
    added: list[str]
    changed: list[str]
    removed: list[str]
    before: int  # documents in the older snapshot

    @property
    def changed_fraction(self) -> float:
        return (len(self.added) + len(self.changed) + len(self.removed)) / max(self.before, 1)

    @property
    def new_or_changed(self) -> list[str]:
        return self.added + self.changed

    @property
    def gone_or_changed(self) -> list[str]:
        return self.removed + self.changed

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff_snapshots(old: pd.DataFrame, new: pd.DataFrame) -> CorpusDiff:
    """Documents added, changed (same id, other hash) and removed from `old` to `new`, ids sorted."""
    merged = old[["doc_id", "hash"]].merge(new[["doc_id", "hash"]], on="doc_id", how="outer",
                                           suffixes=("_old", "_new"), indicator=True)
    both = merged["_merge"] == "both"

    def ids(mask: pd.Series) -> list[str]:
        return sorted(merged.loc[mask, "doc_id"].astype(str))

    return CorpusDiff(added=ids(merged["_merge"] == "right_only"),
                      changed=ids(both & (merged["hash_old"] != merged["hash_new"])),
                      removed=ids(merged["_merge"] == "left_only"), before=len(old))


def diff_units(old: pd.DataFrame, new: pd.DataFrame) -> tuple[set[str], pd.DataFrame]:
    """Cleaned units (doc_id, title, text, ...) from one corpus version to the next: the ids of old
    units that are gone or whose content changed, and the rows of `new` that are new or changed."""
    def keyed(units: pd.DataFrame) -> list[tuple[str, int]]:
        hashes = pd.util.hash_pandas_object(units[["title", "text"]], index=False)
        return list(zip(units["doc_id"], hashes.to_numpy().tolist(), strict=True))

    before, after = keyed(old), keyed(new)
    old_keys, new_keys = set(before), set(after)
    gone = {doc_id for doc_id, content in before if (doc_id, content) not in new_keys}
    fresh = [key not in old_keys for key in after]
    return gone, new[fresh]


@dataclass(frozen=True)
class VocabularyShift:
    new_token_share: float
    new_terms: list[tuple[str, int]]  # term, documents it appears in (among those read)


def vocabulary_shift(known: Collection[str], texts: Iterable[str], changed_tokens: int,
                     corpus_tokens: int) -> VocabularyShift:
    """The share of the corpus's tokens that are new terms, estimated from `texts` (a sample of the
    added and changed documents, `changed_tokens` tokens in all of them), and the most frequent."""
    documents: Counter[str] = Counter()
    new = read = 0
    for text in texts:
        terms = tokenize(text)
        unseen = [term for term in terms if term not in known]
        new, read = new + len(unseen), read + len(terms)
        documents.update(set(unseen))
    share = (new / read) * (changed_tokens / max(corpus_tokens, 1)) if read else 0.0
    top = sorted(documents.items(), key=lambda kv: (-kv[1], kv[0]))[:NEW_TERMS_SHOWN]
    return VocabularyShift(float(share), top)


def spread_sample(ids: list[str], hashes: dict[str, int], limit: int = VOCABULARY_SAMPLE) -> list[str]:
    """A deterministic spread of at most `limit` ids (ordered by content hash)."""
    return sorted(ids, key=lambda doc_id: (hashes[doc_id], doc_id))[:limit]


def parent_recall_at_10(index: LoadedIndex, query_vectors: np.ndarray, query_ids: list[str],
                        qrels: dict[str, dict[str, int]]) -> float:
    hits = index.search(query_vectors, CANARY_K)
    return evaluate(to_parent_run(hits, query_ids, index.parents), qrels)[0]["recall@10"]


def canary_recall(index: LoadedIndex, embed: Callable[[list[str]], np.ndarray],
                  queries: dict[str, str], qrels: dict[str, dict[str, int]],
                  gone_parents: Collection[str], new_units: pd.DataFrame) -> tuple[float, float]:
    """The encoder's eval Recall@10 over `index` as built, then over it with `gone_parents`' units
    dropped and `new_units` (doc_id, parent_id, title, text) embedded and added. Updates `index`."""
    query_ids = list(queries)
    vectors = embed([queries[q] for q in query_ids])
    before = parent_recall_at_10(index, vectors, query_ids, qrels)
    gone = set(gone_parents)
    rows = [row for row, parent in enumerate(index.parents) if parent in gone]
    texts = document_texts(list(new_units["title"]), list(new_units["text"]))
    update_index(index, rows, embed(texts) if texts else np.zeros((0, 1), np.float32),
                 list(new_units["doc_id"]), list(new_units["parent_id"]), list(new_units["title"]))
    return before, parent_recall_at_10(index, vectors, query_ids, qrels)


@dataclass
class Drift:
    """One observation of a domain's corpus."""

    fingerprint: str
    documents: int
    training_fingerprint: str | None = None  # None: no training snapshot to compare with
    indexed_fingerprint: str | None = None
    added: int = 0
    changed: int = 0
    removed: int = 0
    changed_fraction: float = 0.0
    new_token_share: float = 0.0
    new_terms: list[tuple[str, int]] = field(default_factory=list)
    canary_recall_before: float | None = None
    canary_recall_after: float | None = None
    canary_note: str = ""

    @property
    def canary_drop(self) -> float | None:
        if self.canary_recall_before is None or self.canary_recall_after is None:
            return None
        return self.canary_recall_before - self.canary_recall_after


@dataclass(frozen=True)
class ServedCanary:
    """What the canary measures with: the served index (loaded fresh: the canary updates it), its
    encoder, and the eval set's queries and judgments."""

    index: LoadedIndex
    embed: Callable[[list[str]], np.ndarray]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def fill_canary(drift: Drift, changes: CorpusDiff, texts: pd.DataFrame, served: Callable[[], ServedCanary],
                clean: Callable[[pd.DataFrame, set[str]], pd.DataFrame]) -> None:
    """The drift's canary: the served index re-measured with `changes` (since it was built) applied,
    their units (`clean(documents, judged ids)`: the run's own cleaning) embedded and swapped in.
    `texts`: the raw rows of at least the new or changed documents."""
    if not changes:
        drift.canary_note = "the served index covers the corpus as it is"
        return
    if len(changes.new_or_changed) > CANARY_MAX_DOCUMENTS:
        drift.canary_note = (f"{len(changes.new_or_changed)} documents to embed (> "
                             f"{CANARY_MAX_DOCUMENTS}): canary skipped")
        return
    try:
        canary = served()
    except FileNotFoundError as error:  # an artifact cleaned up since: measure without the canary
        drift.canary_note = f"canary skipped: {error}"
        return
    if canary.index.precision not in UPDATABLE_PRECISIONS:
        drift.canary_note = f"a {canary.index.precision} index cannot be updated in place: canary skipped"
        return
    judged = {doc for rels in canary.qrels.values() for doc in rels}
    new_docs = texts[texts["doc_id"].isin(set(changes.new_or_changed))]
    units = clean(new_docs, judged & set(new_docs["doc_id"])) if len(new_docs) else pd.DataFrame(
        columns=["doc_id", "parent_id", "title", "text"])
    drift.canary_recall_before, drift.canary_recall_after = canary_recall(
        canary.index, canary.embed, canary.queries, canary.qrels, changes.gone_or_changed, units)


def measure_drift(raw: daft.DataFrame, current: pd.DataFrame, training: Snapshot | None,
                  indexed: Snapshot | None, canary: Callable[[Drift, CorpusDiff, pd.DataFrame], None]
                  ) -> Drift:
    """The corpus now (`raw`, and `current`, its snapshot) against the `training` snapshot and the
    served index's (`indexed`; None: nothing served); reads the text of changed documents only.
    `canary(drift, changes since indexed, their texts)` fills the canary (`fill_canary`)."""
    drift = Drift(fingerprint(current), len(current))
    if training is None:
        return drift
    since_training = diff_snapshots(training.documents, current)
    drift.training_fingerprint = training.fingerprint
    drift.added, drift.changed = len(since_training.added), len(since_training.changed)
    drift.removed, drift.changed_fraction = len(since_training.removed), since_training.changed_fraction
    if indexed is None:
        drift.canary_note = "no served index with a corpus snapshot"
        since_indexed = None
    else:
        drift.indexed_fingerprint = indexed.fingerprint
        since_indexed = diff_snapshots(indexed.documents, current)

    hashes = dict(zip(current["doc_id"], current["hash"], strict=True))
    sample = spread_sample(since_training.new_or_changed, hashes) if training.vocabulary else []
    canary_docs = since_indexed.new_or_changed[:CANARY_MAX_DOCUMENTS + 1] if since_indexed else []
    wanted = sorted(set(sample) | set(canary_docs))
    texts = raw.where(col("doc_id").is_in(wanted)).to_pandas() if wanted else raw.limit(0).to_pandas()
    if sample:
        tokens = dict(zip(current["doc_id"], current["tokens"], strict=True))
        sampled = texts[texts["doc_id"].isin(set(sample))]
        shift = vocabulary_shift(training.vocabulary,
                                 document_texts(list(sampled["title"]), list(sampled["text"])),
                                 changed_tokens=sum(tokens[d] for d in since_training.new_or_changed),
                                 corpus_tokens=int(current["tokens"].sum()))
        drift.new_token_share, drift.new_terms = shift.new_token_share, shift.new_terms
    if since_indexed is not None:
        canary(drift, since_indexed, texts)
    return drift


@dataclass(frozen=True)
class Thresholds:
    changed_fraction: float
    new_token_share: float
    canary_recall_drop: float


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(drift: Drift, thresholds: Thresholds) -> Decision:
    """Retrain when any drift figure reaches its threshold; otherwise refresh the index when the
    corpus differs from the one it was built from; otherwise nothing."""
    if drift.training_fingerprint is None:
        return Decision("none", "no training snapshot to compare with: materialize the domain first")
    reasons = []
    if drift.changed_fraction >= thresholds.changed_fraction:
        reasons.append(f"{drift.changed_fraction:.1%} of documents added, changed or removed since "
                       f"training (threshold {thresholds.changed_fraction:.1%})")
    if drift.new_token_share >= thresholds.new_token_share:
        terms = ", ".join(term for term, _ in drift.new_terms[:5])
        reasons.append(f"{drift.new_token_share:.1%} of tokens are new terms ({terms}; threshold "
                       f"{thresholds.new_token_share:.1%})")
    drop = drift.canary_drop
    if drop is not None and drop >= thresholds.canary_recall_drop:
        reasons.append(f"canary Recall@10 fell {drift.canary_recall_before:.3f} -> "
                       f"{drift.canary_recall_after:.3f} (threshold -{thresholds.canary_recall_drop:.3f})")
    if reasons:
        return Decision("retrain", "drift: " + "; ".join(reasons))
    indexed = drift.indexed_fingerprint or drift.training_fingerprint
    if drift.fingerprint != indexed:
        return Decision("refresh", f"corpus changed below the retrain thresholds ({drift.added} added, "
                        f"{drift.changed} changed, {drift.removed} removed since training): "
                        "refresh the index incrementally")
    return Decision("none", "the served index covers the corpus as it is")
