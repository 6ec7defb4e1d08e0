"""Training data, one rung of the ablation ladder at a time: structural pairs, synthetic queries,
mined hard negatives. Nothing here ever reads an eval document."""

import dataclasses
import json
import time

import dagster as dg
import numpy as np
import pandas as pd

from encoder_pipeline.defs.corpus.assets import clean_corpus, eval_set
from encoder_pipeline.defs.pairs.checks import leakage_check, leakage_check_spec
from encoder_pipeline.defs.shared import (
    corpus_texts,
    domain_spec,
    embeddings_cache,
    extractor_config,
    llm_generation,
    md_table,
    publish,
    read_corpus_units,
    read_eval_split,
    read_sample_units,
)
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore, remove_torn_arrays
from encoder_pipeline.lib.extractors import get
from encoder_pipeline.lib.extractors.choose import looks_like_code
from encoder_pipeline.lib.leakage import LeakFilter
from encoder_pipeline.lib.negatives import MiningConfig, mine_negatives
from encoder_pipeline.lib.pairs import (
    cap_pairs,
    document_form,
    eval_texts,
    extract_training_pairs,
    rank_of_positive,
    top_k_ids,
)
from encoder_pipeline.lib.queries import (
    JUDGE_CANDIDATES,
    STRUCTURE_EXAMPLES,
    PromptSpec,
    RelabelConfig,
    build_prompts,
    dedupe_queries,
    generate_frame,
    judge_prompt,
    parse_choice,
    parse_query,
    prompt_examples,
    relabel,
)
from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings

GROUP = "training_data"
PAIRS_FILE = "pairs.parquet"
SYNTHETIC_FILE = "synthetic.parquet"
UNFILTERED_FILE = "synthetic_unfiltered.parquet"
GENERATION_FILE = "generation.json"
MINED_FILE = "mined.parquet"


class TrainingCorpus:
    """The training sample minus the held-out (eval and dev) documents, with base-model embeddings
    (cached per unit), and the extractors eval_set resolved for the domain."""

    def __init__(self, store: ArtifactStore, spec: DomainSpec, settings: PipelineSettings):
        units = read_sample_units(store, spec.name)
        self.eval = read_eval_split(store, spec.name)
        self.units = units[~units["parent_id"].isin(self.eval.held_out_doc_ids)].reset_index(drop=True)
        self.ids = list(self.units["doc_id"])
        self.extractors = self.eval.extractors
        self._store, self._spec, self._settings = store, spec, settings

    def positives(self) -> list[str]:
        """Each unit as a training positive (`lib.pairs.document_form`)."""
        return document_form(self.units, self.extractors)

    def embeddings(self) -> np.ndarray:
        return encoders.cached_embeddings(self._settings.base_model, corpus_texts(self.units),
                                          embeddings_cache(self._store, self._spec.name),
                                          bf16=self._settings.bf16_inference,
                                          trust_remote_code=self._spec.trust_remote_code)

    def _encode(self, queries: list[str]) -> np.ndarray:
        model = encoders.load_encoder(self._settings.base_model,
                                      trust_remote_code=self._spec.trust_remote_code)
        return encoders.encode(model, queries, bf16=self._settings.bf16_inference)

    def ranks(self, queries: list[str], positive_ids: list[str], top_k: int) -> np.ndarray:
        return rank_of_positive(self._encode(queries), positive_ids, self.embeddings(), self.ids, top_k)

    def search(self, queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        if not queries:
            return []
        return top_k_ids(self._encode(queries), self.embeddings(), self.ids, top_k)


def leak_filter(store: ArtifactStore, domain: str) -> LeakFilter:
    """lib.leakage's filter over this domain's eval split (queries, documents, ids)."""
    return LeakFilter(eval_texts(read_eval_split(store, domain), read_corpus_units(store, domain)))


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pandas", "sentence_transformers"},
    owners=["team:retrieval"],
    deps=[clean_corpus, eval_set],
    check_specs=[leakage_check_spec("heuristic_pairs")],
    # A corpus change alone refreshes the index; retraining is corpus_drift_sensor's call.
    automation_condition=dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets(clean_corpus)),
)
def heuristic_pairs(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                    settings: PipelineSettings) -> dg.MaterializeResult:
    """Training pairs from the domain's extractors (lib/extractors: title -> body, heading ->
    section, docstring -> code; inverse cloze and cropping where structure is scarce, at most a
    quarter of the rows once structure gives 500 pairs), kept only when the base model already ranks
    the positive in its top-k (E5's consistency filter). Held-out documents never give a pair."""
    spec = domain_spec(context)
    store = artifacts.store()
    sizes = settings.sizes()
    corpus = TrainingCorpus(store, spec, settings)
    extraction = extract_training_pairs(corpus.units, corpus.extractors, extractor_config(spec))
    extracted, leaked = leak_filter(store, spec.name).drop(extraction.pairs)
    ranks = corpus.ranks(list(extracted["query"]), list(extracted["doc_id"]), sizes.consistency_top_k)
    consistent = extracted[ranks > 0].assign(base_rank=ranks[ranks > 0])
    train = cap_pairs(consistent, sizes.max_pairs, settings.seed)
    config = {"extractors": corpus.extractors, "consistency_top_k": sizes.consistency_top_k}
    with publish(context, artifacts, settings, config, ["clean_corpus", "eval_set"]) as staging:
        train.to_parquet(staging / PAIRS_FILE, index=False)
    counts = {"extracted": len(extraction.pairs), "dropped_eval_overlap": leaked.count,
              "consistent": int((ranks > 0).sum()), "training": len(train)}
    return dg.MaterializeResult(
        metadata={
            **{f"pairs_{k}": dg.MetadataValue.int(v) for k, v in counts.items()},
            **{f"pairs_from/{key}": dg.MetadataValue.int(int((train["extractor"] == key).sum()))
               for key in corpus.extractors},
            "extractors": dg.MetadataValue.md("\n".join(f"- {line}" for line in extraction.summaries())),
            "consistency_keep_rate": dg.MetadataValue.float(
                counts["consistent"] / max(1, counts["extracted"] - counts["dropped_eval_overlap"])),
            "sample": md_table(train.head(6)[["query", "positive", "extractor", "base_rank"]]),
        },
        check_results=[leakage_check(store, spec.name, "heuristic_pairs", [PAIRS_FILE])],
    )


def read_pairs(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, "heuristic_pairs") / PAIRS_FILE)


def read_synthetic(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, "synthetic_queries") / SYNTHETIC_FILE)


def read_mined(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, "mined_negatives") / MINED_FILE)


def judge_candidates(parsed: pd.DataFrame, hits: list, corpus: TrainingCorpus, spec: DomainSpec,
                     backend_factory, cache_dir: str, params) -> list[int | None]:
    """The LLM's pick among each query's top retrieved passages (None: no usable answer)."""
    text_of = dict(zip(corpus.ids, corpus_texts(corpus.units), strict=True))
    prompts = [{"prompt": judge_prompt(query, [text_of[d] for d, _ in row[:JUDGE_CANDIDATES]],
                                       spec.queries.relevance)}
               for query, row in zip(parsed["query"], hits, strict=True)]
    greedy = dataclasses.replace(params, temperature=0.0, max_new_tokens=4)
    answers = generate_frame(prompts, backend_factory, cache_dir, greedy)["text"]
    return [parse_choice(a if isinstance(a, str) else None, min(JUDGE_CANDIDATES, len(row)))
            for a, row in zip(answers, hits, strict=True)]


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"daft", "openai"},
    owners=["team:retrieval"],
    deps=[heuristic_pairs],
    check_specs=[leakage_check_spec("synthetic_queries")],
    automation_condition=dg.AutomationCondition.eager(),
)
def synthetic_queries(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
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
    corpus = TrainingCorpus(store, spec, settings)
    sample = corpus.units.sample(min(sizes.synthetic_documents, len(corpus.units)), random_state=settings.seed)
    passages = corpus_texts(sample)
    pairs = read_pairs(store, spec.name)
    structural = pairs[pairs["extractor"].map(lambda key: get(key).structural)].sort_values("doc_id")
    prompt_spec = PromptSpec(spec.queries.form, spec.queries.relevance, prompt_examples(
        [(e.passage, e.query) for e in spec.queries.examples], structural.head(STRUCTURE_EXAMPLES),
        code=looks_like_code(corpus.units["text"])))
    prompts = build_prompts(prompt_spec, list(sample["doc_id"]), passages,
                            sizes.queries_per_document, settings.seed)
    rows = generate_frame(prompts, backend_factory, cache_dir, params)
    by_doc = dict(zip(sample["doc_id"], passages, strict=True))
    examples = [query for _, query in prompt_spec.examples]
    rows["query"] = [parse_query(raw, by_doc[d], examples, spec.queries.min_words)
                     if isinstance(raw, str) else None
                     for raw, d in zip(rows["text"], rows["doc_id"], strict=True)]
    parsed = rows[rows["query"].notna()]
    parsed = parsed[dedupe_queries(list(parsed["query"]))].reset_index(drop=True)
    relabel_config = RelabelConfig(top_k=sizes.round_trip_top_k)
    hits = corpus.search(list(parsed["query"]), relabel_config.top_k)
    choices = None
    if llm.is_remote:  # an instruction-following model judges; the local base model cannot
        choices = judge_candidates(parsed, hits, corpus, spec, backend_factory, cache_dir, params)
    parsed["positive_id"], parsed["outcome"] = relabel(hits, list(parsed["doc_id"]), relabel_config,
                                                       choices)
    positive_of = dict(zip(corpus.units["doc_id"], corpus.positives(), strict=True))
    leaks = leak_filter(store, spec.name)
    kept = parsed[parsed["outcome"] != "dropped_round_trip"]
    synthetic, leaked = leaks.drop(pd.DataFrame({
        "query": kept["query"], "positive": kept["positive_id"].map(positive_of),
        "doc_id": kept["positive_id"], "seed_doc_id": kept["doc_id"], "outcome": kept["outcome"],
        "style": kept["style"]}))
    overlapping = leaked.count
    # The ablation benchmark trains on the unfiltered queries too: they go through the same filter.
    unfiltered, leaked_unfiltered = leaks.drop(pd.DataFrame({
        "query": parsed["query"], "positive": parsed["doc_id"].map(positive_of),
        "doc_id": parsed["doc_id"], "outcome": parsed["outcome"]}))
    config = {"backend": llm.backend, "model": llm.model if llm.is_remote else "local",
              **params.as_dict(), **relabel_config.__dict__}
    generated = rows[rows["text"].notna()]
    fresh = generated[~generated["cached"].astype(bool)]
    outcomes = parsed["outcome"].value_counts()
    counts = {"prompts": len(prompts), "completions": len(generated),
              "parsed": int(rows["query"].notna().sum()), "deduplicated": len(parsed),
              "dropped_round_trip": int(outcomes.get("dropped_round_trip", 0)),
              "relabeled": int(outcomes.get("relabeled", 0)), "dropped_eval_overlap": overlapping,
              "unfiltered_dropped_eval_overlap": leaked_unfiltered.count,
              "kept": len(synthetic)}
    prompt_tokens, completion_tokens = int(fresh["prompt_tokens"].sum()), int(fresh["completion_tokens"].sum())
    usd = (prompt_tokens * llm.usd_per_1m_prompt_tokens
           + completion_tokens * llm.usd_per_1m_completion_tokens) / 1e6
    with publish(context, artifacts, settings, config, ["clean_corpus", "eval_set",
                                                        "heuristic_pairs"]) as staging:
        synthetic.to_parquet(staging / SYNTHETIC_FILE, index=False)
        unfiltered.to_parquet(staging / UNFILTERED_FILE, index=False)
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
            "not_generated_budget_or_error": dg.MetadataValue.int(len(rows) - len(generated)),
            "llm": f"{llm.backend}:{llm.model if llm.is_remote else 'gemma3-270m-q4_k_m'}",
            "sent_to_llm": ("document title and text, to " + (llm.base_url or "api.openai.com")
                            if llm.is_remote else
                            "document title and text, to the local model (nothing left the machine)"),
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
    deps=[heuristic_pairs, synthetic_queries],
    check_specs=[leakage_check_spec("mined_negatives")],
    automation_condition=dg.AutomationCondition.eager(),
)
def mined_negatives(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                    settings: PipelineSettings) -> dg.MaterializeResult:
    """Hard negatives for every heuristic and synthetic pair, mined from the corpus minus eval
    documents with the teacher (the run's, else the spec's, else the base model), its scores kept for
    distillation; positive-aware: candidates scoring above 95% of the positive are dropped as likely
    false negatives (NV-Retriever's TopK-PercPos), and 3 negatives are sampled from the teacher's top
    50 survivors. Dropped candidates are counted and sampled in the metadata."""
    spec = domain_spec(context)
    store = artifacts.store()
    corpus = TrainingCorpus(store, spec, settings)
    pairs = pd.concat([read_pairs(store, spec.name)[["query", "positive"]],
                       read_synthetic(store, spec.name)[["query", "positive"]]], ignore_index=True)
    teacher = settings.mining_teacher(spec.training.teacher_model)
    config = MiningConfig(seed=settings.seed, teacher=teacher)
    # mine_hard_negatives keys its embedding cache by text only: one folder per teacher revision.
    cache = embeddings_cache(store, spec.name) / f"mining-{encoders.model_fingerprint(teacher)}"
    remove_torn_arrays(cache)  # a run killed while that cache was being written
    mining = mine_negatives(pairs, corpus.positives(),
                            teacher, config, cache, bf16=settings.bf16_inference,
                            trust_remote_code=spec.trust_remote_code)
    mined, leaked = leak_filter(store, spec.name).drop(mining.rows)
    overlapping = leaked.count
    report = mining.report
    with publish(context, artifacts, settings, {**config.__dict__, "teacher": teacher},
                 ["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries"]) as staging:
        mined.to_parquet(staging / MINED_FILE, index=False)
    text_columns = [c for c in mined.columns if not c.startswith("score_")]
    return dg.MaterializeResult(
        metadata={
            "pairs_in": dg.MetadataValue.int(len(pairs)),
            "rows_with_negatives": dg.MetadataValue.int(len(mined)),
            "dropped_eval_overlap": dg.MetadataValue.int(overlapping),
            "negatives_per_row": dg.MetadataValue.int(config.num_negatives),
            "bm25_negatives_per_row": dg.MetadataValue.int(config.bm25_negatives),
            "perc_pos": dg.MetadataValue.float(config.perc_pos),
            "teacher": teacher,
            "candidates_scored": dg.MetadataValue.int(report.candidates),
            "dropped_false_negatives": dg.MetadataValue.int(report.dropped_false_negatives),
            "dropped_false_negative_rate": dg.MetadataValue.float(round(report.dropped_rate, 4)),
            "dropped_sample": md_table(report.dropped_sample),
            "sample": md_table(mined.head(4)[text_columns]),
        },
        check_results=[leakage_check(store, spec.name, "mined_negatives", [MINED_FILE])],
    )
