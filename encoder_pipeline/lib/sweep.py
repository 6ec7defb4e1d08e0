"""The index sweep: every Matryoshka width x precision, measured, and the rule that picks one to serve.

Vectors in, points out (no Dagster). Each point is one `lib.index` configuration built over the whole
corpus and measured the way it would be served:

- quality: nDCG@10 and Recall@100 (pytrec_eval through `lib.metrics.evaluate`) on each query set
  given (the dev slice, which chooses, and the eval set, which only reports), and the fraction of
  the fp32 full-width point's figures each keeps (`<set>_ndcg_retained`, `<set>_recall_retained`);
- size: every byte a server loads (`lib.index.served_bytes`: index, rescoring vectors, id map);
- speed: per-query latency = that query's encode time (measured once by the caller, identical
  across points) + this point's search time for the same query (one query at a time, warm, one
  thread); p50/p95 over those sums.

    points = sweep(corpus_vectors, {"dev": QuerySet(dev_vectors, dev_ids, dev_qrels)}, parents,
                   latency_vectors, encode_ms)
    chosen, why = choose(points, spec.targets, full_dim=corpus_vectors.shape[1])
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from encoder_pipeline.lib.index import (
    PRECISIONS,
    RESCORE_MULTIPLIER,
    LoadedIndex,
    build_quantized,
    index_configs,
    save_index,
    served_bytes,
    vector_bytes,
)
from encoder_pipeline.lib.metrics import Qrels, evaluate, one_thread, to_parent_run
from encoder_pipeline.lib.report import PROMOTION_TOLERANCE

Point = dict[str, Any]

@dataclass
class QuerySet:
    """Queries embedded at full width (normalized), their ids, and document-level qrels."""

    vectors: np.ndarray
    query_ids: list[str]
    qrels: Qrels


def latency_queries(queries: Sequence[str], titles: Sequence[str], wanted: int, seed: int) -> list[str]:
    """Distinct timing queries: the given queries, topped up with sampled corpus titles when too few."""
    distinct = list(dict.fromkeys(queries))
    if len(distinct) < wanted:
        taken = set(distinct)
        pool = [t for t in dict.fromkeys(titles) if t and t not in taken]
        rng = np.random.default_rng(seed)
        extra = rng.choice(len(pool), size=min(wanted - len(distinct), len(pool)), replace=False)
        distinct += [pool[i] for i in extra]
    return distinct[:wanted]


def time_encoding(encode_one: Callable[[str], np.ndarray], queries: Sequence[str], warmup: int = 5
                  ) -> tuple[np.ndarray, list[float]]:
    """Each query encoded alone (warm, one thread): its vector and its milliseconds."""
    vectors, times = [], []
    with one_thread():
        for query in queries[:warmup]:
            encode_one(query)
        for query in queries:
            started = time.perf_counter()
            vector = encode_one(query)
            times.append((time.perf_counter() - started) * 1000)
            vectors.append(np.asarray(vector, dtype=np.float32).reshape(-1))
    return np.stack(vectors), times


def time_search(index: LoadedIndex, vectors: np.ndarray, k: int = 10, warmup: int = 5) -> list[float]:
    """Milliseconds per query of `index.search`, one query at a time, warm, on one thread."""
    times = []
    with one_thread():
        for vector in vectors[:warmup]:
            index.search(vector[None, :], k)
        for vector in vectors:
            started = time.perf_counter()
            index.search(vector[None, :], k)
            times.append((time.perf_counter() - started) * 1000)
    return times


def _retained(value: float, reference: float) -> float:
    return float(value / reference) if reference > 0 else 1.0


def sweep(corpus_vectors: np.ndarray, query_sets: Mapping[str, QuerySet], parents: Sequence[str],
          latency_vectors: np.ndarray, encode_latency_ms: Sequence[float],
          dims: Sequence[int] | None = None, precisions: Sequence[str] = PRECISIONS,
          ids: Sequence[str] | None = None, titles: Sequence[str] | None = None,
          k: int = 100, latency_k: int = 10, rescore_multiplier: int = RESCORE_MULTIPLIER
          ) -> list[Point]:
    """Every configuration of `lib.index.index_configs` (plus fp32 at full width, the reference),
    built over `corpus_vectors` and measured; returns one point per configuration, widest first.

    Args:
        corpus_vectors: (n, d) full-width normalized embeddings, one row per unit.
        query_sets: name -> QuerySet (e.g. "dev", "eval"); each is searched top-`k` and scored at the
            document level (`parents`: row -> judged document id).
        latency_vectors: (m, d) embeddings of the timing queries, aligned with `encode_latency_ms`.
        ids, titles: the id map a server loads (counted in `bytes`); default the parents, no titles.

    Each point: dims, precision, name, bytes (served), vector_bytes (index + rescoring files),
    build_seconds, p50_ms / p95_ms (encode + search), search_p50_ms / search_p95_ms, and per query
    set `<set>: {"ndcg@10", "recall@100"}`, `<set>_ndcg_retained`, `<set>_recall_retained`.
    """
    corpus_vectors = np.asarray(corpus_vectors, dtype=np.float32)
    n, full_dim = corpus_vectors.shape
    if len(latency_vectors) != len(encode_latency_ms):
        raise ValueError(f"{len(latency_vectors)} latency vectors but {len(encode_latency_ms)} encode times")
    ids = list(ids) if ids is not None else list(parents)
    titles = list(titles) if titles is not None else [""] * n
    configs = index_configs(full_dim, n, dims, precisions)
    if not any(c.dims == full_dim and c.precision == "fp32" for c in configs):
        configs = [*index_configs(full_dim, n, [full_dim], ["fp32"]), *configs]
    encode_ms = np.asarray(encode_latency_ms, dtype=np.float64)
    points: list[Point] = []
    with tempfile.TemporaryDirectory() as work:
        for number, config in enumerate(configs):
            started = time.perf_counter()
            index = build_quantized(corpus_vectors, config.dims, config.precision, ids, parents, titles,
                                    rescore_multiplier=rescore_multiplier)
            build_seconds = time.perf_counter() - started
            folder = f"{work}/{number}"
            save_index(folder, index, ids, parents, titles, "sweep", config.precision, build_seconds)
            point: Point = {"dims": config.dims, "precision": config.precision, "name": config.name,
                            "bytes": served_bytes(folder), "vector_bytes": vector_bytes(folder),
                            "build_seconds": float(build_seconds)}
            for name, queries in query_sets.items():
                hits = index.bulk_search(queries.vectors, k)
                means, _ = evaluate(to_parent_run(hits, queries.query_ids, parents), queries.qrels)
                point[name] = {"ndcg@10": means["ndcg@10"], "recall@100": means["recall@100"]}
            search_ms = np.asarray(time_search(index, latency_vectors, latency_k), dtype=np.float64)
            total = encode_ms + search_ms
            point.update({
                "p50_ms": float(np.percentile(total, 50)), "p95_ms": float(np.percentile(total, 95)),
                "search_p50_ms": float(np.percentile(search_ms, 50)),
                "search_p95_ms": float(np.percentile(search_ms, 95)),
            })
            points.append(point)
    reference = reference_point(points, full_dim)
    for point in points:
        for name in query_sets:
            point[f"{name}_ndcg_retained"] = _retained(point[name]["ndcg@10"], reference[name]["ndcg@10"])
            point[f"{name}_recall_retained"] = _retained(point[name]["recall@100"],
                                                         reference[name]["recall@100"])
    return points


def reference_point(points: Sequence[Point], full_dim: int) -> Point:
    """fp32 at full width: exact search, what every other point is compared with."""
    for point in points:
        if point["precision"] == "fp32" and point["dims"] == full_dim:
            return point
    raise ValueError(f"no fp32 point at full width {full_dim} among the sweep's points")


def _target(targets: Any, name: str) -> float:
    return float(targets[name] if isinstance(targets, Mapping) else getattr(targets, name))


MIN_RETAINED = 0.95  # of the fp32 full-width dev nDCG@10: compression may not cost more than this
# ... nor more than this, absolute: what the promotion gate forgives by default. 5% of 0.5 is 0.025,
# more than training buys on most domains: on three unseen corpora the rule served the base model at
# 192 dims, 0.006-0.019 below it at full width (one at p = 0.04), and the gate then refused it.
MAX_LOSS = PROMOTION_TOLERANCE
# Recall@100 keeps the same share: binary candidates rescored at nDCG@10 parity can still drop
# positives out of the top 100 a reranker reads (the untitled manual, seed 2: binary+int8 @ 384 kept
# 102% of dev nDCG@10 and 95% of its Recall@100; on the FAQ, 0.90 against exact search's 0.96).

# How faithful a precision is to exact search, for the quality-first choices below. fp16 ranks with
# fp32: half precision moves a unit vector's cosines by ~1e-4, and no sweep's ranking has shown it.
PRECISION_FIDELITY = {"fp32": 4, "fp16": 4, "int8": 3, "binary+fp32": 2, "binary+int8": 1, "ivfpq": 0}

CHOICE_RULE = (
    f"Chosen on the dev slice, never the eval set, among configurations keeping >= {MIN_RETAINED:.0%} "
    f"of the fp32 full-width dev nDCG@10 (losing at most {MAX_LOSS} of it) and of its dev Recall@100: "
    "the smallest (served bytes) whose dev nDCG@10 >= the target, p95 latency (encode + search) <= "
    "the target and size <= the target MB; if none meets all three, the least compressed (widest, "
    "then most precise; fp16 counts as exact) among those meeting size and latency, else among those "
    "meeting size (query encoding alone can exceed the latency, which no index fixes); if no "
    "candidate fits the size, the smallest candidate. A configuration larger than fp32 at full width "
    "is never a candidate."
)


def choose(points: Sequence[Point], targets: Any, full_dim: int, on: str = "dev",
           min_retained: float = MIN_RETAINED, max_loss: float = MAX_LOSS) -> tuple[Point, str]:
    """The configuration to serve, and why, judged on the `on` query set (the dev slice).

    `targets` has `ndcg_at_10`, `p95_latency_ms` and `index_mb` (a domain's `Targets` or a mapping).
    "Size" is served bytes / 1e6 <= index_mb; "latency" is p95_ms (encode + search) <= p95_latency_ms.

    Only points keeping >= `min_retained` of the fp32 full-width point's nDCG@10 and of its
    Recall@100, and losing at most `max_loss` of its nDCG@10, are candidates: a target met by a
    compressed index that loses to the uncompressed one is not a good trade (and the report's
    promotion gate would refuse it against the off-the-shelf model). Nor are points larger than the
    fp32 full-width one, which they can only approximate.

    1. Every target met: the fewest bytes (ties: higher nDCG@10, then lower p95).
    2. Else, within size and latency: the least compressed (widest, then most precise; ties: fewer
       bytes). Once a target is out of reach, quality is what the index can still keep, and among
       candidates that all keep the exact quality on dev, their dev differences are noise: picking
       the best of them served `biomedical` int8 @ 192 (dev +0.008 over fp32, eval -0.005) where
       int8 @ 384 fit the size, and "the fewest bytes reaching the target on dev" served `web_qa`
       int8 @ 192 at 0.686 where fp16 @ 384 fit at 0.708 (seed 1, from the sweep's eval figures).
    3. Else, within size (no point meets latency there: usually query encoding alone exceeds it,
       which no index choice fixes): the least compressed, as in 2.
    4. Else (no candidate fits the size): the smallest candidate. Not fp32 at full width: on `code`
       (5 MB target) that served 21 MB where int8 @ 384, 5.4 MB, kept 99.96% of it.
    """
    ndcg_target, p95_target = _target(targets, "ndcg_at_10"), _target(targets, "p95_latency_ms")
    mb_target = _target(targets, "index_mb")

    def ndcg(point: Point) -> float:
        return point[on]["ndcg@10"]

    def recall(point: Point) -> float:
        return point[on]["recall@100"]

    def smallest(candidates: list[Point]) -> Point:
        return min(candidates, key=lambda p: (p["bytes"], -ndcg(p), p["p95_ms"]))

    def least_compressed(candidates: list[Point]) -> Point:
        return max(candidates, key=lambda p: (p["dims"], PRECISION_FIDELITY[p["precision"]], -p["bytes"]))

    def described(point: Point) -> str:
        return (f"{point['name']} ({point['bytes'] / 1e6:.3f} MB, {on} nDCG@10 {ndcg(point):.4f}, "
                f"p95 {point['p95_ms']:.2f} ms)")

    exact = reference_point(points, full_dim)
    floor = max(min_retained * ndcg(exact), ndcg(exact) - max_loss)
    # A point larger than exact search (a rescoring index keeps fp32 vectors besides its own)
    # can only approximate it: a higher dev figure there is noise, not a reason to serve more bytes.
    keeping = [p for p in points if ndcg(p) >= floor and recall(p) >= min_retained * recall(exact)
               and (p is exact or p["bytes"] < exact["bytes"])]
    sized = [p for p in keeping if p["bytes"] / 1e6 <= mb_target]
    fast = [p for p in sized if p["p95_ms"] <= p95_target]
    good = [p for p in fast if ndcg(p) >= ndcg_target]
    if good:
        chosen = smallest(good)
        return chosen, f"smallest configuration meeting every target on {on}: {described(chosen)}"
    if fast:
        chosen = least_compressed(fast)
        return chosen, (f"no configuration within {mb_target} MB and p95 {p95_target} ms reaches "
                        f"nDCG@10 {ndcg_target} on {on}; the least compressed there: {described(chosen)}")
    if sized:
        chosen = least_compressed(sized)
        return chosen, (f"no configuration within {mb_target} MB meets p95 {p95_target} ms (query "
                        f"encoding p95 alone may exceed it); the least compressed within the size: "
                        + described(chosen))
    chosen = smallest(keeping)
    return chosen, (f"no configuration within {mb_target} MB keeps the fp32 full-width quality on {on}; "
                    f"the smallest that does: {described(chosen)}")


def points_frame(points: Sequence[Point], sets: Sequence[str] = ("dev", "eval")) -> pd.DataFrame:
    """One row per point: width, precision, MB, p50/p95, each set's nDCG@10 / Recall@100 / retained."""
    rows = []
    for p in points:
        row = {"dims": p["dims"], "precision": p["precision"], "MB": p["bytes"] / 1e6,
               "build s": p["build_seconds"], "p50 ms": p["p50_ms"], "p95 ms": p["p95_ms"]}
        for name in sets:
            if name in p:
                row[f"{name} nDCG@10"] = p[name]["ndcg@10"]
                row[f"{name} R@100"] = p[name]["recall@100"]
                row[f"{name} nDCG kept"] = p[f"{name}_ndcg_retained"]
        rows.append(row)
    return pd.DataFrame(rows)
