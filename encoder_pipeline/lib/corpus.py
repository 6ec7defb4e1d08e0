"""Corpus cleaning: normalize, chunk into retrievable units, filter, exact and near-duplicate removal.

Columns in: `doc_id, title, text, anchor` (see `sources.py`). Columns out: `doc_id` (unit id, stable),
`parent_id` (the source document: judgments and metrics are at this level, best chunk wins),
`title`, `text`, `anchor`, `duplicate_of` (the unit this one exactly or nearly duplicates, else
null), `in_sample` (the unit is in the training sample: its document is among a stable salted-hash
sample of `sample_documents` documents, judged ones always in, see `sample_ids`, and it duplicates
no other unit).

Duplicates are marked, not removed: they are left out of training (a near-copy in a batch is a false
negative, and repeats overweight a text) but served, since "near" is about shared wording, not
meaning: "mitotic G2 phase" and "meiotic G2 phase" are distinct Gene Ontology terms whose
definitions differ by one word, and an ontology, a statute or a code base is full of such siblings.
Empty or too-short units and the spec's boilerplate are dropped.

Per-row work runs as Daft expressions and batch UDFs and streams to Parquet, so a corpus larger than
memory cleans on one machine (`clean_corpus_to_parquet`); the MinHash step follows Daft's dedupe
recipe (normalize -> minhash -> LSH bands -> connected components), see `near_duplicate_groups`.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import daft
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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
    max_documents: int = 0  # read only a sample of this many documents (tests, probes); 0: all
    sample_documents: int = 0  # documents marked `in_sample` for the training stages; 0: all
    seed: int = 0
    min_units: int = 0  # fewer units left after cleaning: refused (an eval set and training need more)


@dataclass
class CleaningReport:
    counts: dict[str, int] = field(default_factory=dict)
    word_percentiles: dict[str, float] = field(default_factory=dict)
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""  # sha256 over the kept units' (doc_id, title, text), in order
    sample_documents: int = 0  # documents in the training sample (all, when it is not sampled)
    sample_units: int = 0


def chunk_words(text: str, max_words: int) -> list[str]:
    """Split on whitespace into pieces of at most max_words words (line layout kept inside a piece)."""
    if max_words <= 0:
        return [text]
    tokens = re.findall(r"\S+\s*", text)
    if len(tokens) <= max_words:
        return [text]
    return ["".join(tokens[i : i + max_words]).strip() for i in range(0, len(tokens), max_words)]


def sample_ids(doc_ids: Iterable[str], limit: int, protected: set[str], seed: int) -> set[str]:
    """A deterministic sample of at most `limit` ids (the lowest salted hashes), always keeping
    protected ids. It depends on the ids only, not on their order, and is stable as a corpus grows:
    new documents enter in proportion and displace as many sampled ones, never more."""
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


def _find(parent: dict[int, int], node: int) -> int:
    """Union-find root; rows never merged are absent from `parent` (their own root)."""
    while parent.get(node, node) != node:
        parent[node] = parent.get(parent[node], parent[node])
        node = parent[node]
    return node


_BAND_MULTIPLIERS = np.random.default_rng(0).integers(1, 2**63, size=256, dtype=np.uint64) | np.uint64(1)


def near_duplicate_components(signatures: np.ndarray, bands: int, threshold: float) -> list[list[int]]:
    """Row groups (connected components, sorted row numbers) whose MinHash Jaccard estimate is
    >= threshold.

    LSH banding proposes candidate pairs (rows sharing any whole band); each candidate pair is
    verified on the full signature before it joins a component. Components are found with an
    in-memory union-find over row numbers rather than Daft's star-join recipe: only rows that share a
    band are held, which fits in memory far past the corpus sizes one machine trains on.
    """
    rows = signatures.shape[1] // bands
    parent: dict[int, int] = {}
    for band in range(bands):
        block = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        # A wrapping polynomial hash of the band: equal bands always share a key, and a rare
        # collision of unequal ones is harmless since every candidate pair is verified below.
        keys = block.astype(np.uint64) @ _BAND_MULTIPLIERS[:rows]
        # Only buckets with several members need Python: on a real corpus almost all are singletons.
        codes, _ = pd.factorize(keys)
        shared = np.flatnonzero(np.bincount(codes)[codes] > 1)
        buckets: dict[int, list[int]] = {}
        for index in shared.tolist():
            buckets.setdefault(codes[index], []).append(index)
        for members in buckets.values():
            head = members[0]
            for other in members[1:]:
                if np.mean(signatures[head] == signatures[other]) >= threshold:
                    root_a, root_b = _find(parent, head), _find(parent, other)
                    if root_a != root_b:
                        parent[root_b] = root_a
    groups: dict[int, set[int]] = {}
    for node in list(parent):
        groups.setdefault(_find(parent, node), set()).add(node)
    return [sorted(members | {root}) for root, members in groups.items()]


def near_duplicate_groups(ids: list[str], signatures: np.ndarray, bands: int,
                          threshold: float) -> list[list[str]]:
    """`near_duplicate_components` as groups of ids."""
    return [sorted(ids[i] for i in group)
            for group in near_duplicate_components(signatures, bands, threshold)]


def _keep_order(doc_id: str, protected: set[str]) -> tuple[int, str]:
    return (0 if doc_id in protected else 1, doc_id)


UNIT_COLUMNS = ["doc_id", "parent_id", "title", "text", "anchor"]
DUPLICATE_COLUMN = "duplicate_of"
SAMPLE_COLUMN = "in_sample"
_BOOKKEEPING = ["doc_id", "parent_id", "words", "short", "boilerplate", "exact_key", "signature"]


def clean_corpus(raw: daft.DataFrame, config: CleaningConfig,
                 protected: set[str] = frozenset()) -> tuple[pd.DataFrame, CleaningReport]:
    """`clean_corpus_to_parquet` for corpora that fit in memory: the units as a DataFrame."""
    with tempfile.TemporaryDirectory(prefix="clean-corpus-") as scratch:
        out = Path(scratch) / "units.parquet"
        report = clean_corpus_to_parquet(raw, config, out, protected)
        return pd.read_parquet(out), report


def clean_corpus_to_parquet(raw: daft.DataFrame, config: CleaningConfig, out_path: Path,
                            protected: set[str] = frozenset()) -> CleaningReport:
    """Clean a raw corpus into `out_path` (one Parquet file, columns UNIT_COLUMNS, source order).

    Streams: no pass holds the corpus's text in memory. Pass 1 runs the per-row work in Daft
    (normalize, chunk, flag short and boilerplate units, exact-dedupe key, MinHash signature) and
    writes every unit to a scratch file batch by batch; pass 2 reads back only ids, flags and
    signatures to decide what is dropped and what duplicates what; pass 3 copies the kept rows batch
    by batch into `out_path`. Peak memory grows with the number of units (ids and 4-byte hashes), not
    with their text. Documents in `protected` (judged ones) are never dropped or marked duplicates.
    """
    report = CleaningReport()
    try:
        ids = raw.select("doc_id").to_arrow().column("doc_id").to_pandas()
    except daft.exceptions.DaftCoreException as error:  # e.g. a bad line deep in a remote file
        raise CorpusError(f"cannot read the corpus: {error}") from error
    report.counts["read"] = len(ids)
    if ids.empty:
        raise CorpusError("the corpus is empty: no documents were read")
    if ids.isna().any():
        raise CorpusError(f"{int(ids.isna().sum())} documents have no id (null in the field "
                          "corpus.id_field names)")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise CorpusError(f"the corpus has {len(duplicated)} duplicate document ids (field "
                          f"corpus.id_field), e.g. {duplicated.iloc[0]!r}: ids must be unique, since "
                          "judgments and the index refer to documents by id")
    missing = protected - set(ids[ids.isin(protected)])
    if missing:
        raise CorpusError(f"the judged set's qrels name {len(missing)} documents that are not in the "
                          f"corpus (judged.path vs corpus.path), e.g. {sorted(missing)[:3]}")
    chosen = sample_ids(ids, config.max_documents, protected, config.seed)
    report.counts["sampled"] = len(chosen)
    frame = raw if len(chosen) == len(ids) else raw.where(col("doc_id").is_in(list(chosen)))
    del ids, chosen

    out_path = Path(out_path)
    scratch = out_path.with_name(f".{out_path.name}.units")
    try:
        _write_batches(_annotated_units(frame, config, protected).to_arrow_iter(), scratch)
        keep, duplicate_of, words = _units_to_keep(scratch, config, protected, report)
        distinct = keep & pd.isna(duplicate_of)
        if not keep.any():
            raise CorpusError("no documents left after cleaning; check unit.min_words and the corpus")
        if distinct.sum() < config.min_units:
            raise CorpusError(f"only {int(distinct.sum())} distinct units are left after cleaning "
                              f"({report.counts}); at least {config.min_units} are needed (one "
                              "training pair per unit at best, and training needs that many): add "
                              "documents")
        sample = _sampled_parents(scratch, distinct, config, protected)
        report.fingerprint, report.sample_units = _copy_kept(scratch, keep, duplicate_of, sample, out_path)
    finally:
        scratch.unlink(missing_ok=True)
    report.counts["kept"] = int(keep.sum())
    report.sample_documents = (len(sample) if sample is not None
                               else len(set(_kept_parents(out_path, distinct_only=True))))
    report.word_percentiles = {f"p{q}": float(np.percentile(words[keep], q)) for q in (5, 50, 95)}
    return report


def _annotated_units(frame: daft.DataFrame, config: CleaningConfig,
                     protected: set[str]) -> daft.DataFrame:
    """Pass 1 as one lazy Daft plan: every unit with its drop flags, exact key and signature."""
    collapse = config.normalize_whitespace
    max_words = config.max_words
    patterns = [re.compile(p, flags=re.DOTALL) for p in config.boilerplate_patterns]

    # Batch UDFs: one Python call per batch rather than per row keeps a 1M-document pass cheap.
    @daft.func.batch(return_dtype=daft.DataType.string())
    def normalized(texts: daft.Series) -> list[str]:
        clean = [unicodedata.normalize("NFC", t or "") for t in texts.to_pylist()]
        return [" ".join(t.split()) for t in clean] if collapse else clean

    @daft.func.batch(return_dtype=daft.DataType.list(daft.DataType.string()))
    def pieces(texts: daft.Series) -> list[list[str]]:
        return [chunk_words(t, max_words) for t in texts.to_pylist()]

    @daft.func.batch(return_dtype=daft.DataType.list(daft.DataType.string()))
    def unit_ids(doc_ids: daft.Series, chunks: daft.Series) -> list[list[str]]:
        return [[doc_id] if len(parts) == 1 else [f"{doc_id}#{i}" for i in range(len(parts))]
                for doc_id, parts in zip(doc_ids.to_pylist(), chunks.to_pylist())]

    @daft.func.batch(return_dtype=daft.DataType.int64())
    def word_count(titles: daft.Series, texts: daft.Series) -> list[int]:
        return [len(f"{a} {b}".split()) for a, b in zip(titles.to_pylist(), texts.to_pylist())]

    @daft.func.batch(return_dtype=daft.DataType.bool())
    def is_boilerplate(texts: daft.Series) -> list[bool]:
        return [any(p.fullmatch(t or "") for p in patterns) for t in texts.to_pylist()]

    is_protected = col("parent_id").is_in(list(protected)) if protected else daft.lit(False)
    frame = frame.with_columns({"title": normalized(col("title")), "text": normalized(col("text")),
                                "parent_id": col("doc_id")})
    frame = frame.with_column("text", pieces(col("text")))
    frame = frame.with_column("doc_id", unit_ids(col("parent_id"), col("text")))
    frame = frame.explode(col("text"), col("doc_id")).with_column("text", col("text").fill_null(""))
    frame = frame.with_columns({"words": word_count(col("title"), col("text")),
                                "protected": is_protected})
    frame = frame.with_columns({
        "short": (col("words") < config.min_words) & ~col("protected"),
        "boilerplate": (is_boilerplate(col("text")) if patterns else daft.lit(False))
        & ~col("protected"),
    })
    key = normalize(col("title") + daft.lit(" ") + col("text"), remove_punct=True, lowercase=True,
                    white_space=True)
    return frame.select(
        *UNIT_COLUMNS, "words", "short", "boilerplate",
        key.hash().alias("exact_key"),
        minhash(key, num_hashes=config.num_hashes, ngram_size=config.ngram_size,
                seed=config.seed + 1).alias("signature"),
    )


def _write_batches(batches: Iterable[pa.RecordBatch], path: Path) -> None:
    writer = None
    try:
        for batch in batches:
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema)
            writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise CorpusError("the corpus is empty: no documents were read")


def _units_to_keep(scratch: Path, config: CleaningConfig, protected: set[str],
                   report: CleaningReport) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2, from ids, flags and signatures only, in file order: which units survive (a mask), the
    unit each survivor duplicates (None: none), and the word counts."""
    table = pq.read_table(scratch, columns=_BOOKKEEPING)
    signatures = table.column("signature").combine_chunks()
    signatures = signatures.flatten().to_numpy().astype(np.uint32).reshape(len(table), -1)
    units = table.drop(["signature"]).to_pandas()
    del table
    report.counts["units_after_chunking"] = len(units)
    report.counts["documents_chunked"] = int(
        units.loc[units["doc_id"] != units["parent_id"], "parent_id"].nunique())
    report.counts["dropped_short_or_empty"] = int(units["short"].sum())
    boilerplate = units["boilerplate"] & ~units["short"]
    report.counts["dropped_boilerplate"] = int(boilerplate.sum())
    keep = ~(units["short"] | boilerplate).to_numpy()

    doc_ids, parent_ids = units["doc_id"].to_numpy(), units["parent_id"].to_numpy()
    duplicate_of = np.full(len(units), None, dtype=object)

    # Exact duplicates: the first unit per key in (judged first, then id) order is the original.
    candidates = units[keep].assign(is_protected=lambda u: u["parent_id"].isin(protected))
    candidates = candidates.sort_values(["is_protected", "doc_id"], ascending=[False, True])
    exact = candidates.duplicated("exact_key") & ~candidates["is_protected"]
    report.counts["exact_duplicates"] = int(exact.sum())
    originals = candidates.drop_duplicates("exact_key").set_index("exact_key")["doc_id"]
    duplicate_of[candidates.index[exact]] = originals.loc[candidates.loc[exact, "exact_key"]].to_numpy()

    distinct = np.flatnonzero(keep & pd.isna(duplicate_of))
    near = 0
    for group in near_duplicate_components(signatures[distinct], config.bands, config.jaccard_threshold):
        rows = distinct[group]
        ranked = sorted(rows, key=lambda r: _keep_order(parent_ids[r], protected) + (doc_ids[r],))
        for other in ranked[1:]:
            if parent_ids[other] not in protected:
                duplicate_of[other] = doc_ids[ranked[0]]
                near += 1
                if len(report.duplicate_examples) < 10:
                    report.duplicate_examples.append((doc_ids[ranked[0]], doc_ids[other]))
    report.counts["near_duplicates"] = near
    return keep, duplicate_of, units["words"].to_numpy()


def _kept_parents(path: Path, distinct_only: bool = False) -> list[str]:
    table = pq.read_table(path, columns=["parent_id", DUPLICATE_COLUMN])
    if distinct_only:
        table = table.filter(table.column(DUPLICATE_COLUMN).is_null())
    return table.column("parent_id").to_pylist()


def _sampled_parents(scratch: Path, distinct: np.ndarray, config: CleaningConfig,
                     protected: set[str]) -> set[str] | None:
    """The training sample's documents among those with a distinct unit (None: every document)."""
    if config.sample_documents <= 0:
        return None
    parents = pq.read_table(scratch, columns=["parent_id"]).column("parent_id").to_numpy(zero_copy_only=False)
    return sample_ids(dict.fromkeys(parents[distinct]), config.sample_documents, protected, config.seed)


def _copy_kept(scratch: Path, keep: np.ndarray, duplicate_of: np.ndarray, sample: set[str] | None,
               out_path: Path) -> tuple[str, int]:
    """Pass 3: stream the kept units into `out_path`, each with what it duplicates and marked in or
    out of the training sample; returns the content fingerprint (of the units, not of the sample)
    and the units in the sample."""
    digest = hashlib.sha256()
    sampled = 0
    source = pq.ParquetFile(scratch)
    offset = 0
    schema = pa.schema([*(source.schema_arrow.field(name) for name in UNIT_COLUMNS),
                        pa.field(DUPLICATE_COLUMN, pa.string()), pa.field(SAMPLE_COLUMN, pa.bool_())])
    with pq.ParquetWriter(out_path, schema) as writer:
        for batch in source.iter_batches(columns=UNIT_COLUMNS):
            mask = keep[offset: offset + batch.num_rows]
            duplicates = duplicate_of[offset: offset + batch.num_rows][mask].tolist()
            offset += batch.num_rows
            kept = batch.filter(pa.array(mask))
            if kept.num_rows:
                parents = kept.column("parent_id").to_pylist()
                in_sample = pa.array([original is None and (sample is None or parent in sample)
                                      for parent, original in zip(parents, duplicates, strict=True)])
                sampled += sum(in_sample.to_pylist())
                writer.write_batch(pa.RecordBatch.from_arrays(
                    [*kept.columns, pa.array(duplicates, pa.string()), in_sample], schema=schema))
                rows = kept.select(["doc_id", "title", "text"]).to_pandas()
                digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16], sampled
