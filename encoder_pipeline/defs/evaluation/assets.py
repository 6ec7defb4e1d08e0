"""eval_report: the decision page for one domain. BM25, the off-the-shelf model, a hybrid, any extra
models from the spec, every ladder rung (with paired significance) and the served index on the eval
set; the index sweep; the served index's latency, size and cost; a migration view against the index
users search now; the committed targets with pass/fail; a one-line verdict; and the blocking
`safe_to_promote` check that gates `serving_index`."""

import json
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from encoder_pipeline.defs.indexing.assets import (
    embedding_index,
    index_sweep,
    read_index_choice,
    read_sweep,
)
from encoder_pipeline.defs.pairs.assets import GENERATION_FILE
from encoder_pipeline.defs.shared import (
    corpus_texts,
    domain_spec,
    embeddings_cache,
    publish,
    read_corpus_units,
    read_eval_split,
)
from encoder_pipeline.defs.training.assets import RUNGS, read_training_result, rung_model_path
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib import report as lib_report
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.index import IDS_FILE, LoadedIndex, build_index, load_index, served_bytes
from encoder_pipeline.lib.metrics import (
    Run,
    bm25_run,
    dense_run,
    evaluate,
    latency_ms,
    to_parent_run,
    usd_per_1k_queries,
)
from encoder_pipeline.lib.promotion import read_promotion
from encoder_pipeline.lib.search import REPORT_FILE, NothingServed, served_index
from encoder_pipeline.lib.sweep import latency_queries
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

GROUP = "evaluation"
TOP_K = 100
TARGET_CHECKS = ("ndcg_at_10_target", "p95_latency_target", "index_size_target", "cost_target")
BEATS_BASELINE = "beats_off_the_shelf"
SAFE_TO_PROMOTE = "safe_to_promote"
HYBRID = "hybrid_bm25_served"
CURRENTLY_SERVED = "currently_served"
FIGURES = ("ladder.png", "sweep.png", "latency.png")


class ReportConfig(dg.Config):
    """Knobs of the report's statistics and of the promotion rule."""

    promotion_tolerance: float = Field(
        0.01, ge=0, description="How far (nDCG@10) the candidate may fall below the off-the-shelf "
        "model or the currently served index and still be promoted.")
    randomization_iterations: int = Field(
        10_000, ge=100, description="Relabelings in each paired randomization test.")


def build_costs(store: ArtifactStore, domain: str, usd_per_hour: float) -> dict[str, float]:
    """What building cost, apart from serving: training every rung, generating synthetic queries."""
    training = sum(read_training_result(store, domain, rung)["train_seconds"] for rung in RUNGS)
    generation = json.loads((store.latest(domain, "synthetic_queries") / GENERATION_FILE).read_text())
    return {
        "training_seconds": training, "training_usd": training / 3600 * usd_per_hour,
        "generation_seconds": generation["seconds"],
        "generation_usd": generation["seconds"] / 3600 * usd_per_hour,
        "llm_tokens": generation["prompt_tokens"] + generation["completion_tokens"],
        "llm_api_usd": generation["estimated_usd"],
    }


def _served(model, index: LoadedIndex, bf16: bool):
    """One query end to end as `search` serves it: torch encode (bf16 autocast where the CPU has
    native bf16 and the settings allow it) + index search."""
    def answer(query: str):
        vector = encoders.encode(model, [query], batch_size=1, bf16=bf16)
        return index.search(vector, 10)
    return answer


def _recording(answer: Callable[[str], object], times: list[float]) -> Callable[[str], object]:
    """The same answer, its wall time per call appended to `times` (for the latency histogram)."""
    def timed(query: str):
        started = time.perf_counter()
        result = answer(query)
        times.append((time.perf_counter() - started) * 1000)
        return result
    return timed


def verdict(spec: DomainSpec, off_the_shelf: float, trained: float, served: dict) -> str:
    target = spec.targets.ndcg_at_10
    if off_the_shelf >= target:
        return (f"The off-the-shelf model already clears the bar: nDCG@10 {off_the_shelf:.3f} >= "
                f"{target:.3f}; training {'adds' if trained > off_the_shelf else 'does not add'} "
                f"({trained:.3f}).")
    if served["ndcg@10"] >= target and all(served["targets_met"].values()):
        return (f"Train: the trained encoder meets every target (nDCG@10 {served['ndcg@10']:.3f} >= "
                f"{target:.3f}); the off-the-shelf model does not ({off_the_shelf:.3f}).")
    missed = [name for name, ok in served["targets_met"].items() if not ok]
    return (f"Neither clears every target: off-the-shelf {off_the_shelf:.3f}, trained "
            f"{served['ndcg@10']:.3f} vs {target:.3f}; missed: {', '.join(missed)}.")


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _diff(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def ladder_frame(systems: dict[str, dict[str, float]], significance: dict[str, dict],
                 vs_baseline: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Every system's eval metrics with its paired test against the rung below (ladder only) and
    against the off-the-shelf model."""
    rows = []
    for name, metrics in systems.items():
        ladder = significance.get(name, {})
        diff, p = vs_baseline.get(name, (None, None))
        rows.append({
            "system": name, **{k: round(v, 4) for k, v in metrics.items()},
            "vs below": ladder.get("below") or "",
            "Δ vs below": _diff(ladder.get("diff_vs_below")),
            "p vs below": _p(ladder.get("p_vs_below")),
            "Δ vs off-the-shelf": _diff(diff), "p vs off-the-shelf": _p(p),
        })
    return pd.DataFrame(rows)


def sweep_frame(sweep: dict) -> pd.DataFrame:
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


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pytorch", "faiss"},
    owners=["team:retrieval"],
    deps=[embedding_index, index_sweep],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        *(dg.AssetCheckSpec(name, asset="eval_report") for name in (*TARGET_CHECKS, BEATS_BASELINE)),
        dg.AssetCheckSpec(SAFE_TO_PROMOTE, asset="eval_report", blocking=True,
                          description="Candidate served nDCG@10 is not below the currently served "
                          "index's nor the off-the-shelf model's (beyond a small tolerance); "
                          "serving_index runs only when it passes."),
    ],
)
def eval_report(context: dg.AssetExecutionContext, config: ReportConfig,
                artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """Was training worth it for this domain? The decision page: every system on the eval set,
    the targets, a verdict (metadata `report`, with its plots; files report.json, report.md,
    ladder/sweep/latency PNGs). On the eval set (pytrec_eval): BM25, the off-the-shelf model, a
    hybrid (BM25 + the served index, reciprocal-rank fusion), the spec's `extra_models`, each ladder rung with a
    paired randomization test against the rung below and against the off-the-shelf model, and the
    served index; the index sweep; p50/p95 latency (encode + search, one distinct query at a time,
    warm, no cache), index size and $/1k queries of the served index; a migration view (top-10
    overlap, top-1 agreement) against the encoder users search with now (`serving_index`), else the
    off-the-shelf model; the committed targets as checks (WARN).

    `safe_to_promote` (blocking, ERROR): the candidate's served eval nDCG@10 is not below the
    currently served index's (re-measured on this eval set when its encoder is still on disk,
    else as recorded at its promotion) nor below the off-the-shelf model's, each by more than
    `promotion_tolerance`. When it fails, this run stops before `serving_index`: users keep the
    index they have.
    """
    spec = domain_spec(context)
    store = artifacts.store()
    units = read_corpus_units(store, spec.name)
    split = read_eval_split(store, spec.name)
    texts = corpus_texts(units)
    parents = list(units["parent_id"])
    qids = list(split.queries)
    query_texts = [split.queries[q] for q in qids]
    cache = embeddings_cache(store, spec.name)
    trust = spec.trust_remote_code

    def dense(model_path: str) -> Run:
        corpus_vectors = encoders.cached_embeddings(model_path, texts, cache, bf16=settings.bf16_inference,
                                                    trust_remote_code=trust)
        query_vectors = encoders.encode(encoders.load_encoder(model_path, trust_remote_code=trust),
                                        query_texts, bf16=settings.bf16_inference)
        return dense_run(query_vectors, corpus_vectors, qids, parents, TOP_K)

    def index_run(folder: Path, revision: str, model_path: str) -> tuple[Run, LoadedIndex, object]:
        index = load_index(folder, revision)
        model = encoders.load_encoder(model_path, trust_remote_code=trust)
        hits = index.search(encoders.encode(model, query_texts, bf16=settings.bf16_inference), TOP_K)
        return to_parent_run(hits, qids, index.parents), index, model

    runs: dict[str, Run] = {"bm25": bm25_run(texts, parents, split.queries, TOP_K),
                            "off_the_shelf": dense(settings.base_model)}
    extra_names = {path: f"extra:{path}" for path in spec.extra_models}
    for path, name in extra_names.items():
        runs[name] = dense(path)
    for rung in RUNGS:
        runs[rung] = dense(str(rung_model_path(store, spec.name, rung)))

    choice = read_index_choice(store, spec.name)
    index_dir = store.latest(spec.name, "embedding_index")
    runs["served_index"], candidate_index, served_model = index_run(index_dir, choice["revision"],
                                                                    choice["model_path"])
    runs[HYBRID] = lib_report.rrf_fuse([runs["bm25"], runs["served_index"]], depth=TOP_K)

    # What users search now: re-measured on this eval set while its encoder is on disk.
    try:
        current = served_index(spec.name, store)
    except NothingServed:  # a first promotion: judged against the off-the-shelf model alone
        current = None
    current_info: dict | None = None
    if current is not None:
        promotion = read_promotion(store, spec.name, current.version)
        current_info = {"version": current.version, "rung": current.choice["rung"],
                        "revision": current.revision,
                        "recorded_ndcg@10": promotion["ndcg@10"], "remeasured": False}
        if current.model_path.is_dir():
            runs[CURRENTLY_SERVED], _, _ = index_run(current.index_dir, current.revision,
                                                     str(current.model_path))
            current_info["remeasured"] = True

    evaluated = {name: evaluate(run, split.qrels) for name, run in runs.items()}
    systems = {name: means for name, (means, _) in evaluated.items()}
    per_query = {name: rows for name, (_, rows) in evaluated.items()}

    iterations, seed = config.randomization_iterations, settings.seed
    chain = ["off_the_shelf", *RUNGS]
    significance = lib_report.ladder_significance(per_query, chain, "off_the_shelf", iterations, seed)
    vs_baseline = {name: lib_report.paired_randomization_test(per_query[name],
                                                              per_query["off_the_shelf"],
                                                              iterations, seed)
                   for name in systems if name != "off_the_shelf"}
    regressions = lib_report.regressions_in_words(
        significance, {n: systems[n]["ndcg@10"] for n in chain})

    if CURRENTLY_SERVED in runs:
        old_name, old_run = (f"currently served ({current_info['rung']}, "
                             f"{current_info['revision'][:12]})"), runs[CURRENTLY_SERVED]
    else:
        old_name, old_run = "off-the-shelf (base model, fp32 flat)", runs["off_the_shelf"]
    migration = {"old": old_name, "new": f"candidate served index ({choice['rung']}, "
                 f"{choice['revision'][:12]})",
                 **lib_report.migration(old_run, runs["served_index"])}

    timing = latency_queries(query_texts, list(units["title"]), settings.sizes().latency_queries,
                             settings.seed)
    served_times: list[float] = []
    served_latency = latency_ms(_recording(_served(served_model, candidate_index, settings.bf16_inference),
                                           served_times), timing)
    served_times = served_times[len(served_times) - len(timing):]  # the warm-up calls left out
    base_model = encoders.load_encoder(settings.base_model, trust_remote_code=trust)
    base_vectors = encoders.cached_embeddings(settings.base_model, texts, cache,
                                              bf16=settings.bf16_inference, trust_remote_code=trust)
    base_index = LoadedIndex(build_index(base_vectors, "flat"), list(units["doc_id"]), parents,
                             list(units["title"]), {})
    base_latency = latency_ms(_served(base_model, base_index, settings.bf16_inference), timing)
    served_mb = served_bytes(index_dir) / 1e6
    base_mb = base_vectors.nbytes / 1e6 + (index_dir / IDS_FILE).stat().st_size / 1e6
    usd_per_hour = settings.serving_usd_per_hour
    served = {
        **systems["served_index"],
        "rung": choice["rung"], "revision": choice["revision"], "dims": choice.get("dims"),
        "precision": choice.get("precision"),
        "p50_ms": served_latency["p50_ms"], "p95_ms": served_latency["p95_ms"],
        "index_mb": served_mb, "usd_per_1k_queries": usd_per_1k_queries(served_latency["mean_ms"],
                                                                          usd_per_hour),
    }
    before = {
        **systems["off_the_shelf"], "p50_ms": base_latency["p50_ms"], "p95_ms": base_latency["p95_ms"],
        "index_mb": base_mb, "usd_per_1k_queries": usd_per_1k_queries(base_latency["mean_ms"],
                                                                        usd_per_hour),
    }
    targets = spec.targets
    served["targets_met"] = {
        "ndcg_at_10": served["ndcg@10"] >= targets.ndcg_at_10,
        "p95_latency_ms": served["p95_ms"] <= targets.p95_latency_ms,
        "index_mb": served["index_mb"] <= targets.index_mb,
        "usd_per_1k_queries": served["usd_per_1k_queries"] <= targets.usd_per_1k_queries,
    }
    summary = verdict(spec, before["ndcg@10"], served["ndcg@10"], served)
    build = build_costs(store, spec.name, settings.build_usd_per_hour)

    currently_served_ndcg = None
    if current_info is not None:
        currently_served_ndcg = (systems[CURRENTLY_SERVED]["ndcg@10"] if current_info["remeasured"]
                                 else current_info["recorded_ndcg@10"])
        current_info["ndcg@10"] = currently_served_ndcg
    promote, promote_reason = lib_report.safe_to_promote(
        served["ndcg@10"], before["ndcg@10"], currently_served_ndcg, config.promotion_tolerance)

    sweep = read_sweep(store, spec.name)
    ladder_scores = {name: systems[name]["ndcg@10"] for name in
                     ["bm25", "off_the_shelf", *extra_names.values(), *RUNGS, HYBRID,
                      *([CURRENTLY_SERVED] if CURRENTLY_SERVED in systems else []), "served_index"]}
    figures = {
        "ladder.png": lib_report.ladder_png(ladder_scores, targets.ndcg_at_10),
        "sweep.png": lib_report.sweep_png(sweep["points"], sweep["chosen"], targets.ndcg_at_10,
                                          targets.index_mb),
        "latency.png": lib_report.latency_png(served_times, targets.p95_latency_ms),
    }
    target_rows = [
        ("nDCG@10", targets.ndcg_at_10, served["ndcg@10"], ">=", served["targets_met"]["ndcg_at_10"]),
        ("p95 latency ms", targets.p95_latency_ms, served["p95_ms"], "<=",
         served["targets_met"]["p95_latency_ms"]),
        ("index MB", targets.index_mb, served["index_mb"], "<=", served["targets_met"]["index_mb"]),
        ("$/1k queries", targets.usd_per_1k_queries, served["usd_per_1k_queries"], "<=",
         served["targets_met"]["usd_per_1k_queries"]),
    ]
    report = {
        "domain": spec.name, "unit": spec.unit.name, "query_form": spec.queries.form,
        "relevance": spec.queries.relevance, "hard_negative": spec.queries.hard_negative,
        "eval_queries": len(qids), "human_judged": split.human_judged,
        "systems": systems,
        "ladder": {name: {"ndcg@10": systems[name]["ndcg@10"], **significance[name],
                          "p_vs_off_the_shelf": vs_baseline.get(name, (None, None))[1]}
                   for name in chain},
        "significance_vs_off_the_shelf": {name: {"diff": d, "p": p}
                                          for name, (d, p) in vs_baseline.items()},
        "randomization_iterations": iterations,
        "regressions": regressions,
        "hybrid": {"system": HYBRID, "fusion": f"reciprocal rank, k={lib_report.RRF_K}",
                   "runs": ["bm25", "served_index"], **systems[HYBRID]},
        "extra_models": {path: systems[name] for path, name in extra_names.items()},
        "before": before, "after": served,
        "targets": targets.model_dump(),
        "targets_pass_fail": {name: {"target": target, "value": value, "rule": rule, "passed": ok}
                              for name, target, value, rule, ok in target_rows},
        "verdict": summary,
        "sweep": sweep,
        "migration": migration,
        "currently_served": current_info,
        "promotion": {"safe": promote, "reason": promote_reason,
                      "tolerance": config.promotion_tolerance},
        "latency_queries": len(timing), "latency_ms_per_query": served_times,
        "serving_usd_per_hour": usd_per_hour,
        "build_costs": build,
        "figures": list(figures),
    }

    ladder = ladder_frame(systems, significance, vs_baseline)
    before_after = pd.DataFrame([
        {"": "off-the-shelf (fp32 flat)", "nDCG@10": before["ndcg@10"], "p95 ms": before["p95_ms"],
         "index MB": before["index_mb"], "$/1k queries": before["usd_per_1k_queries"]},
        {"": f"trained ({served['rung']}"
             + (f", {served['precision']}@{served['dims']})" if served["dims"] else ")"),
         "nDCG@10": served["ndcg@10"], "p95 ms": served["p95_ms"], "index MB": served["index_mb"],
         "$/1k queries": served["usd_per_1k_queries"]},
    ]).round(4)
    targets_table = pd.DataFrame([
        {"target": name, "committed": f"{rule} {target:g}", "served": round(value, 4),
         "": "pass" if ok else "FAIL"} for name, target, value, rule, ok in target_rows])
    migration_table = pd.DataFrame([{
        "old": migration["old"], "new": migration["new"],
        "top-10 overlap": round(migration["top10_overlap"], 4),
        "top-1 agreement": round(migration["top1_agreement"], 4), "queries": migration["queries"]}])
    header = (f"# {spec.name}\n\nUnit: {spec.unit.name}. Query: {spec.queries.form}. Relevant when "
              f"{spec.queries.relevance}.\n\nEval set: {len(qids)} queries, "
              f"{'human-judged' if split.human_judged else 'NOT human-judged (held-out structural pairs)'}.")
    costs = (f"One-off build cost (not in $/1k queries): training {build['training_seconds']:.0f} s "
             f"(${build['training_usd']:.4f}); synthetic queries {build['generation_seconds']:.0f} s, "
             f"{build['llm_tokens']} tokens (${build['generation_usd']:.4f} machine time + "
             f"${build['llm_api_usd']:.4f} API).")
    ladder_words = ("\n\n" + "\n".join(f"- {s}" for s in regressions) if regressions else
                    "\n\nNo rung scores below the one beneath it.")
    latency_words = (f"Served latency over {len(timing)} distinct queries (encode + search, one at a "
                     f"time, warm, no cache, one thread): p50 {served['p50_ms']:.2f} ms, p95 "
                     f"{served['p95_ms']:.2f} ms.")
    promotion_words = (f"**Promotion ({SAFE_TO_PROMOTE}):** {'yes' if promote else 'NO'}: "
                       f"{promote_reason}.")

    def page(image: Callable[[str, str], str]) -> str:
        return (
            f"{header}\n\n**Verdict:** {summary}\n\n{promotion_words}\n\n"
            f"## Targets (committed before building)\n\n{targets_table.to_markdown(index=False)}\n\n"
            f"## Before / after\n\n{before_after.to_markdown(index=False)}\n\n{costs}\n\n"
            f"## Ladder\n\nPaired randomization test on per-query nDCG@10 ({iterations} relabelings); "
            f"hybrid = BM25 + served index by reciprocal-rank fusion.\n\n"
            f"{ladder.to_markdown(index=False)}{ladder_words}\n\n{image('ladder.png', 'ladder')}\n\n"
            f"## Index sweep ({sweep['rung']})\n\nRule: {sweep['rule']}\n\n"
            f"Chosen: {sweep.get('reason', '')}\n\n"
            f"{sweep_frame(sweep).to_markdown(index=False)}\n\n{image('sweep.png', 'sweep')}\n\n"
            f"## Latency\n\n{latency_words}\n\n{image('latency.png', 'latency')}\n\n"
            f"## Migration\n\nWhat changes for users if the candidate replaces the old encoder, on the "
            f"eval queries.\n\n{migration_table.to_markdown(index=False)}\n"
        )

    markdown_file = page(lambda name, alt: f"![{alt}]({name})")
    markdown_ui = page(lambda name, alt: lib_report.md_image(figures[name], alt))
    with publish(context, artifacts, settings,
                 {"top_k": TOP_K, "promotion_tolerance": config.promotion_tolerance,
                  "randomization_iterations": iterations, "extra_models": spec.extra_models},
                 ["clean_corpus", "eval_set", *RUNGS, "index_sweep", "embedding_index"]) as staging:
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (staging / "report.md").write_text(markdown_file)
        for name, png in figures.items():
            (staging / name).write_bytes(png)
    report_dir = store.latest(spec.name, "eval_report")

    def check(name: str, passed: bool, **values) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(check_name=name, passed=bool(passed),
                                   severity=dg.AssetCheckSeverity.WARN, metadata=values)

    met = served["targets_met"]
    checks = [
        check("ndcg_at_10_target", met["ndcg_at_10"], value=served["ndcg@10"],
              target=targets.ndcg_at_10),
        check("p95_latency_target", met["p95_latency_ms"], value=served["p95_ms"],
              target=targets.p95_latency_ms),
        check("index_size_target", met["index_mb"], value=served["index_mb"], target=targets.index_mb),
        check("cost_target", met["usd_per_1k_queries"], value=served["usd_per_1k_queries"],
              target=targets.usd_per_1k_queries),
        check(BEATS_BASELINE, served["ndcg@10"] > before["ndcg@10"], trained=served["ndcg@10"],
              off_the_shelf=before["ndcg@10"]),
        dg.AssetCheckResult(
            check_name=SAFE_TO_PROMOTE, passed=promote, severity=dg.AssetCheckSeverity.ERROR,
            metadata={"reason": promote_reason, "candidate": served["ndcg@10"],
                      "off_the_shelf": before["ndcg@10"], "tolerance": config.promotion_tolerance,
                      **({"currently_served": currently_served_ndcg}
                         if currently_served_ndcg is not None else {})},
        ),
    ]
    return dg.MaterializeResult(
        metadata={
            "verdict": summary,
            "report": dg.MetadataValue.md(markdown_ui),
            "human_judged": split.human_judged,
            "safe_to_promote": promote,
            "ndcg_at_10": dg.MetadataValue.float(served["ndcg@10"]),
            "ndcg_at_10_off_the_shelf": dg.MetadataValue.float(before["ndcg@10"]),
            "ndcg_at_10_bm25": dg.MetadataValue.float(systems["bm25"]["ndcg@10"]),
            "ndcg_at_10_hybrid": dg.MetadataValue.float(systems[HYBRID]["ndcg@10"]),
            **{f"ndcg_at_10/{r}": dg.MetadataValue.float(systems[r]["ndcg@10"]) for r in RUNGS},
            **{f"p_vs_below/{r}": dg.MetadataValue.float(significance[r]["p_vs_below"])
               for r in RUNGS},
            "mrr_at_10": dg.MetadataValue.float(served["mrr@10"]),
            "recall_at_100": dg.MetadataValue.float(served["recall@100"]),
            "p95_latency_ms": dg.MetadataValue.float(served["p95_ms"]),
            "index_mb": dg.MetadataValue.float(served["index_mb"]),
            "usd_per_1k_queries": dg.MetadataValue.float(served["usd_per_1k_queries"]),
            "migration_top10_overlap": dg.MetadataValue.float(migration["top10_overlap"]),
            "migration_top1_agreement": dg.MetadataValue.float(migration["top1_agreement"]),
            "build_usd": dg.MetadataValue.float(build["training_usd"] + build["generation_usd"]
                                                + build["llm_api_usd"]),
            "report_path": dg.MetadataValue.path(str(report_dir)),
            **{f"figure/{name}": dg.MetadataValue.path(str(report_dir / name)) for name in figures},
        },
        check_results=checks,
    )
