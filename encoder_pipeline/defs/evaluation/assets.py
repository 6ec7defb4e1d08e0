"""eval_report: BM25, the off-the-shelf model and every ladder rung on the eval set, the served index's
latency, size and cost, the committed targets with pass/fail, and a one-line verdict."""

import json

import dagster as dg
import numpy as np
import pandas as pd

from encoder_pipeline.defs.indexing.assets import embedding_index, read_index_choice
from encoder_pipeline.defs.shared import (
    corpus_texts,
    domain_spec,
    embeddings_cache,
    publish,
    read_corpus_units,
    read_eval_split,
)
from encoder_pipeline.defs.pairs.assets import GENERATION_FILE
from encoder_pipeline.defs.training.assets import RUNGS, read_training_result, rung_model_path
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.index import LoadedIndex, build_index, load_index, served_bytes
from encoder_pipeline.lib.metrics import (
    bm25_run,
    dense_run,
    evaluate,
    latency_ms,
    to_parent_run,
    usd_per_1k_queries,
)
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

GROUP = "evaluation"
TOP_K = 100
TARGET_CHECKS = ("ndcg_at_10_target", "p95_latency_target", "index_size_target", "cost_target")
BEATS_BASELINE = "beats_off_the_shelf"


def read_report(store: ArtifactStore, domain: str) -> dict:
    return json.loads((store.latest(domain, "eval_report") / "report.json").read_text())


def latency_queries(queries: list[str], titles: list[str], wanted: int, seed: int) -> list[str]:
    """Distinct timing queries: the eval queries, topped up with corpus titles when too few."""
    distinct = list(dict.fromkeys(queries))
    if len(distinct) < wanted:
        pool = [t for t in dict.fromkeys(titles) if t and t not in set(distinct)]
        rng = np.random.default_rng(seed)
        extra = rng.choice(len(pool), size=min(wanted - len(distinct), len(pool)), replace=False)
        distinct += [pool[i] for i in extra]
    return distinct[:wanted]


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


def _served(model, index: LoadedIndex):
    """One query end to end with the shipped default backend: fp32 encode + index search."""
    def answer(query: str):
        vector = encoders.encode(model, [query], batch_size=1, bf16=False)
        return index.search(vector, 10)
    return answer


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


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pytorch", "faiss"},
    owners=["team:retrieval"],
    deps=[embedding_index],
    check_specs=[dg.AssetCheckSpec(name, asset="eval_report") for name in (*TARGET_CHECKS,
                                                                              BEATS_BASELINE)],
)
def eval_report(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                settings: PipelineSettings) -> dg.MaterializeResult:
    """Before / after on the eval set: nDCG@10, MRR@10, Recall@10/100 for BM25, the off-the-shelf
    model and each ladder rung; p95 latency (encode + search, one query at a time, warm), index size
    and $/1k queries for the served index; the domain's committed targets as checks (WARN)."""
    spec = domain_spec(context)
    store = artifacts.store()
    units = read_corpus_units(store, spec.name)
    split = read_eval_split(store, spec.name)
    texts = corpus_texts(units)
    parents = list(units["parent_id"])
    qids = list(split.queries)
    query_texts = [split.queries[q] for q in qids]
    cache = embeddings_cache(store, spec.name)

    def dense(model_path: str) -> dict[str, float]:
        corpus_vectors = encoders.cached_embeddings(model_path, texts, cache, bf16=settings.bf16_inference)
        query_vectors = encoders.encode(encoders.load_encoder(model_path), query_texts,
                                        bf16=settings.bf16_inference)
        return evaluate(dense_run(query_vectors, corpus_vectors, qids, parents, TOP_K), split.qrels)[0]

    systems = {"bm25": evaluate(bm25_run(texts, parents, split.queries, TOP_K), split.qrels)[0],
               "off_the_shelf": dense(settings.base_model)}
    for rung in RUNGS:
        systems[rung] = dense(str(rung_model_path(store, spec.name, rung)))

    choice = read_index_choice(store, spec.name)
    index_dir = store.latest(spec.name, "embedding_index")
    served_index = load_index(index_dir, choice["revision"])
    served_model = encoders.load_encoder(choice["model_path"])
    served_hits = served_index.search(encoders.encode(served_model, query_texts,
                                                      bf16=settings.bf16_inference), TOP_K)
    systems["served_index"] = evaluate(to_parent_run(served_hits, qids, served_index.parents),
                                       split.qrels)[0]

    timing = latency_queries(query_texts, list(units["title"]), settings.sizes().latency_queries,
                             settings.seed)
    served_latency = latency_ms(_served(served_model, served_index), timing)
    base_model = encoders.load_encoder(settings.base_model)
    base_vectors = encoders.cached_embeddings(settings.base_model, texts, cache,
                                              bf16=settings.bf16_inference)
    base_index = LoadedIndex(build_index(base_vectors, "flat"), list(units["doc_id"]), parents,
                             list(units["title"]), {})
    base_latency = latency_ms(_served(base_model, base_index), timing)
    served_mb = served_bytes(index_dir) / 1e6
    base_mb = base_vectors.nbytes / 1e6 + (index_dir / "ids.json").stat().st_size / 1e6
    usd_per_hour = settings.serving_usd_per_hour
    served = {
        **systems["served_index"],
        "rung": choice["rung"], "p50_ms": served_latency["p50_ms"], "p95_ms": served_latency["p95_ms"],
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
    report = {
        "domain": spec.name, "unit": spec.unit.name, "query_form": spec.queries.form,
        "relevance": spec.queries.relevance, "hard_negative": spec.queries.hard_negative,
        "eval_queries": len(qids), "human_judged": split.human_judged,
        "systems": systems, "before": before, "after": served,
        "targets": targets.model_dump(), "verdict": summary,
        "latency_queries": len(timing), "serving_usd_per_hour": usd_per_hour,
        "build_costs": build,
    }
    ladder = pd.DataFrame([{"system": name, **{k: round(v, 4) for k, v in m.items()}}
                           for name, m in systems.items()])
    before_after = pd.DataFrame([
        {"": "off-the-shelf (fp32 flat)", "nDCG@10": before["ndcg@10"], "p95 ms": before["p95_ms"],
         "index MB": before["index_mb"], "$/1k queries": before["usd_per_1k_queries"]},
        {"": f"trained ({served['rung']}, int8)", "nDCG@10": served["ndcg@10"],
         "p95 ms": served["p95_ms"], "index MB": served["index_mb"],
         "$/1k queries": served["usd_per_1k_queries"]},
    ]).round(4)
    header = (f"# {spec.name}\n\nUnit: {spec.unit.name}. Query: {spec.queries.form}. Relevant when "
              f"{spec.queries.relevance}.\n\nEval set: {len(qids)} queries, "
              f"{'human-judged' if split.human_judged else 'NOT human-judged (held-out structural pairs)'}.")
    costs = (f"One-off build cost (not in $/1k queries): training {build['training_seconds']:.0f} s "
             f"(${build['training_usd']:.4f}); synthetic queries {build['generation_seconds']:.0f} s, "
             f"{build['llm_tokens']} tokens (${build['generation_usd']:.4f} machine time + "
             f"${build['llm_api_usd']:.4f} API).")
    markdown = (f"{header}\n\n**Verdict:** {summary}\n\n## Before / after\n\n"
                f"{before_after.to_markdown(index=False)}\n\n{costs}\n\n"
                f"## Ladder\n\n{ladder.to_markdown(index=False)}\n")
    with publish(context, artifacts, settings, {"top_k": TOP_K}, ["clean_corpus", "eval_set", *RUNGS,
                                                                  "embedding_index"]) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        (staging / "report.md").write_text(markdown)

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
    ]
    return dg.MaterializeResult(
        metadata={
            "verdict": summary,
            "report": dg.MetadataValue.md(markdown),
            "human_judged": split.human_judged,
            "ndcg_at_10": dg.MetadataValue.float(served["ndcg@10"]),
            "ndcg_at_10_off_the_shelf": dg.MetadataValue.float(before["ndcg@10"]),
            "ndcg_at_10_bm25": dg.MetadataValue.float(systems["bm25"]["ndcg@10"]),
            **{f"ndcg_at_10/{r}": dg.MetadataValue.float(systems[r]["ndcg@10"]) for r in RUNGS},
            "mrr_at_10": dg.MetadataValue.float(served["mrr@10"]),
            "recall_at_100": dg.MetadataValue.float(served["recall@100"]),
            "p95_latency_ms": dg.MetadataValue.float(served["p95_ms"]),
            "index_mb": dg.MetadataValue.float(served["index_mb"]),
            "usd_per_1k_queries": dg.MetadataValue.float(served["usd_per_1k_queries"]),
            "build_usd": dg.MetadataValue.float(build["training_usd"] + build["generation_usd"]
                                                + build["llm_api_usd"]),
            "report_path": dg.MetadataValue.path(str(store.latest(spec.name, "eval_report"))),
        },
        check_results=checks,
    )
