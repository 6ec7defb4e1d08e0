"""clean_corpus and eval_set: the retrievable units, and the queries the report is judged on."""

import dataclasses
import os
from pathlib import Path

import daft
import dagster as dg
import pandas as pd
import pyarrow.parquet as pq

from encoder_pipeline.defs.shared import (
    ProgressLog,
    domain_spec,
    embeddings_cache,
    extractor_config,
    llm_generation,
    md_table,
    publish,
)
from encoder_pipeline.domains import AUTO, DomainSpec, domain_partitions
from encoder_pipeline.lib.corpus import CleaningConfig, CleaningReport
from encoder_pipeline.lib.corpus import clean_corpus_to_parquet as clean_to_parquet
from encoder_pipeline.lib.drift import write_snapshot
from encoder_pipeline.lib.extractors import get
from encoder_pipeline.lib.extractors.choose import choose_extractors, looks_like_code
from encoder_pipeline.lib.heldout import (
    EVIDENCE_WORDS,
    SPLIT_SEED,
    build_split,
    haystack_scorer,
    sample_judged,
)
from encoder_pipeline.lib.judging import judged_set_summary
from encoder_pipeline.lib.layout import CLEAN_CORPUS, CORPUS_FILE, EVAL_FILE, CorpusArtifact, write_eval_split
from encoder_pipeline.lib.pairs import extract_training_pairs
from encoder_pipeline.lib.queries import STRUCTURE_EXAMPLES, PromptSpec, prompt_examples, query_generator
from encoder_pipeline.lib.sources import CorpusError, Skipped, read_corpus, read_judged
from encoder_pipeline.lib.train import MIN_TRAINING_PAIRS
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, LLMResource, PipelineSettings

GROUP = "corpus"


def _judged(spec: DomainSpec, settings: PipelineSettings):
    """The judged set (sampled down under a small profile), or None."""
    location = spec.judged_location()
    if location is None:
        return None
    if "://" not in location and not os.path.isdir(location):
        raise CorpusError(f"judged set not found at {location} (field 'judged.path'); set "
                          "ENCODER_PIPELINE_CORPUS_ROOT or fix the path")
    queries, qrels = read_judged(location, spec.judged.split)
    return sample_judged(queries, qrels, settings.sizes().judged_queries, settings.seed)


def clean_domain_corpus(spec: DomainSpec, settings: PipelineSettings, out_path: Path, skipped: Skipped
                        ) -> tuple[daft.DataFrame, CleaningReport]:
    """Read the domain's corpus (and judged set) as its spec says and clean it into `out_path`: what
    clean_corpus publishes, and what `domain add` runs before it writes a spec, so a corpus the run
    would refuse is refused at the door with the same CorpusError."""
    judged = _judged(spec, settings)
    protected = {doc for rels in judged[1].values() for doc in rels} if judged else set()
    raw = read_corpus(spec.corpus.format, spec.corpus_location(), spec.corpus.id_field,
                      spec.corpus.title_field, spec.corpus.text_field, spec.corpus.exclude,
                      spec.corpus.on_malformed, skipped, include=spec.corpus.include)
    return raw, clean_to_parquet(raw, _refusing_config(spec, settings), out_path, protected)


def _refusing_config(spec: DomainSpec, settings: PipelineSettings) -> CleaningConfig:
    """Fewer units than training needs pairs is refused when cleaning, before any model or LLM runs."""
    return dataclasses.replace(cleaning_config(spec, settings), min_units=MIN_TRAINING_PAIRS)


def cleaning_config(spec: DomainSpec, settings: PipelineSettings) -> CleaningConfig:
    return CleaningConfig(
        max_words=spec.unit.max_words, min_words=spec.unit.min_words,
        normalize_whitespace=spec.unit.normalize_whitespace,
        boilerplate_patterns=tuple(spec.unit.boilerplate_patterns),
        num_hashes=spec.dedupe.num_hashes, ngram_size=spec.dedupe.ngram_size,
        bands=spec.dedupe.bands, jaccard_threshold=spec.dedupe.jaccard_threshold,
        # the sample and the dedupe hashes are the corpus's: the same for every training seed
        sample_documents=settings.sizes().training_documents, seed=SPLIT_SEED,
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"daft", "parquet"},
    owners=["team:retrieval"],
    check_specs=[dg.AssetCheckSpec("enough_documents", asset="clean_corpus")],
    deps=["corpus_source"],  # the raw corpus, observed by corpus_drift_sensor (defs/corpus/drift.py)
)
def clean_corpus(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                 settings: PipelineSettings) -> dg.MaterializeResult:
    """The domain's whole corpus as retrievable units: loaded, unicode/whitespace-normalized, chunked,
    empties and boilerplate dropped, exact and MinHash near-duplicates marked (`duplicate_of`: served,
    never trained on), stable ids. Judged documents are never dropped or marked; chunks keep their
    source document id. Each unit is marked in or out of the training sample (the profile's
    `training_documents`, a stable salted-hash sample, judged documents always in, duplicates never):
    training data is built on the sample, the served index covers every unit."""
    spec = domain_spec(context)
    store = artifacts.store()
    # Cleaning streams to a scratch file beside the artifacts (the corpus never sits in memory
    # whole), which then moves into the published version with a rename.
    with store.scratch(spec.name) as scratch:
        cleaned = scratch / CORPUS_FILE
        skipped = Skipped()  # malformed entries left out under corpus.on_malformed = "skip"
        try:
            raw, report = clean_domain_corpus(spec, settings, cleaned, skipped)
        except CorpusError as error:
            raise dg.Failure(f"domain '{spec.name}' (spec {spec.source_file}, corpus "
                             f"{spec.corpus_location()}): {error}") from error
        with publish(context, artifacts, settings, _refusing_config(spec, settings).__dict__, upstream=[],
                     corpus_fingerprint=report.fingerprint) as staging:
            os.replace(cleaned, staging / CORPUS_FILE)
            write_snapshot(raw, staging)  # what corpus_drift_sensor measures drift against
    published = store.latest(spec.name, "clean_corpus") / CORPUS_FILE
    sample = pq.ParquetFile(published).iter_batches(batch_size=5, columns=["doc_id", "title", "text"])
    kept = report.counts["kept"]

    counts = pd.DataFrame({"step": list(report.counts), "documents": list(report.counts.values())})
    minimum = 2 * settings.sizes().eval_queries
    return dg.MaterializeResult(
        metadata={
            "documents": dg.MetadataValue.int(kept),
            "source_documents": dg.MetadataValue.int(report.counts["read"]),
            "training_sample_documents": dg.MetadataValue.int(report.sample_documents),
            "training_sample_units": dg.MetadataValue.int(report.sample_units),
            "skipped_malformed": dg.MetadataValue.int(skipped.count),
            **({"skipped_examples": dg.MetadataValue.md("\n".join(f"- `{e}`" for e in skipped.examples))}
               if skipped.count else {}),
            "corpus_fingerprint": report.fingerprint,
            "counts_per_step": md_table(counts),
            **{f"words_{k}": dg.MetadataValue.float(v) for k, v in report.word_percentiles.items()},
            "near_duplicate_examples": md_table(pd.DataFrame(report.duplicate_examples,
                                                             columns=["original", "duplicate (served, not trained on)"])),
            "sample": md_table(next(sample).to_pandas()),
        },
        check_results=[dg.AssetCheckResult(
            check_name="enough_documents", passed=kept >= minimum,
            severity=dg.AssetCheckSeverity.WARN,  # a small eval set, not a broken run: the run goes on
            metadata={"documents": kept, "minimum": minimum},
        )],
    )


def resolve_extractors(spec: DomainSpec, units: pd.DataFrame, corpus_units: int) -> tuple[list[str], list[str]]:
    """The spec's extractors, or for `auto` those `choose_extractors` finds usable on this corpus
    (with one note per extractor on what it found)."""
    if spec.queries.pair_extractor != [AUTO]:
        return list(spec.queries.pair_extractor), []
    choice = choose_extractors(units, corpus_units, extractor_config(spec))
    return choice.keys, choice.notes


def judged_set_metadata(spec: DomainSpec) -> dict:
    """The judged set as `encoder-pipeline judge` grows it: plotted over time in the UI (on eval_set's
    materializations, and on the observation `judge` reports when it stops)."""
    summary = judged_set_summary(spec.judged_location()) if spec.judged else None
    if summary is None:
        return {}
    return {"judged_set_queries": dg.MetadataValue.int(summary["queries"]),
            "judged_set_judgments": dg.MetadataValue.int(summary["judgments"]),
            "judged_set_relevant": dg.MetadataValue.int(summary["relevant"]),
            "judged_set_last_grew": summary["last_grew"]}


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pandas", "openai"},
    owners=["team:retrieval"],
    ins={"corpus": dg.AssetIn(CLEAN_CORPUS, input_manager_key=PUBLISHED)},
)
def eval_set(context: dg.AssetExecutionContext, corpus: CorpusArtifact, artifacts: ArtifactStoreResource,
             settings: PipelineSettings, llm: LLMResource) -> dg.MaterializeResult:
    """The queries the report is judged on (eval set) and the dev slice that steers the choices (best
    epoch, index width), on held-out documents no training row touches (lib/heldout.py). Evidence,
    best first: the domain's human-judged set; held-out documents' own structure (titles, docstring
    summaries); one LLM-written query per held-out document, kept when BM25 finds its document
    (generated once per corpus). A structural set that BM25 or the off-the-shelf model already
    scores >= 0.95 on is flagged uninformative and replaced by synthetic queries."""
    spec = domain_spec(context)
    store = artifacts.store()
    sizes = settings.sizes()
    units = corpus.sample()  # held out from the training sample
    extractors, choice_notes = resolve_extractors(spec, units, len(corpus.units()))
    config = extractor_config(spec)
    # The corpus's own structural pairs as prompt examples (when the spec writes none): their
    # documents stay in training, never held out.
    structural = extract_training_pairs(units, [k for k in extractors if get(k).structural], config).pairs
    shown = structural.sort_values("doc_id").head(STRUCTURE_EXAMPLES)
    examples = prompt_examples([(e.passage, e.query) for e in spec.queries.examples], shown,
                               code=looks_like_code(units["text"]))
    def generate(doc_ids: list[str], passages: list[str]) -> list[str | None]:
        # Set up only when the split needs synthetic queries: a domain that keeps its text local
        # (remote LLM not allowed) still builds a judged or structural split.
        backend, cache_dir, params = llm_generation(spec, llm, store, SPLIT_SEED)
        return query_generator(PromptSpec(spec.queries.form, spec.queries.relevance, examples), backend,
                               cache_dir, params, spec.queries.min_words, SPLIT_SEED,
                               ProgressLog(context, "generating eval queries (prompts)"))(doc_ids, passages)
    cache, base = embeddings_cache(store, spec.name), settings.encoder(spec.trust_remote_code)
    score = haystack_scorer(units, lambda texts: cached_embeddings(base, texts, cache), base.encode)
    try:
        split = build_split(units, extractors, config, _judged(spec, settings), sizes.eval_queries,
                            sizes.dev_queries, score, generate,
                            keep=set(units["parent_id"][units["doc_id"].isin(set(shown["doc_id"]))]))
    except ValueError as error:
        raise dg.Failure(f"domain '{spec.name}': {error} (extractors: {', '.join(extractors) or 'none'})"
                         ) from error
    split.notes = choice_notes + split.notes
    with publish(context, artifacts, settings, {"evidence": split.evidence, "extractors": extractors},
                 [corpus]) as staging:
        write_eval_split(staging / EVAL_FILE, split)
    sample = pd.DataFrame([{"query": text, "relevant": ", ".join(split.qrels[qid])}
                           for qid, text in list(split.queries.items())[:8]])
    return dg.MaterializeResult(metadata={
        "queries": dg.MetadataValue.int(len(split.queries)),
        "dev_queries": dg.MetadataValue.int(len(split.dev.queries)),
        "held_out_documents": dg.MetadataValue.int(len(split.held_out_doc_ids)),
        "evidence": split.evidence,
        "evidence_meaning": EVIDENCE_WORDS[split.evidence],
        "dev_evidence": split.dev.evidence,
        "human_judged": split.human_judged,
        **judged_set_metadata(spec),
        "extractors": ", ".join(extractors),
        "notes": dg.MetadataValue.md("\n".join(f"- {note}" for note in split.notes) or "none"),
        **{f"{name}_{system}_ndcg_at_10": dg.MetadataValue.float(value)
           for name, measured in split.scores.items() for system, value in measured.items()},
        "sample": md_table(sample),
    })
