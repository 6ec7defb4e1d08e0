"""The decision report as data and as a page: `build_report(...)` turns evaluated systems and the
serving measurements into the report (a JSON-able dict), `render(report, image)` into markdown.

The report answers "was training worth it?" on two haystacks (`lib.evaluation`): the ladder
(baselines, extra models, every rung, each with a paired randomization test against the rung below
and against the off-the-shelf model) on the training sample, and what users would get (the candidate
index, the index served now, the baselines, the hybrid) on the whole corpus. The targets, the
verdict and the promotion rule are judged on the whole-corpus figures.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from encoder_pipeline.lib import report as stats
from encoder_pipeline.lib.evaluation import CORPUS, SAMPLE, Evaluated

CANDIDATE = "served_index"
CURRENTLY_SERVED = "currently_served"
HYBRID = "hybrid_bm25_served"
TEACHER = "teacher"  # the teacher off the shelf: the ceiling, on the training sample
TARGET_NAMES = {"ndcg_at_10": ("nDCG@10", "ndcg@10", ">="), "p95_latency_ms": ("p95 latency ms", "p95_ms", "<="),
                "index_mb": ("index MB", "index_mb", "<="),
                "usd_per_1k_queries": ("$/1k queries", "usd_per_1k_queries", "<=")}


def baseline_name(haystack: str) -> str:
    """The off-the-shelf model's system on a haystack (on the whole corpus when it differs)."""
    return "off_the_shelf" if haystack == SAMPLE else "off_the_shelf@corpus"


@dataclass(frozen=True)
class Serving:
    """What a system costs to serve, measured on the whole corpus."""

    p50_ms: float
    p95_ms: float
    index_mb: float
    usd_per_1k_queries: float


def verdict(target: float, off_the_shelf: float, served: Mapping[str, Any]) -> str:
    """One sentence: does the off-the-shelf model clear the bar, does the trained system, or neither."""
    trained = served["ndcg@10"]
    if served.get("fine_tuned_weight") == 0.0:  # the rung's dev-slice merge chose the base model
        detectable = served.get("detectable_gain")
        return ("Training did not beat the off-the-shelf model on the dev slice beyond noise"
                + (f" (a slice on which only a gain above ~{detectable:.3f} could show)" if detectable else "")
                + f", so the served encoder is the off-the-shelf model itself (its index compressed): nDCG@10 "
                f"{trained:.3f} vs off-the-shelf {off_the_shelf:.3f}, target {target:.3f}; "
                + ("the off-the-shelf model already clears it." if off_the_shelf >= target else
                   "neither clears it."))
    if off_the_shelf >= target:
        return (f"The off-the-shelf model already clears the bar: nDCG@10 {off_the_shelf:.3f} >= "
                f"{target:.3f}; training {'adds' if trained > off_the_shelf else 'does not add'} "
                f"({trained:.3f}).")
    if trained >= target and all(served["targets_met"].values()):
        return (f"Train: the trained encoder meets every target (nDCG@10 {trained:.3f} >= "
                f"{target:.3f}); the off-the-shelf model does not ({off_the_shelf:.3f}).")
    missed = [name for name, ok in served["targets_met"].items() if not ok]
    return (f"Neither clears every target: off-the-shelf {off_the_shelf:.3f}, trained "
            f"{trained:.3f} vs {target:.3f}; missed: {', '.join(missed)}.")


def build_report(*, facts: Mapping[str, Any], haystacks: Mapping[str, dict], results: Mapping[str, Evaluated],
                 rungs: list[str], candidate: Mapping[str, Any], serving: Mapping[str, Serving],
                 targets: Mapping[str, float], currently_served: dict | None, tolerance: float,
                 iterations: int, seed: int, teacher: Mapping[str, Any] | None = None,
                 qrels: Mapping[str, Mapping[str, int]] | None = None, base_model_rungs: Sequence[str] = (),
                 **extra: Any) -> dict[str, Any]:
    """The report. `facts`: domain, unit, query form, relevance, eval queries, evidence. `results`:
    every system evaluated (see lib.evaluation). `candidate`: the candidate index's choice (rung,
    revision, dims, precision). `serving`: `Serving` of the candidate and of the off-the-shelf model
    (keys CANDIDATE and "off_the_shelf"). `currently_served`: the served version's info, with its
    recorded nDCG@10, or None. `teacher`: the teacher that trained the rungs (model, fallback); when
    it is not the base model, `results` and `serving` carry it as TEACHER. `qrels`: the eval
    judgments, for each system's evidence (queries behind its figure, a bootstrap interval, the
    judged share of its top-10). `base_model_rungs`: rungs whose dev-slice merge kept the base model
    (their differences from it, and from each other, are rounding, not a gain or a loss). `extra`
    (sweep, latency, costs, ...) is stored as given."""
    systems = {name: {**r.means, "haystack": r.haystack} for name, r in results.items()}
    per_query = {name: r.per_query for name, r in results.items()}
    baseline = baseline_name(CORPUS if "off_the_shelf@corpus" in results else SAMPLE)
    chain = ["off_the_shelf", *rungs]
    significance = stats.ladder_significance(per_query, chain, "off_the_shelf", iterations, seed)
    vs_baseline = {name: stats.paired_randomization_test(
        per_query[name], per_query["off_the_shelf" if r.haystack == SAMPLE else baseline], iterations, seed)
        for name, r in results.items() if name not in ("off_the_shelf", baseline)}
    served = {**results[CANDIDATE].means, **candidate, **vars(serving[CANDIDATE])}
    before = {**results[baseline].means, **vars(serving["off_the_shelf"])}
    qids = sorted(qrels or {})
    evidence = {name: {"queries": len(qids),
                       **dict(zip(("ndcg@10_low", "ndcg@10_high"),
                                  stats.bootstrap_interval(r.per_query, qids, seed=seed), strict=True)),
                       "judged@10": stats.judged_share(r.run, qrels or {})}
                for name, r in results.items()} if qids else {}
    served["targets_met"] = {name: (served[key] >= targets[name] if rule == ">=" else served[key] <= targets[name])
                             for name, (_, key, rule) in TARGET_NAMES.items()}
    if teacher is not None and TEACHER in results:
        diff, p = vs_baseline[TEACHER]
        teacher = {**teacher, **results[TEACHER].means, "haystack": results[TEACHER].haystack,
                   "diff_vs_off_the_shelf": diff, "p_vs_off_the_shelf": p, **vars(serving[TEACHER])}
    current_ndcg = None
    if currently_served is not None:
        current_ndcg = (results[CURRENTLY_SERVED].means["ndcg@10"] if CURRENTLY_SERVED in results
                        else currently_served["recorded_ndcg@10"])
        currently_served = {**currently_served, "ndcg@10": current_ndcg,
                            "remeasured": CURRENTLY_SERVED in results}
    safe, reason = stats.safe_to_promote(served["ndcg@10"], before["ndcg@10"], current_ndcg, tolerance)
    old = CURRENTLY_SERVED if CURRENTLY_SERVED in results else baseline
    old_label = (f"currently served ({currently_served['rung']}, {currently_served['revision'][:12]})"
                 if old == CURRENTLY_SERVED else "off-the-shelf (base model, fp32 flat)")
    return {
        **facts,
        "haystacks": dict(haystacks),
        "systems": systems,
        "ladder": {name: {"ndcg@10": systems[name]["ndcg@10"], **significance[name],
                          "p_vs_off_the_shelf": vs_baseline.get(name, (None, None))[1]} for name in chain},
        "significance_vs_off_the_shelf": {name: {"diff": d, "p": p} for name, (d, p) in vs_baseline.items()},
        "randomization_iterations": iterations,
        "base_model_rungs": list(base_model_rungs),
        "regressions": stats.regressions_in_words(
            {n: row for n, row in significance.items() if not _same_model(base_model_rungs, n, row["below"])},
            {n: systems[n]["ndcg@10"] for n in chain}),
        "hybrid": {"system": HYBRID, "fusion": f"reciprocal rank, k={stats.RRF_K}",
                   "runs": [f"bm25{'@corpus' if baseline.endswith('@corpus') else ''}", CANDIDATE],
                   **systems[HYBRID]},
        "before": before, "after": served,
        "targets": dict(targets),
        "targets_pass_fail": {label: {"target": targets[name], "value": served[key], "rule": rule,
                                      "passed": served["targets_met"][name]}
                              for name, (label, key, rule) in TARGET_NAMES.items()},
        "verdict": verdict(targets["ndcg_at_10"], before["ndcg@10"], served)
        + (f" Evidence: {evidence_label(facts)}." if "evidence" in facts else ""),
        "evidence_by_system": evidence,
        "migration": {"old": old_label, "new": f"candidate served index ({candidate['rung']}, "
                      f"{candidate['revision'][:12]})",
                      **stats.migration(results[old].run, results[CANDIDATE].run)},
        "currently_served": currently_served,
        "promotion": {"safe": safe, "reason": reason, "tolerance": tolerance},
        "teacher": dict(teacher) if teacher is not None else None,
        **extra,
    }


def evidence_label(facts: Mapping[str, Any]) -> str:
    """What the verdict rests on, e.g. "human-judged, 150 queries"."""
    kind = {"human": "human-judged"}.get(facts["evidence"], facts["evidence"])
    return f"{kind}, {facts['eval_queries']} queries"


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _diff(value: float | str | None) -> str:
    return "" if value is None else value if isinstance(value, str) else f"{value:+.4f}"


def _same_model(base_model_rungs: Sequence[str], name: str, other: str | None) -> bool:
    """Both systems are the base model: the off-the-shelf row, or a rung whose merge kept it."""
    same = {"off_the_shelf", *base_model_rungs}
    return name in same and other in same


def systems_frame(report: Mapping[str, Any], haystacks: set[str]) -> pd.DataFrame:
    """The systems measured on these haystacks: metrics, the paired test against the rung below
    (ladder only) and against the off-the-shelf model on the same haystack; "same model" where both
    are the base model (a rung that kept it: bf16 rounding after its rotation, not a difference)."""
    rows = []
    base_rungs = report.get("base_model_rungs", [])
    for name, metrics in report["systems"].items():
        if metrics["haystack"] not in haystacks:
            continue
        ladder = report["ladder"].get(name, {})
        versus = report["significance_vs_off_the_shelf"].get(name, {})
        if _same_model(base_rungs, name, ladder.get("below")):
            ladder = {"diff_vs_below": "same model"}
        if _same_model(base_rungs, name, "off_the_shelf") and name != "off_the_shelf":
            versus = {"diff": "same model"}
        evidence = report.get("evidence_by_system", {}).get(name)
        rows.append({
            "system": f"{name} (the base model)" if name in base_rungs else name,
            **{k: round(v, 4) for k, v in metrics.items() if k != "haystack"},
            **({"queries": evidence["queries"],
                "nDCG@10 95% CI": f"{evidence['ndcg@10_low']:.3f}–{evidence['ndcg@10_high']:.3f}",
                "judged@10": round(evidence["judged@10"], 3)} if evidence else {}),
            "Δ vs below": _diff(ladder.get("diff_vs_below")), "p vs below": _p(ladder.get("p_vs_below")),
            "Δ vs off-the-shelf": _diff(versus.get("diff")), "p vs off-the-shelf": _p(versus.get("p")),
        })
    return pd.DataFrame(rows)


def sweep_frame(sweep: Mapping[str, Any]) -> pd.DataFrame:
    chosen = sweep["chosen"]
    return pd.DataFrame([{
        "": "◀ chosen" if (p["dims"], p["precision"]) == (chosen["dims"], chosen["precision"]) else "",
        "dims": p["dims"], "precision": p["precision"], "MB": round(p["bytes"] / 1e6, 3),
        "build s": round(p["build_seconds"], 2), "p50 ms": round(p["p50_ms"], 2),
        "p95 ms": round(p["p95_ms"], 2), "dev nDCG@10": round(p["dev"]["ndcg@10"], 4),
        "eval nDCG@10": round(p["eval"]["ndcg@10"], 4),
        "eval R@100": round(p["eval"]["recall@100"], 4),
        "eval nDCG kept": round(p["eval_ndcg_retained"], 4),
        "eval R@100 kept": round(p["eval_recall_retained"], 4),
    } for p in sweep["points"]])


def _haystack_words(report: Mapping[str, Any], key: str) -> str:
    hay = report["haystacks"][key]
    return f"{hay['what']}: {hay['units']:,} units of {hay['documents']:,} documents"


def teacher_words(report: Mapping[str, Any]) -> str:
    """The teacher off the shelf beside the off-the-shelf model: the ceiling, and its serving cost."""
    teacher = report.get("teacher")
    if not teacher:
        return ""
    fallback = f" {teacher['fallback']}." if teacher.get("fallback") else ""
    if "ndcg@10" not in teacher:
        return f"## The teacher\n\nThe base model taught ({teacher['model']}).{fallback}\n\n"
    off_the_shelf = report["systems"]["off_the_shelf"]["ndcg@10"]
    table = pd.DataFrame([{
        "": f"teacher off the shelf ({Path(teacher['model']).name}, fp32 flat)",
        "nDCG@10 (sample)": round(teacher["ndcg@10"], 4), "Δ vs off-the-shelf": _diff(teacher["diff_vs_off_the_shelf"]),
        "p": _p(teacher["p_vs_off_the_shelf"]), "p95 ms": round(teacher["p95_ms"], 2),
        "index MB (whole corpus)": round(teacher["index_mb"], 3),
        "$/1k queries": round(teacher["usd_per_1k_queries"], 6)}])
    return (f"## The teacher off the shelf (the ceiling)\n\nThe teacher distilled into every rung, served "
            f"as it is: what it scores on the training sample ({off_the_shelf:.4f} for the off-the-shelf "
            f"model there) and what serving it would cost (p95 timed over the sample's index; size for "
            f"every unit of the corpus at its own width).{fallback}\n\n{table.to_markdown(index=False)}\n\n")


def render(report: Mapping[str, Any], image: Callable[[str, str], str]) -> str:
    """The report as markdown; `image(file, alt)` places a figure (a link, or an inline data URI)."""
    served, before = report["after"], report["before"]
    corpus_differs = report["haystacks"][SAMPLE]["units"] != report["haystacks"][CORPUS]["units"]
    before_after = pd.DataFrame([
        {"": "off-the-shelf (fp32 flat)", "nDCG@10": before["ndcg@10"], "p95 ms": before["p95_ms"],
         "index MB": before["index_mb"], "$/1k queries": before["usd_per_1k_queries"]},
        {"": f"trained ({served['rung']}"
             + (f", {served['precision']}@{served['dims']})" if served.get("dims") else ")"),
         "nDCG@10": served["ndcg@10"], "p95 ms": served["p95_ms"], "index MB": served["index_mb"],
         "$/1k queries": served["usd_per_1k_queries"]},
    ]).round(4)
    targets = pd.DataFrame([{"target": name, "committed": f"{row['rule']} {row['target']:g}",
                             "served": round(row["value"], 4), "": "pass" if row["passed"] else "FAIL"}
                            for name, row in report["targets_pass_fail"].items()])
    migration = report["migration"]
    migration_table = pd.DataFrame([{
        "old": migration["old"], "new": migration["new"],
        "top-10 overlap": round(migration["top10_overlap"], 4),
        "top-1 agreement": round(migration["top1_agreement"], 4), "queries": migration["queries"]}])
    costs = report["build_costs"]
    regressions = report["regressions"]
    ladder_words = ("\n".join(f"- {s}" for s in regressions) if regressions else
                    "No rung scores below the one beneath it.")
    ladder_words += "".join(f"\n- **Stale:** {rung} was {why}." for rung, why in report.get("stale_rungs", {}).items())
    if report.get("base_model_rungs"):
        ladder_words += (f"\n- {', '.join(report['base_model_rungs'])}: no merge of the fine-tuned weights beat "
                         "the base model on the dev slice beyond noise, so the rung is the base model; its "
                         "differences from off-the-shelf are rounding (bf16 inference after the "
                         "variance-ordering rotation), not a gain or a loss.")
    sweep = report["sweep"]
    whole = (f"## What users get ({_haystack_words(report, CORPUS)})\n\n"
             f"The candidate index and the baselines over every unit of the corpus; the targets, the "
             f"verdict and the promotion gate use these figures.\n\n"
             f"{systems_frame(report, {CORPUS}).to_markdown(index=False)}\n\n") if corpus_differs else ""
    ladder = systems_frame(report, {SAMPLE} if corpus_differs else {SAMPLE, CORPUS})
    return (
        f"# {report['domain']}\n\nUnit: {report['unit']}. Query: {report['query_form']}. Relevant when "
        f"{report['relevance']}.\n\nEval set: {report['eval_queries']} queries, {report['evidence_words']} "
        f"Choices (best epoch, index width) were made on {report['dev_queries']} {report['dev_evidence']} "
        f"dev queries, never on the eval set.\n\n"
        + "".join(f"- {note}\n" for note in report.get("eval_notes", [])) + "\n"
        f"Haystacks: the ladder is compared on {_haystack_words(report, SAMPLE)}; what is served is "
        f"measured on {_haystack_words(report, CORPUS)}.\n\n"
        f"**Verdict:** {report['verdict']}\n\n**Promotion (safe_to_promote):** "
        f"{'yes' if report['promotion']['safe'] else 'NO'}: {report['promotion']['reason']}.\n\n"
        f"## Targets (committed before building; whole corpus)\n\n{targets.to_markdown(index=False)}\n\n"
        f"## Before / after (whole corpus)\n\n{before_after.to_markdown(index=False)}\n\n"
        f"One-off build cost (not in $/1k queries): training {costs['training_seconds']:.0f} s "
        f"(${costs['training_usd']:.4f}); synthetic queries {costs['generation_seconds']:.0f} s, "
        f"{costs['llm_tokens']} tokens (${costs['generation_usd']:.4f} machine time + "
        f"${costs['llm_api_usd']:.4f} API).\n\n{whole}{teacher_words(report)}"
        f"## Ladder ({_haystack_words(report, SAMPLE)})\n\nPaired randomization test on per-query "
        f"nDCG@10 ({report['randomization_iterations']} relabelings); hybrid = BM25 + served index by "
        f"reciprocal-rank fusion.\n\n{ladder.to_markdown(index=False)}\n\n"
        f"{ladder_words}\n\n{image('ladder.png', 'ladder')}\n\n"
        f"## Index sweep ({sweep['rung']}; {sweep['haystack']['what']}, {sweep['haystack']['units']:,} "
        f"units)\n\nRule: {sweep['rule']}\n\nChosen: {sweep.get('reason', '')}\n\n"
        f"{sweep_frame(sweep).to_markdown(index=False)}\n\n{image('sweep.png', 'sweep')}\n\n"
        f"## Latency\n\nServed latency over {report['latency_queries']} distinct queries (encode + "
        f"search on the whole-corpus index, one at a time, warm, no cache, one thread): p50 "
        f"{served['p50_ms']:.2f} ms, p95 {served['p95_ms']:.2f} ms.\n\n{image('latency.png', 'latency')}\n\n"
        f"## Migration\n\nWhat changes for users if the candidate replaces the old encoder, on the eval "
        f"queries.\n\n{migration_table.to_markdown(index=False)}\n"
    )
