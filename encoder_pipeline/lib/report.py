"""The decision report's arithmetic and figures: rank fusion, paired significance, migration overlap,
the promotion rule and the plots (PNG bytes, embeddable in markdown).

Runs are `{query_id: {doc_id: score}}` (see `lib.metrics`); per-query rows are what
`lib.metrics.evaluate` returns as its second value (`{query_id: {"ndcg@10": ..., ...}}`). Metrics
themselves are never computed here: this module only combines runs and compares what pytrec_eval
measured.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np

Run = dict[str, dict[str, float]]
PerQuery = Mapping[str, Mapping[str, float] | float]

RRF_K = 60


def _ranked(docs: Mapping[str, float]) -> list[str]:
    """Documents by descending score; ties broken by id so fusion is deterministic."""
    return [doc for doc, _ in sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))]


def rrf_fuse(runs: Sequence[Run], k: int = RRF_K, depth: int | None = 100) -> Run:
    """Reciprocal-rank fusion: a document scores sum(1 / (k + rank)) over the runs that return it
    (rank from 1), so systems on incomparable score scales (BM25, cosine) combine by rank alone.

    Cormack, Clarke & Buettcher, "Reciprocal Rank Fusion outperforms Condorcet and individual rank
    learning methods", SIGIR 2009 (k = 60). Usage: `rrf_fuse([bm25_run(...), dense_run])`.
    """
    fused: Run = {}
    for qid in dict.fromkeys(q for run in runs for q in run):
        scores: dict[str, float] = {}
        for run in runs:
            for rank, doc in enumerate(_ranked(run.get(qid, {})), start=1):
                scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
        kept = _ranked(scores)[:depth] if depth else _ranked(scores)
        fused[qid] = {doc: scores[doc] for doc in kept}
    return fused


def _values(per_query: PerQuery, qids: Sequence[str], metric: str) -> np.ndarray:
    """One value per query; a query a system returned nothing for scores 0 (as trec_eval counts it)."""
    out = []
    for qid in qids:
        row = per_query.get(qid)
        if row is None:
            out.append(0.0)
        else:
            out.append(float(row[metric]) if isinstance(row, Mapping) else float(row))
    return np.asarray(out, dtype=np.float64)


def paired_randomization_test(per_query_a: PerQuery, per_query_b: PerQuery, iterations: int = 10000,
                              seed: int = 0, metric: str = "ndcg@10") -> tuple[float, float]:
    """Two-sided paired randomization (sign-flip permutation) test over queries.

    Returns (mean of a - b, p). Under the null hypothesis the two systems are exchangeable per query,
    so each query's difference keeps or flips its sign with equal chance; p is the share of the
    `iterations` relabelings whose |mean difference| reaches the observed one, counted with the
    observed labeling itself ((hits + 1) / (iterations + 1)), so p is never 0 and identical systems
    get p = 1. Smucker, Allan & Carterette, "A comparison of statistical significance tests for
    information retrieval evaluation", CIKM 2007.

    `per_query_*`: `{qid: row}` from `evaluate` (reads `metric`) or `{qid: value}`; the union of
    query ids is compared, a missing query counting 0.
    """
    qids = sorted(set(per_query_a) | set(per_query_b))
    if not qids:
        return 0.0, 1.0
    diff = _values(per_query_a, qids, metric) - _values(per_query_b, qids, metric)
    observed = float(diff.mean())
    rng = np.random.default_rng(seed)
    threshold = abs(observed) - 1e-12
    hits, done, chunk = 0, 0, max(1, min(iterations, 2_000_000 // len(qids)))
    while done < iterations:
        size = min(chunk, iterations - done)
        signs = rng.integers(0, 2, size=(size, len(qids)), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ diff) / len(qids) >= threshold).sum())
        done += size
    return observed, (hits + 1) / (iterations + 1)


def bootstrap_interval(per_query: PerQuery, qids: Sequence[str], iterations: int = 2000, seed: int = 0,
                       metric: str = "ndcg@10", level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `metric` over `qids` (queries resampled with
    replacement; a query the system answered nothing for counts 0): how far the figure could move on
    another sample of queries of the same kind. Efron & Tibshirani 1993, ch. 13."""
    if not qids:
        return 0.0, 0.0
    values = _values(per_query, qids, metric)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(iterations, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def judged_share(run: Run, qrels: Mapping[str, Mapping[str, int]], k: int = 10) -> float:
    """Pool coverage: the share of a system's top-k, over the judged queries, that a judgment covers
    (relevant or not). Below 1, its figure counts unjudged documents as non-relevant, so a system
    that was not pooled is scored low for what no one looked at (Buckley & Voorhees 2004)."""
    shares = []
    for qid, judged in qrels.items():
        top = _ranked(run.get(qid, {}))[:k]
        if top:
            shares.append(sum(doc in judged for doc in top) / len(top))
    return float(np.mean(shares)) if shares else 0.0


def migration(old_run: Run, new_run: Run, k: int = 10) -> dict[str, float]:
    """How much a new encoder changes what users see, on the queries both runs answered.

    `top10_overlap`: mean |old top-k ∩ new top-k| / k (k shrinks to the longer list when both are
    shorter); `top1_agreement`: share of queries whose first result is the same document.
    """
    overlaps, agreements = [], []
    for qid in sorted(set(old_run) & set(new_run)):
        old, new = _ranked(old_run[qid])[:k], _ranked(new_run[qid])[:k]
        if not old and not new:
            continue
        overlaps.append(len(set(old) & set(new)) / max(len(old), len(new)))
        agreements.append(bool(old and new and old[0] == new[0]))
    return {
        "top10_overlap": float(np.mean(overlaps)) if overlaps else 0.0,
        "top1_agreement": float(np.mean(agreements)) if agreements else 0.0,
        "queries": len(overlaps),
    }


def ladder_significance(per_query: Mapping[str, PerQuery], chain: Sequence[str], baseline: str,
                        iterations: int = 10000, seed: int = 0, metric: str = "ndcg@10"
                        ) -> dict[str, dict[str, float | str | None]]:
    """Each system in `chain` (the baseline first, then the rungs in ladder order) against the one
    below it and against `baseline`: mean difference and randomization-test p."""
    rows: dict[str, dict[str, float | str | None]] = {}
    for position, name in enumerate(chain):
        below = chain[position - 1] if position else None
        row: dict[str, float | str | None] = {"below": below, "diff_vs_below": None,
                                              "p_vs_below": None, "diff_vs_baseline": None,
                                              "p_vs_baseline": None}
        if below is not None:
            row["diff_vs_below"], row["p_vs_below"] = paired_randomization_test(
                per_query[name], per_query[below], iterations, seed, metric)
        if name != baseline:
            row["diff_vs_baseline"], row["p_vs_baseline"] = paired_randomization_test(
                per_query[name], per_query[baseline], iterations, seed, metric)
        rows[name] = row
    return rows


def regressions_in_words(significance: Mapping[str, Mapping], scores: Mapping[str, float],
                         alpha: float = 0.05) -> list[str]:
    """One sentence for each system that scores below the one beneath it in the chain."""
    sentences = []
    for name, row in significance.items():
        below, diff = row.get("below"), row.get("diff_vs_below")
        if below is None or diff is None or diff >= 0:
            continue
        p = row["p_vs_below"]
        verdict = ("significant" if p < alpha else "not significant; within noise at this many queries")
        sentences.append(f"{name} is worse than {below}: nDCG@10 {scores[name]:.3f} vs "
                         f"{scores[below]:.3f} ({diff:+.3f}, p = {p:.3f}, {verdict}).")
    return sentences


PROMOTION_TOLERANCE = 0.01  # nDCG@10 a candidate may fall below what it replaces and still be promoted


def safe_to_promote(candidate: float, off_the_shelf: float, currently_served: float | None,
                    tolerance: float) -> tuple[bool, str]:
    """Promotion rule: the candidate's eval nDCG@10 is not below the currently served index's (when
    one is served) nor below the off-the-shelf model's by more than `tolerance`."""
    problems = []
    if candidate < off_the_shelf - tolerance:
        problems.append(f"{candidate:.4f} is below the off-the-shelf model's {off_the_shelf:.4f} by "
                        f"more than {tolerance}")
    if currently_served is not None and candidate < currently_served - tolerance:
        problems.append(f"{candidate:.4f} is below the currently served index's "
                        f"{currently_served:.4f} by more than {tolerance}")
    if problems:
        return False, "not promoted: " + "; ".join(problems)
    served = (f", currently served {currently_served:.4f}" if currently_served is not None
              else ", nothing served yet")
    return True, (f"candidate {candidate:.4f} vs off-the-shelf {off_the_shelf:.4f}{served} "
                  f"(tolerance {tolerance})")


# Figures ---------------------------------------------------------------------------------------------

def _figure(width: float = 6.4, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def ladder_figure(scores: Mapping[str, float], target: float | None = None,
                  title: str = "nDCG@10 on the eval set"):
    """Bars: nDCG@10 per system (in the given order), with the committed target as a line; the
    legend sits outside the axes, so it never hides a bar."""
    fig, ax = _figure(max(6.4, 0.9 * len(scores) + 1.5))
    names = list(scores)
    bars = ax.bar(range(len(names)), [scores[n] for n in names], color="#4c72b0")
    for bar, name in zip(bars, names, strict=True):
        ax.annotate(f"{scores[name]:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    if target is not None:
        ax.axhline(target, color="#c44e52", linestyle="--", label=f"target {target:.2f}")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), fontsize=8, frameon=False)
    # Long names wrap at their underscores and at " (": neighbouring labels never run into each other.
    ax.set_xticks(range(len(names)), [n.replace("_", "\n").replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("nDCG@10")
    ax.set_title(title, fontsize=10)
    return fig


def ladder_png(scores: Mapping[str, float], target: float | None = None,
               title: str = "nDCG@10 on the eval set") -> bytes:
    return _png(ladder_figure(scores, target, title))


def sweep_figure(points: Sequence[Mapping], chosen: Mapping | None = None,
                 target_ndcg: float | None = None, target_mb: float | None = None):
    """nDCG@10 against index MB (log x) for every dims x precision point of the sweep: eval (filled)
    and dev (hollow); only the chosen point is labelled (dims/precision) and ringed, since labels on
    every point overlap into a cluster; the committed targets as lines; the legend outside the axes."""
    fig, ax = _figure(7.6)
    mb = [p["bytes"] / 1e6 for p in points]
    ax.scatter(mb, [p["eval"]["ndcg@10"] for p in points], color="#4c72b0", label="eval", zorder=3)
    ax.scatter(mb, [p["dev"]["ndcg@10"] for p in points], facecolors="none", edgecolors="#55a868",
               label="dev (chosen on)", zorder=3)
    if chosen is not None:
        x, y = chosen["bytes"] / 1e6, chosen["eval"]["ndcg@10"]
        ax.scatter([x], [y], s=180, facecolors="none", edgecolors="#c44e52", linewidths=2,
                   label="chosen", zorder=4)
        ax.annotate(f"{chosen['dims']} dims, {chosen['precision']}", (x, y), fontsize=8,
                    xytext=(8, -12), textcoords="offset points", color="#c44e52")
    if target_ndcg is not None:
        ax.axhline(target_ndcg, color="#c44e52", linestyle="--", linewidth=1, label=f"target {target_ndcg:g}")
    if target_mb is not None:
        ax.axvline(target_mb, color="#8172b2", linestyle=":", linewidth=1, label=f"{target_mb} MB")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # Labels at 1, 2, 5 x 10^k only: every minor label of a log axis crowds the next one.
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("index MB (every served byte, log scale)")
    ax.set_ylabel("nDCG@10")
    ax.set_title("Index sweep: quality vs size", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    return fig


def sweep_png(points: Sequence[Mapping], chosen: Mapping | None = None,
              target_ndcg: float | None = None, target_mb: float | None = None) -> bytes:
    return _png(sweep_figure(points, chosen, target_ndcg, target_mb))


def latency_png(times_ms: Sequence[float], target_ms: float | None = None) -> bytes:
    """Histogram of per-query served latency (encode + search), with p50, p95 and the target."""
    fig, ax = _figure()
    times = np.asarray(times_ms, dtype=np.float64)
    ax.hist(times, bins=min(40, max(5, len(times) // 5)), color="#4c72b0")
    if len(times):
        for q, style in ((50, ":"), (95, "-")):
            value = float(np.percentile(times, q))
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=f"p{q} {value:.1f} ms")
    if target_ms is not None:
        ax.axvline(target_ms, color="#c44e52", linestyle="--", label=f"target {target_ms:g} ms")
    ax.set_xlabel("ms per query (encode + search, one at a time, warm, no cache)")
    ax.set_ylabel("queries")
    ax.set_title(f"Served latency over {len(times)} distinct queries", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)


def md_image(png: bytes, alt: str) -> str:
    """A PNG inline in markdown, as Dagster's UI renders it in `MetadataValue.md` (data: URIs are
    allowed for images by its markdown sanitizer)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
