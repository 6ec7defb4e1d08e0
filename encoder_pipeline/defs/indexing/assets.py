"""index_sweep and embedding_index: every Matryoshka width x precision of the served rung's index,
measured on the dev slice (which chooses) and the eval set (which only reports), then the chosen
configuration built over the whole corpus and bound to that encoder's revision."""

import json
from collections.abc import Callable

import dagster as dg
import numpy as np

from encoder_pipeline.defs.indexing.refresh import build_or_refresh
from encoder_pipeline.defs.shared import ProgressLog, domain_spec, embeddings_cache, md_table, publish
from encoder_pipeline.defs.training.assets import RUNGS, dev_set
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.index import RESCORE_MULTIPLIER, save_index
from encoder_pipeline.lib.layout import (
    CHOICE_FILE,
    CLEAN_CORPUS,
    EVAL_SET,
    HEURISTIC_PAIRS,
    INDEX_SWEEP,
    SWEEP_FILE,
    CorpusArtifact,
    RungArtifact,
    SweepArtifact,
    corpus_texts,
    read_corpus_units,
    read_eval_split,
)
from encoder_pipeline.lib.sweep import (
    CHOICE_RULE,
    QuerySet,
    choose,
    latency_queries,
    points_frame,
    reference_point,
    sweep,
    time_encoding,
)
from encoder_pipeline.lib.train import DevSet, pick_rung
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings

GROUP = "indexing"
TOP_K = 100  # results per query for nDCG@10 and Recall@100
SERVED_K = 10  # results per timed query, as served


def rung_to_serve(rungs: dict[str, RungArtifact], dev: DevSet | None, load: Callable[[str], object],
                  seed: int) -> tuple[RungArtifact, dict[str, float], str]:
    """The rung `pick_rung` serves, each rung scored per query on the training dev slice (the one its
    merge was chosen on: the scores its training recorded, else the rung's model is loaded and
    scored); without a dev slice, the rung with the most data. Returns the rung, each rung's dev
    nDCG@10 and why."""
    if dev is None:
        return rungs[RUNGS[-1]], {}, f"{RUNGS[-1]}: no dev slice, the rung with the most data"

    def scores(rung: RungArtifact) -> dict[str, float]:
        training = rung.training()
        if training.get("dev_fingerprint") == dev.fingerprint() and training.get("dev_per_query"):
            return training["dev_per_query"]
        return dev.per_query_ndcg_at_10(load(str(rung.model_path)))

    per_query = {r: scores(rungs[r]) for r in RUNGS}
    kept = [r for r in RUNGS if rungs[r].training().get("fine_tuned_weight", 1.0) > 0]
    rung, why = pick_rung(per_query, kept, seed)
    return rungs[rung], {r: round(float(np.mean(list(q.values()))), 4) for r, q in per_query.items()}, why


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"faiss"},
    owners=["team:retrieval"],
    ins={rung: dg.AssetIn(rung, input_manager_key=PUBLISHED) for rung in RUNGS},
    automation_condition=dg.AutomationCondition.eager(),
    description=(
        "The served rung's index (the kept rung with the most data, unless a lower one beats it on "
        "the dev slice beyond noise) of the whole corpus at every Matryoshka width (384/192/96/48) x precision (fp32, "
        "fp16, int8 scalar quantizer, binary with int8 or fp32 rescoring, IVF-PQ from 20k vectors): "
        "nDCG@10 / Recall@100 and the share of fp32 full width they keep, on the dev slice and the "
        "eval set, every served byte, build time, p50/p95 latency (query encode + search, one query "
        "at a time, warm, one thread). Picks the smallest configuration meeting the domain's targets "
        "on the dev slice, never on the eval set."
    ),
)
def index_sweep(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                settings: PipelineSettings, **rungs: RungArtifact) -> dg.MaterializeResult:
    spec = domain_spec(context)
    store = artifacts.store()
    dev_slice = dev_set(store, spec.name, settings.seed, settings.sizes().dev_distractors)
    best, dev_scores, rung_reason = rung_to_serve(
        rungs, dev_slice, lambda path: settings.encoder(spec.trust_remote_code, path).load(), settings.seed)
    context.log.info(f"serving {rung_reason}")
    rung, model_path = best.asset, str(best.model_path)
    revision = encoders.model_fingerprint(model_path)
    # Every configuration is measured over the whole corpus, the haystack it will serve: a width that
    # holds up among the training sample's units can fail among ten times as many. The vectors land
    # in the per-unit cache, where embedding_index finds them.
    units = read_corpus_units(store, spec.name)
    parents, ids, titles = list(units["parent_id"]), list(units["doc_id"]), list(units["title"])
    encoding = ProgressLog(context, f"embedding the corpus with {rung}")
    encoder = settings.encoder(spec.trust_remote_code, model_path)
    corpus_vectors = cached_embeddings(encoder, corpus_texts(units), embeddings_cache(store, spec.name),
                                       encoding)

    def query_set(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> QuerySet:
        qids = list(queries)
        vectors = encoder.encode([queries[q] for q in qids])
        return QuerySet(vectors, qids, qrels)

    # Dev queries search the whole corpus, like served queries, judged at the document level.
    split = read_eval_split(store, spec.name)
    dev = split.dev.queries
    query_sets = {"dev": query_set(dev, split.dev.qrels), "eval": query_set(split.queries, split.qrels)}

    # Timing: distinct queries encoded one at a time as `search` serves them (torch, bf16 autocast
    # where the CPU has it natively, no cache).
    timing = latency_queries([*dev.values(), *split.queries.values()], titles,
                             settings.sizes().latency_queries, settings.seed)
    encode_queries = encoder.bound()
    latency_vectors, encode_ms = time_encoding(lambda q: encode_queries([q], batch_size=1), timing)
    context.log.info(f"sweeping {rung} over {len(units)} units; {len(timing)} timed queries")
    points = sweep(corpus_vectors, query_sets, parents, latency_vectors, encode_ms, ids=ids,
                   titles=titles, k=TOP_K, latency_k=SERVED_K)
    full_dim = corpus_vectors.shape[1]
    reference = reference_point(points, full_dim)
    if dev:
        chosen, reason = choose(points, spec.targets, full_dim, on="dev")
    else:  # nothing to choose on without looking at the eval set: the exact reference
        chosen, reason = reference, "no dev slice: serving the exact reference, fp32 at full width"
    payload = {
        "rung": rung, "model_path": model_path, "revision": revision, "latency_queries": len(timing),
        "encode_p50_ms": float(np.percentile(encode_ms, 50)),
        "encode_p95_ms": float(np.percentile(encode_ms, 95)),
        "dev_queries": len(dev), "dev_evidence": split.dev.evidence, "eval_queries": len(split.queries),
        "haystack": {"units": len(units), "documents": int(units["parent_id"].nunique()),
                     "what": "the whole corpus"},
        "rescore_multiplier": RESCORE_MULTIPLIER, "targets": spec.targets.model_dump(),
        "dev_ndcg_at_10_by_rung": dev_scores, "rung_reason": rung_reason,
        "points": points, "chosen": chosen, "rule": CHOICE_RULE, "reason": reason,
    }
    with publish(context, artifacts, settings, {"rung": rung, "top_k": TOP_K},
                 [*rungs.values(), CLEAN_CORPUS, EVAL_SET, HEURISTIC_PAIRS]) as staging:
        (staging / SWEEP_FILE).write_text(json.dumps(payload, indent=2))
    return dg.MaterializeResult(metadata={
        "rung": rung,
        "rung_reason": rung_reason,
        "encoder_revision": revision,
        "sweep": md_table(points_frame(points).round(4)),
        "chosen": f"{chosen['precision']} at {chosen['dims']} dims",
        "reason": reason,
        "chosen_dims": dg.MetadataValue.int(chosen["dims"]),
        "chosen_mb": dg.MetadataValue.float(chosen["bytes"] / 1e6),
        "chosen_p95_ms": dg.MetadataValue.float(chosen["p95_ms"]),
        "chosen_dev_ndcg_at_10": dg.MetadataValue.float(chosen["dev"]["ndcg@10"]),
        "chosen_eval_ndcg_at_10": dg.MetadataValue.float(chosen["eval"]["ndcg@10"]),
        "chosen_eval_ndcg_retained": dg.MetadataValue.float(chosen["eval_ndcg_retained"]),
        "chosen_eval_recall_retained": dg.MetadataValue.float(chosen["eval_recall_retained"]),
        "fp32_full_mb": dg.MetadataValue.float(reference["bytes"] / 1e6),
        "compression_vs_fp32": dg.MetadataValue.float(reference["bytes"] / chosen["bytes"]),
        "encode_p95_ms": dg.MetadataValue.float(payload["encode_p95_ms"]),
        "points": dg.MetadataValue.int(len(points)),
        "latency_queries": dg.MetadataValue.int(len(timing)),
        "haystack_units": dg.MetadataValue.int(len(units)),
        **encoding.metadata("corpus"),  # the whole-corpus encode (units no earlier stage had encoded)
    })


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"faiss"},
    owners=["team:retrieval"],
    ins={"sweep": dg.AssetIn(INDEX_SWEEP, input_manager_key=PUBLISHED),
         "cleaned": dg.AssetIn(CLEAN_CORPUS, input_manager_key=PUBLISHED)},
    automation_condition=dg.AutomationCondition.eager(),
)
def embedding_index(context: dg.AssetExecutionContext, sweep: SweepArtifact, cleaned: CorpusArtifact,
                    artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """The configuration index_sweep chose (Matryoshka width x precision), built over the whole corpus
    embedded by the rung index_sweep serves (`rung_to_serve`); refuses to be queried with any other
    encoder revision. When only the corpus changed since the last version (same sweep), that version
    is updated incrementally instead (see `refresh.py`)."""
    spec = domain_spec(context)
    store = artifacts.store()
    swept = sweep.sweep()
    rung, model_path, chosen = swept["rung"], swept["model_path"], swept["chosen"]
    revision = encoders.model_fingerprint(model_path)
    if revision != swept["revision"]:
        raise dg.Failure(f"the encoder at {model_path} is now {revision}, but index_sweep measured "
                         f"{swept['revision']}: re-materialize index_sweep")
    units = cleaned.units()
    encoding = ProgressLog(context, f"embedding the corpus with {rung}")
    built = build_or_refresh(store, spec.name, swept, units, settings.encoder(spec.trust_remote_code, model_path),
                             encoding)
    corpus = {"corpus_units": len(units), "corpus_documents": int(units["parent_id"].nunique())}
    index, build_seconds = built.index, built.seconds
    ids, parents, titles = index.ids, index.parents, index.titles
    dev_scores = swept.get("dev_ndcg_at_10_by_rung", {})
    with publish(context, artifacts, settings,
                 {"rung": rung, "dims": chosen["dims"], "precision": chosen["precision"]},
                 [cleaned, sweep, *RUNGS]) as staging:
        size = save_index(staging, index, ids, parents, titles, revision, chosen["precision"],
                          build_seconds)
        (staging / CHOICE_FILE).write_text(json.dumps({
            "rung": rung, "model_path": model_path, "revision": revision,
            "dev_ndcg_at_10": dev_scores, "dims": chosen["dims"], "precision": chosen["precision"],
            "bytes": size, "sweep_point": chosen, "reason": swept.get("reason", ""),
            # serving loads the encoder without the spec: the opt-in travels with the index
            "trust_remote_code": spec.trust_remote_code,
            "vectors": index.index.ntotal, **corpus,  # what `search`, `export` and the UI show
        }, indent=2))
    return dg.MaterializeResult(metadata={
        "rung": rung,
        "encoder_revision": revision,
        "precision": chosen["precision"],
        "dims": dg.MetadataValue.int(chosen["dims"]),
        "vectors": dg.MetadataValue.int(index.index.ntotal),
        "corpus_units": dg.MetadataValue.int(corpus["corpus_units"]),
        "coverage": f"{index.index.ntotal:,} of the corpus's {corpus['corpus_units']:,} units "
                    f"({corpus['corpus_documents']:,} documents)",
        "index_mb": dg.MetadataValue.float(size / 1e6),
        "build_seconds": dg.MetadataValue.float(build_seconds),
        **built.metadata(),
        **encoding.metadata("corpus"),
        "dev_ndcg_at_10_chosen": dg.MetadataValue.float(chosen["dev"]["ndcg@10"]),
        **{f"dev_ndcg_at_10/{r}": dg.MetadataValue.float(s) for r, s in dev_scores.items()},
    })
