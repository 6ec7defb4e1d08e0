"""Training data, one rung of the ablation ladder at a time: structural pairs, synthetic queries,
mined hard negatives. Nothing here ever reads an eval document."""

import json
import time

import dagster as dg
import numpy as np

from encoder_pipeline.defs.corpus.assets import clean_corpus
from encoder_pipeline.defs.shared import (
    ProgressLog,
    domain_spec,
    embeddings_cache,
    extractor_config,
    llm_generation,
    md_table,
    publish,
)
from encoder_pipeline.defs.training_data.checks import leakage_check, leakage_check_spec
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore, remove_torn_arrays
from encoder_pipeline.lib.extractors import get
from encoder_pipeline.lib.extractors.choose import looks_like_code
from encoder_pipeline.lib.layout import (
    CLEAN_CORPUS,
    EVAL_SET,
    GENERATION_FILE,
    HEURISTIC_PAIRS,
    MINED_FILE,
    PAIRS_FILE,
    SYNTHETIC_FILE,
    SYNTHETIC_QUERIES,
    UNFILTERED_FILE,
    CorpusArtifact,
    EvalSetArtifact,
    PairsArtifact,
    SyntheticArtifact,
    latest,
)
from encoder_pipeline.lib.leakage import LeakFilter
from encoder_pipeline.lib.negatives import MiningConfig, mine_by_form
from encoder_pipeline.lib.pairs import (
    cap_pairs,
    eval_texts,
    extract_training_pairs,
)
from encoder_pipeline.lib.queries import (
    STRUCTURE_EXAMPLES,
    PromptSpec,
    RelabelConfig,
    generate_frame,
    prompt_examples,
)
from encoder_pipeline.lib.synthetic import TrainingCorpus, greedy, synthesize
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, LLMResource, PipelineSettings

GROUP = "training_data"


def training_corpus(corpus: CorpusArtifact, split: EvalSetArtifact, spec: DomainSpec,
                    settings: PipelineSettings) -> TrainingCorpus:
    """The training sample minus held-out documents, embedded by the base model through the
    domain's per-unit cache."""
    base = settings.encoder(spec.trust_remote_code)

    def encode_corpus(texts: list[str]) -> np.ndarray:
        return cached_embeddings(base, texts, embeddings_cache(corpus.store, spec.name))

    return TrainingCorpus(corpus.sample(), split.split(), encode_corpus, base.encode)


def leak_filter(corpus: CorpusArtifact, split: EvalSetArtifact) -> LeakFilter:
    """lib.leakage's filter over this domain's eval split (queries, documents, ids)."""
    return LeakFilter(eval_texts(split.split(), corpus.units()))


def held_out(store: ArtifactStore, domain: str) -> tuple[CorpusArtifact, EvalSetArtifact]:
    """The corpus and the eval split (latest versions) for the stages below heuristic_pairs, which
    receive the pairs, not these, from Dagster."""
    return latest(store, domain, CLEAN_CORPUS), latest(store, domain, EVAL_SET)


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pandas", "sentence_transformers"},
    owners=["team:retrieval"],
    ins={"corpus": dg.AssetIn(CLEAN_CORPUS, input_manager_key=PUBLISHED),
         "split": dg.AssetIn(EVAL_SET, input_manager_key=PUBLISHED)},
    check_specs=[leakage_check_spec("heuristic_pairs")],
    # A corpus change alone refreshes the index; retraining is corpus_drift_sensor's call.
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets(clean_corpus)),
)
def heuristic_pairs(context: dg.AssetExecutionContext, corpus: CorpusArtifact, split: EvalSetArtifact,
                    artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """Training pairs from the domain's extractors (lib/extractors: title -> body, heading ->
    section, docstring -> code; inverse cloze and cropping where structure is scarce, at most a
    quarter of the rows once structure gives 500 pairs), kept only when the base model already ranks
    the positive in its top-k (E5's consistency filter). Held-out documents never give a pair."""
    spec = domain_spec(context)
    store = artifacts.store()
    sizes = settings.sizes()
    training = training_corpus(corpus, split, spec, settings)
    extraction = extract_training_pairs(training.units, training.extractors, extractor_config(spec))
    extracted, leaked = leak_filter(corpus, split).drop(extraction.pairs)
    ranks = training.ranks(list(extracted["query"]), list(extracted["doc_id"]), sizes.consistency_top_k)
    consistent = extracted[ranks > 0].assign(base_rank=ranks[ranks > 0])
    train = cap_pairs(consistent, sizes.max_pairs, settings.seed)
    config = {"extractors": training.extractors, "consistency_top_k": sizes.consistency_top_k}
    with publish(context, artifacts, settings, config, [corpus, split]) as staging:
        train.to_parquet(staging / PAIRS_FILE, index=False)
    counts = {"extracted": len(extraction.pairs), "dropped_eval_overlap": leaked.count,
              "consistent": int((ranks > 0).sum()), "training": len(train)}
    return dg.MaterializeResult(
        metadata={
            **{f"pairs_{k}": dg.MetadataValue.int(v) for k, v in counts.items()},
            **{f"pairs_from/{key}": dg.MetadataValue.int(int((train["extractor"] == key).sum()))
               for key in training.extractors},
            "extractors": dg.MetadataValue.md("\n".join(f"- {line}" for line in extraction.summaries())),
            "consistency_keep_rate": dg.MetadataValue.float(
                counts["consistent"] / max(1, counts["extracted"] - counts["dropped_eval_overlap"])),
            "sample": md_table(train.head(6)[["query", "positive", "extractor", "base_rank"]]),
        },
        check_results=[leakage_check(store, spec.name, "heuristic_pairs", [PAIRS_FILE])],
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"daft", "openai"},
    owners=["team:retrieval"],
    ins={"pairs": dg.AssetIn(HEURISTIC_PAIRS, input_manager_key=PUBLISHED)},
    check_specs=[leakage_check_spec("synthetic_queries")],
    automation_condition=dg.AutomationCondition.eager(),
)
def synthetic_queries(context: dg.AssetExecutionContext, pairs: PairsArtifact, artifacts: ArtifactStoreResource,
                      settings: PipelineSettings, llm: LLMResource) -> dg.MaterializeResult:
    """LLM-written queries for a sample of training documents (Gecko / Promptagator recipe):
    few-shot prompts built from the spec's query form and relevance criterion with a per-document
    task / persona / length, generated through a cached Daft batch UDF, parsed and cleaned; then each
    query retrieves from the corpus minus eval documents: it is dropped when its seed document is not
    in the top-k (round trip), and its positive is relabeled when another document fits it better:
    judged by the LLM among the top candidates on a remote backend, by the base encoder with a margin
    rule offline. Every LLM response is cached on disk, so a re-run never pays twice."""
    spec = domain_spec(context)
    store = artifacts.store()
    sizes = settings.sizes()
    backend_factory, cache_dir, params = llm_generation(spec, llm, store, settings.seed)
    started = time.perf_counter()
    cleaned, split = held_out(store, spec.name)
    corpus = training_corpus(cleaned, split, spec, settings)
    sample = corpus.units.sample(min(sizes.synthetic_documents, len(corpus.units)), random_state=settings.seed)
    rows = pairs.rows()
    structural = rows[rows["extractor"].map(lambda key: get(key).structural)].sort_values("doc_id")
    prompt_spec = PromptSpec(spec.queries.form, spec.queries.relevance, prompt_examples(
        [(e.passage, e.query) for e in spec.queries.examples], structural.head(STRUCTURE_EXAMPLES),
        code=looks_like_code(corpus.units["text"])))
    relabel_config = RelabelConfig(top_k=sizes.round_trip_top_k)
    result = synthesize(
        corpus, sample, prompt_spec,
        lambda prompts: generate_frame(prompts, backend_factory, cache_dir, params,
                                       ProgressLog(context, "generating synthetic queries (prompts)")),
        queries_per_document=sizes.queries_per_document, relabel_config=relabel_config,
        min_words=spec.queries.min_words, seed=settings.seed, leaks=leak_filter(cleaned, split),
        # an instruction-following model judges; a base model cannot
        judge=(lambda prompts: generate_frame(prompts, backend_factory, cache_dir, greedy(params),
                                              ProgressLog(context, "judging synthetic queries (prompts)")))
        if llm.follows_instructions else None)
    synthetic, counts = result.synthetic, result.counts
    config = {"backend": llm.backend, "model": llm.model_label,
              **params.as_dict(), **relabel_config.__dict__}
    generated = result.rows[result.rows["text"].notna()]
    fresh = generated[~generated["cached"].astype(bool)]
    prompt_tokens, completion_tokens = int(fresh["prompt_tokens"].sum()), int(fresh["completion_tokens"].sum())
    usd = (prompt_tokens * llm.usd_per_1m_prompt_tokens
           + completion_tokens * llm.usd_per_1m_completion_tokens) / 1e6
    with publish(context, artifacts, settings, config, [cleaned, split, pairs]) as staging:
        synthetic.to_parquet(staging / SYNTHETIC_FILE, index=False)
        result.unfiltered.to_parquet(staging / UNFILTERED_FILE, index=False)
        (staging / GENERATION_FILE).write_text(json.dumps({
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "estimated_usd": usd, "seconds": time.perf_counter() - started, **counts}))
    sample_rows = synthetic.head(8).assign(
        document=lambda f: f["seed_doc_id"],
        relabeled_positive=lambda f: f["doc_id"].where(f["outcome"] == "relabeled", "(seed kept)"))
    return dg.MaterializeResult(
        metadata={
            **{f"queries_{k}": dg.MetadataValue.int(v) for k, v in counts.items()},
            "few_shot_examples": dg.MetadataValue.int(len(prompt_spec.examples)),
            "few_shot_from": "the spec" if spec.queries.examples else "the corpus's structure and "
                             "built-in generic examples",
            "prompt_tokens": dg.MetadataValue.int(prompt_tokens),
            "completion_tokens": dg.MetadataValue.int(completion_tokens),
            "cache_hits": dg.MetadataValue.int(int(generated["cached"].astype(bool).sum())),
            "estimated_usd": dg.MetadataValue.float(usd),
            "not_generated_budget_or_error": dg.MetadataValue.int(len(result.rows) - len(generated)),
            "llm": f"{llm.backend}:{llm.model_label}",
            "sent_to_llm": (f"document title and text, to {llm.documents_go_to}" if llm.is_remote else
                            "document title and text, to a model on this machine (nothing left it)"),
            "sample": md_table(sample_rows[["document", "query", "relabeled_positive"]]),
        },
        check_results=[leakage_check(store, spec.name, "synthetic_queries",
                                     [SYNTHETIC_FILE, UNFILTERED_FILE])],
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"sentence_transformers", "faiss"},
    owners=["team:retrieval"],
    ins={"pairs": dg.AssetIn(HEURISTIC_PAIRS, input_manager_key=PUBLISHED),
         "synthetic": dg.AssetIn(SYNTHETIC_QUERIES, input_manager_key=PUBLISHED)},
    check_specs=[leakage_check_spec("mined_negatives")],
    automation_condition=dg.AutomationCondition.eager(),
)
def mined_negatives(context: dg.AssetExecutionContext, pairs: PairsArtifact, synthetic: SyntheticArtifact,
                    artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """Hard negatives for every heuristic and synthetic pair, mined from the corpus minus eval
    documents (each unit in the form of the row's positive: `lib.negatives.mine_by_form`) with the
    teacher (the run's, else the spec's, else the profile's: all-mpnet-base-v2 by default, the base
    model when its packages are missing), its scores kept; positive-aware: candidates scoring above
    95% of the positive are dropped as likely false negatives (NV-Retriever's TopK-PercPos), and 3
    negatives are sampled from the teacher's top 50 survivors. Dropped candidates are counted and
    sampled in the metadata."""
    spec = domain_spec(context)
    store = artifacts.store()
    cleaned, split = held_out(store, spec.name)
    corpus = training_corpus(cleaned, split, spec, settings)
    structural, generated = pairs.rows(), synthetic.rows()
    choice = settings.teacher(spec.training.teacher_model)
    if choice.fallback:
        context.log.warning(choice.fallback)
    config = MiningConfig(seed=settings.seed, teacher=choice.model)
    # mine_hard_negatives keys its embedding cache by text only: one folder per teacher revision.
    cache = embeddings_cache(store, spec.name) / f"mining-{choice.revision}"
    remove_torn_arrays(cache)  # a run killed while that cache was being written
    mining = mine_by_form([(structural, corpus.structural_positives()), (generated, corpus.texts())],
                          settings.encoder(spec.trust_remote_code, choice.model), config, cache,
                          vector_cache=embeddings_cache(store, spec.name))
    mined, leaked = leak_filter(cleaned, split).drop(mining.rows)
    overlapping = leaked.count
    report = mining.report
    with publish(context, artifacts, settings, {**config.__dict__, **choice.describe()},
                 [cleaned, split, pairs, synthetic]) as staging:
        mined.to_parquet(staging / MINED_FILE, index=False)
    text_columns = [c for c in mined.columns if not c.startswith("score_")]
    return dg.MaterializeResult(
        metadata={
            "pairs_in": dg.MetadataValue.int(report.pairs_in),
            "rows_with_negatives": dg.MetadataValue.int(len(mined)),
            "dropped_eval_overlap": dg.MetadataValue.int(overlapping),
            "negatives_per_row": dg.MetadataValue.int(config.num_negatives),
            "bm25_negatives_per_row": dg.MetadataValue.int(config.bm25_negatives),
            "perc_pos": dg.MetadataValue.float(config.perc_pos),
            "teacher": choice.model,
            **({"teacher_fallback": choice.fallback} if choice.fallback else {}),
            "candidates_scored": dg.MetadataValue.int(report.candidates),
            "dropped_false_negatives": dg.MetadataValue.int(report.dropped_false_negatives),
            "dropped_false_negative_rate": dg.MetadataValue.float(round(report.dropped_rate, 4)),
            "dropped_sample": md_table(report.dropped_sample),
            "sample": md_table(mined.head(4)[text_columns]),
        },
        check_results=[leakage_check(store, spec.name, "mined_negatives", [MINED_FILE])],
    )
