"""eval_report: the decision page for one domain. The ladder (BM25, the off-the-shelf model, any extra
models from the spec, every rung, with paired significance) on the training sample; what users would
get (the candidate index, the index served now, BM25, the off-the-shelf model, a hybrid) on the whole
corpus; the index sweep; the served index's latency, size and cost; a migration view against the
index users search now; the committed targets with pass/fail; a one-line verdict; and the blocking
`safe_to_promote` check that gates `serving_index`. The arithmetic and the page are
`lib.evaluation` and `lib.report_page`; this asset gathers the systems and the measurements."""

import json
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from encoder_pipeline.defs.shared import ProgressLog, domain_spec, embeddings_cache, publish
from encoder_pipeline.defs.training.assets import RUNGS
from encoder_pipeline.domains import Targets, domain_partitions
from encoder_pipeline.lib import report as lib_report
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.encoders import EncoderHandle
from encoder_pipeline.lib.evaluation import CORPUS, SAMPLE, Haystack, System, evaluate_systems, haystacks
from encoder_pipeline.lib.heldout import EVIDENCE_WORDS
from encoder_pipeline.lib.index import IDS_FILE, LoadedIndex, build_index, load_index, served_bytes
from encoder_pipeline.lib.layout import (
    CLEAN_CORPUS,
    EMBEDDING_INDEX,
    EVAL_SET,
    INDEX_SWEEP,
    REPORT_FILE,
    SYNTHETIC_QUERIES,
    EvalSetArtifact,
    IndexArtifact,
    SweepArtifact,
    latest,
    rung_model_path,
    stale_rungs,
)
from encoder_pipeline.lib.metrics import (
    Run,
    bm25_run,
    dense_run,
    latency_ms,
    to_parent_run,
    usd_per_1k_queries,
)
from encoder_pipeline.lib.promotion import read_promotion
from encoder_pipeline.lib.report_page import (
    CANDIDATE,
    CURRENTLY_SERVED,
    HYBRID,
    TEACHER,
    Serving,
    baseline_name,
    build_report,
    render,
)
from encoder_pipeline.lib.search import NothingServed, served_index
from encoder_pipeline.lib.sweep import latency_queries
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings

GROUP = "evaluation"
TOP_K = 100
TARGET_CHECKS = ("ndcg_at_10_target", "p95_latency_target", "index_size_target", "cost_target")
BEATS_BASELINE = "beats_off_the_shelf"
SAFE_TO_PROMOTE = "safe_to_promote"
FIGURES = ("ladder.png", "sweep.png", "latency.png")


class ReportConfig(dg.Config):
    """Knobs of the report's statistics and of the promotion rule."""

    promotion_tolerance: float = Field(
        lib_report.PROMOTION_TOLERANCE, ge=0, description="How far (nDCG@10) the candidate may fall below the off-the-shelf "
        "model or the currently served index and still be promoted.")
    randomization_iterations: int = Field(
        10_000, ge=100, description="Relabelings in each paired randomization test.")


def build_costs(store: ArtifactStore, domain: str, usd_per_hour: float) -> dict[str, float]:
    """What building cost, apart from serving: training every rung, generating synthetic queries."""
    training = sum(latest(store, domain, rung).training()["train_seconds"] for rung in RUNGS)
    generation = latest(store, domain, SYNTHETIC_QUERIES).generation()
    return {
        "training_seconds": training, "training_usd": training / 3600 * usd_per_hour,
        "generation_seconds": generation["seconds"],
        "generation_usd": generation["seconds"] / 3600 * usd_per_hour,
        "llm_tokens": generation["prompt_tokens"] + generation["completion_tokens"],
        "llm_api_usd": generation["estimated_usd"],
    }


def _served(encoder: EncoderHandle, index: LoadedIndex):
    """One query end to end as `search` serves it: torch encode (bf16 autocast where the CPU has
    native bf16 and the settings allow it) + index search."""
    encode = encoder.bound()

    def answer(query: str):
        return index.search(encode([query], batch_size=1), 10)
    return answer


def _teacher_serving(teacher: str, stacks: dict[str, Haystack], answers: "_Systems", timing: list[str],
                     corpus_units: int, usd_per_hour: float) -> Serving:
    """The teacher served as it is (fp32 flat): latency timed over the training sample's index (its
    vectors are cached from mining; encoding dominates), size for every unit of the corpus."""
    sample, encoder = stacks[SAMPLE], answers.base.at(teacher)
    vectors = cached_embeddings(encoder, sample.texts, answers.cache)
    index = LoadedIndex(build_index(vectors, "flat"), list(sample.units["doc_id"]), sample.parents,
                        list(sample.units["title"]), {})
    latency = latency_ms(_served(encoder, index), timing)
    return Serving(latency["p50_ms"], latency["p95_ms"], corpus_units * vectors.shape[1] * 4 / 1e6,
                   usd_per_1k_queries(latency["mean_ms"], usd_per_hour))


def _recording(answer: Callable[[str], object], times: list[float]) -> Callable[[str], object]:
    """The same answer, its wall time per call appended to `times` (for the latency histogram)."""
    def timed(query: str):
        started = time.perf_counter()
        result = answer(query)
        times.append((time.perf_counter() - started) * 1000)
        return result
    return timed


class _Systems:
    """How each kind of system answers the eval queries, with the encoders and caches they share."""

    def __init__(self, queries: dict[str, str], cache: Path, base: EncoderHandle):
        self.qids = list(queries)
        self.texts = [queries[q] for q in self.qids]
        self.cache, self.base = cache, base  # base: the off-the-shelf model; others run like it

    def dense(self, model_path: str) -> Callable[[Haystack, dict[str, Run]], Run]:
        """Exact search over the haystack's units embedded by `model_path` (per-unit cache)."""
        encoder = self.base.at(model_path)

        def answer(hay: Haystack, _: dict[str, Run]) -> Run:
            vectors = cached_embeddings(encoder, hay.texts, self.cache)
            return dense_run(encoder.encode(self.texts), vectors, self.qids, hay.parents, TOP_K)
        return answer

    def bm25(self, hay: Haystack, _: dict[str, Run]) -> Run:
        return bm25_run(hay.texts, hay.parents, dict(zip(self.qids, self.texts, strict=True)), TOP_K)

    def index(self, index: LoadedIndex, model_path: str) -> Callable[[Haystack, dict[str, Run]], Run]:
        """A built index (its own units: the corpus it was built over) searched as served."""
        encoder = self.base.at(model_path)

        def answer(_: Haystack, __: dict[str, Run]) -> Run:
            return to_parent_run(index.search(encoder.encode(self.texts), TOP_K), self.qids, index.parents)
        return answer

    @staticmethod
    def hybrid(bm25: str) -> Callable[[Haystack, dict[str, Run]], Run]:
        def answer(_: Haystack, runs: dict[str, Run]) -> Run:
            return lib_report.rrf_fuse([runs[bm25], runs[CANDIDATE]], depth=TOP_K)
        return answer


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pytorch", "faiss"},
    owners=["team:retrieval"],
    # eval_set directly too: a judged set that grew re-evaluates, and a run of these two alone orders them
    ins={"evaluation": dg.AssetIn(EVAL_SET, input_manager_key=PUBLISHED),
         "candidate": dg.AssetIn(EMBEDDING_INDEX, input_manager_key=PUBLISHED),
         "swept": dg.AssetIn(INDEX_SWEEP, input_manager_key=PUBLISHED)},
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        *(dg.AssetCheckSpec(name, asset="eval_report") for name in (*TARGET_CHECKS, BEATS_BASELINE)),
        dg.AssetCheckSpec(SAFE_TO_PROMOTE, asset="eval_report", blocking=True,
                          description="Candidate served nDCG@10 is not below the currently served "
                          "index's nor the off-the-shelf model's (beyond a small tolerance); "
                          "serving_index runs only when it passes."),
    ],
)
def eval_report(context: dg.AssetExecutionContext, config: ReportConfig, evaluation: EvalSetArtifact,
                candidate: IndexArtifact, swept: SweepArtifact, artifacts: ArtifactStoreResource,
                settings: PipelineSettings) -> dg.MaterializeResult:
    """Was training worth it for this domain? The decision page: every system on the eval set,
    the targets, a verdict (metadata `report`, with its plots; files report.json, report.md,
    ladder/sweep/latency PNGs). On the training sample (pytrec_eval): BM25, the off-the-shelf model,
    the spec's `extra_models` and each ladder rung, with a paired randomization test against the rung
    below and against the off-the-shelf model. On the whole corpus: the candidate index as served,
    the index users search now (`serving_index`), BM25, the off-the-shelf model and a hybrid (BM25 +
    the candidate, reciprocal-rank fusion); p50/p95 latency (encode + search, one distinct query at a
    time, warm, no cache), index size and $/1k queries; a migration view (top-10 overlap, top-1
    agreement) against what is served now, else the off-the-shelf model; the committed targets as
    checks (WARN), judged on the whole-corpus figures. Every table names its haystack.

    `safe_to_promote` (blocking, ERROR): the candidate's whole-corpus eval nDCG@10 is not below the
    currently served index's (re-measured on this eval set when its encoder is still on disk,
    else as recorded at its promotion) nor below the off-the-shelf model's, each by more than
    `promotion_tolerance`. When it fails, this run stops before `serving_index`: users keep the
    index they have.
    """
    spec = domain_spec(context)
    store = artifacts.store()
    split = evaluation.split()
    cleaned = latest(store, spec.name, CLEAN_CORPUS)
    corpus = cleaned.units()
    stacks = haystacks(cleaned.sample(), corpus)
    corpus_differs = len(stacks[SAMPLE].units) != len(corpus)
    base = settings.encoder(spec.trust_remote_code)
    answers = _Systems(split.queries, embeddings_cache(store, spec.name), base)

    choice, index_dir = candidate.choice(), candidate.path
    candidate_index = load_index(index_dir, choice["revision"])
    trained = latest(store, spec.name, choice["rung"]).training()
    teacher = {"model": trained.get("teacher") or settings.base_model, "fallback": trained.get("teacher_fallback")}
    teaches = teacher["model"] != settings.base_model  # else the off-the-shelf row is the teacher's
    # The ladder on the training sample; what users get on the whole corpus.
    systems = [System("bm25", SAMPLE, answers.bm25),
               System("off_the_shelf", SAMPLE, answers.dense(settings.base_model)),
               *([System(TEACHER, SAMPLE, answers.dense(teacher["model"]), "teacher")] if teaches else []),
               *(System(f"extra:{path}", SAMPLE, answers.dense(path), "extra") for path in spec.extra_models),
               *(System(rung, SAMPLE, answers.dense(str(rung_model_path(store, spec.name, rung))), "rung")
                 for rung in RUNGS)]
    bm25_corpus = "bm25@corpus" if corpus_differs else "bm25"
    if corpus_differs:
        systems += [System(bm25_corpus, CORPUS, answers.bm25),
                    System(baseline_name(CORPUS), CORPUS, answers.dense(settings.base_model))]
    systems += [System(CANDIDATE, CORPUS, answers.index(candidate_index, choice["model_path"]), "candidate"),
                System(HYBRID, CORPUS, answers.hybrid(bm25_corpus), "hybrid")]
    # What users search now: re-measured on this eval set while its encoder is on disk.
    try:
        current = served_index(spec.name, store)
    except NothingServed:  # a first promotion: judged against the off-the-shelf model alone
        current = None
    current_info = None
    if current is not None:
        current_info = {"version": current.version, "rung": current.choice["rung"],
                        "revision": current.revision,
                        "recorded_ndcg@10": read_promotion(store, spec.name, current.version)["ndcg@10"]}
        if current.model_path.is_dir():
            systems.append(System(CURRENTLY_SERVED, CORPUS,
                                  answers.index(load_index(current.index_dir, current.revision),
                                                str(current.model_path)), "served"))
    # The off-the-shelf model over the whole corpus: its own line in the timings, then cached for the
    # systems and the latency below.
    encoding = ProgressLog(context, "embedding the corpus with the off-the-shelf model")
    base_vectors = cached_embeddings(base, stacks[CORPUS].texts, answers.cache, encoding)
    results = evaluate_systems(systems, stacks, split.qrels)

    # Serving measurements, on the whole-corpus indexes users would search.
    timing = latency_queries(answers.texts, list(corpus["title"]), settings.sizes().latency_queries,
                             settings.seed)
    served_times: list[float] = []
    served_latency = latency_ms(_recording(_served(base.at(choice["model_path"]), candidate_index),
                                           served_times), timing)
    served_times = served_times[len(served_times) - len(timing):]  # the warm-up calls left out
    base_index = LoadedIndex(build_index(base_vectors, "flat"), list(corpus["doc_id"]),
                             stacks[CORPUS].parents, list(corpus["title"]), {})
    base_latency = latency_ms(_served(base, base_index), timing)
    usd_per_hour = settings.serving_usd_per_hour
    serving = {
        CANDIDATE: Serving(served_latency["p50_ms"], served_latency["p95_ms"], served_bytes(index_dir) / 1e6,
                           usd_per_1k_queries(served_latency["mean_ms"], usd_per_hour)),
        "off_the_shelf": Serving(base_latency["p50_ms"], base_latency["p95_ms"],
                                 base_vectors.nbytes / 1e6 + (index_dir / IDS_FILE).stat().st_size / 1e6,
                                 usd_per_1k_queries(base_latency["mean_ms"], usd_per_hour)),
    }
    if teaches:
        serving[TEACHER] = _teacher_serving(teacher["model"], stacks, answers, timing, len(corpus), usd_per_hour)
    targets = spec.targets
    sweep = swept.sweep()
    report = build_report(
        facts={"domain": spec.name, "unit": spec.unit.name, "query_form": spec.queries.form,
               "relevance": spec.queries.relevance, "hard_negative": spec.queries.hard_negative,
               "eval_queries": len(split.queries), "human_judged": split.human_judged,
               "evidence": split.evidence, "evidence_words": EVIDENCE_WORDS[split.evidence],
               "dev_queries": len(split.dev.queries), "dev_evidence": split.dev.evidence,
               "eval_notes": split.notes},
        haystacks={key: hay.summary() for key, hay in stacks.items()}, results=results, rungs=RUNGS,
        candidate={**{key: choice.get(key) for key in ("rung", "revision", "dims", "precision")},
                   "fine_tuned_weight": trained.get("fine_tuned_weight", 1.0),
                   "detectable_gain": trained.get("merge", {}).get("detectable_gain")},
        teacher=teacher, qrels=split.qrels,
        stale_rungs=stale_rungs(store, spec.name, RUNGS, split.held_out_doc_ids),
        base_model_rungs=[rung for rung in RUNGS
                          if latest(store, spec.name, rung).training().get("fine_tuned_weight") == 0.0],
        serving=serving, targets=targets.model_dump(), currently_served=current_info,
        tolerance=config.promotion_tolerance, iterations=config.randomization_iterations, seed=settings.seed,
        extra_models={path: results[f"extra:{path}"].means for path in spec.extra_models},
        sweep=sweep, latency_queries=len(timing), latency_ms_per_query=served_times,
        serving_usd_per_hour=usd_per_hour, build_costs=build_costs(store, spec.name, settings.build_usd_per_hour),
        figures=list(FIGURES),
    )
    shown = {name: r.means["ndcg@10"] for name, r in results.items()}
    figures = {
        "ladder.png": lib_report.ladder_png(
            {(f"{name} (corpus)" if corpus_differs and results[name].haystack == CORPUS
              and not name.endswith("@corpus") else name): score
             for name, score in shown.items()}, targets.ndcg_at_10),
        "sweep.png": lib_report.sweep_png(sweep["points"], sweep["chosen"], targets.ndcg_at_10,
                                          targets.index_mb),
        "latency.png": lib_report.latency_png(served_times, targets.p95_latency_ms),
    }
    with publish(context, artifacts, settings,
                 {"top_k": TOP_K, "promotion_tolerance": config.promotion_tolerance,
                  "randomization_iterations": config.randomization_iterations,
                  "extra_models": spec.extra_models},
                 [evaluation, candidate, swept, cleaned, *RUNGS]) as staging:
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (staging / "report.md").write_text(render(report, lambda name, alt: f"![{alt}]({name})"))
        for name, png in figures.items():
            (staging / name).write_bytes(png)
    return dg.MaterializeResult(
        metadata=_metadata(report, figures, store.latest(spec.name, "eval_report"),
                           encoding.metadata("off_the_shelf_corpus")),
        check_results=_checks(report, targets, config.promotion_tolerance),
    )


def _checks(report: dict, targets: Targets, tolerance: float) -> list[dg.AssetCheckResult]:
    """The committed targets and `beats_off_the_shelf` (WARN), and the blocking promotion gate."""
    served, before, promotion = report["after"], report["before"], report["promotion"]

    def check(name: str, passed: bool, **values) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(check_name=name, passed=bool(passed),
                                   severity=dg.AssetCheckSeverity.WARN, metadata=values)

    met = served["targets_met"]
    current_ndcg = (report["currently_served"] or {}).get("ndcg@10")
    return [
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
            check_name=SAFE_TO_PROMOTE, passed=promotion["safe"], severity=dg.AssetCheckSeverity.ERROR,
            metadata={"reason": promotion["reason"], "candidate": served["ndcg@10"],
                      "off_the_shelf": before["ndcg@10"], "tolerance": tolerance,
                      **({"currently_served": current_ndcg} if current_ndcg is not None else {})},
        ),
    ]


def _metadata(report: dict, figures: dict[str, bytes], report_dir: Path,
              encoding: dict[str, dg.MetadataValue]) -> dict:
    """The page with its plots inline, and the numbers the UI plots over time."""
    served, before, build = report["after"], report["before"], report["build_costs"]
    shown = {name: system["ndcg@10"] for name, system in report["systems"].items()}
    return {
        "verdict": report["verdict"],
        "report": dg.MetadataValue.md(render(report, lambda name, alt: lib_report.md_image(figures[name], alt))),
        "human_judged": report["human_judged"],
        "evidence": report["evidence"],
        "evidence_meaning": report["evidence_words"],
        "safe_to_promote": report["promotion"]["safe"],
        "ndcg_at_10": dg.MetadataValue.float(served["ndcg@10"]),
        "ndcg_at_10_off_the_shelf": dg.MetadataValue.float(before["ndcg@10"]),
        "ndcg_at_10_bm25": dg.MetadataValue.float(shown[report["hybrid"]["runs"][0]]),
        "ndcg_at_10_hybrid": dg.MetadataValue.float(shown[HYBRID]),
        **{f"ndcg_at_10/{r}": dg.MetadataValue.float(shown[r]) for r in RUNGS},
        **{f"p_vs_below/{r}": dg.MetadataValue.float(report["ladder"][r]["p_vs_below"]) for r in RUNGS},
        "mrr_at_10": dg.MetadataValue.float(served["mrr@10"]),
        "recall_at_100": dg.MetadataValue.float(served["recall@100"]),
        "p95_latency_ms": dg.MetadataValue.float(served["p95_ms"]),
        "index_mb": dg.MetadataValue.float(served["index_mb"]),
        "usd_per_1k_queries": dg.MetadataValue.float(served["usd_per_1k_queries"]),
        **({"teacher": report["teacher"]["model"],
            "ndcg_at_10_teacher": dg.MetadataValue.float(report["teacher"]["ndcg@10"]),
            "p95_latency_ms_teacher": dg.MetadataValue.float(report["teacher"]["p95_ms"])}
           if (report.get("teacher") or {}).get("ndcg@10") is not None else {}),
        **({"eval_queries_judged_share_at_10": dg.MetadataValue.float(
            report["evidence_by_system"][CANDIDATE]["judged@10"])} if report.get("evidence_by_system") else {}),
        **({"stale_rungs": ", ".join(report["stale_rungs"])} if report.get("stale_rungs") else {}),
        "haystack_corpus_units": dg.MetadataValue.int(report["haystacks"][CORPUS]["units"]),
        "haystack_sample_units": dg.MetadataValue.int(report["haystacks"][SAMPLE]["units"]),
        **encoding,
        "migration_top10_overlap": dg.MetadataValue.float(report["migration"]["top10_overlap"]),
        "migration_top1_agreement": dg.MetadataValue.float(report["migration"]["top1_agreement"]),
        "build_usd": dg.MetadataValue.float(build["training_usd"] + build["generation_usd"] + build["llm_api_usd"]),
        "report_path": dg.MetadataValue.path(str(report_dir)),
        **{f"figure/{name}": dg.MetadataValue.path(str(report_dir / name)) for name in figures},
    }
