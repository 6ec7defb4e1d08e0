"""clean_corpus and eval_set: the retrievable units, and the queries the report is judged on."""

import dataclasses
import os

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq

from encoder_pipeline.defs.shared import (
    CORPUS_FILE,
    EVAL_FILE,
    domain_spec,
    md_table,
    publish,
    read_sample_units,
    write_eval_split,
)
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib.corpus import CleaningConfig
from encoder_pipeline.lib.corpus import clean_corpus_to_parquet as clean_to_parquet
from encoder_pipeline.lib.drift import write_snapshot
from encoder_pipeline.lib.pairs import held_out_split, judged_split, sample_judged
from encoder_pipeline.lib.sources import CorpusError, Skipped, read_corpus, read_judged
from encoder_pipeline.lib.train import MIN_TRAINING_PAIRS
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

GROUP = "corpus"


def _judged(spec: DomainSpec, settings: PipelineSettings):
    """The judged set (sampled down under a small profile), or None."""
    location = spec.judged_location()
    if location is None:
        return None
    if "://" not in location and not os.path.isdir(location):
        raise dg.Failure(
            f"domain '{spec.name}': judged set not found at {location} (spec {spec.source_file}, "
            "field 'judged.path'); set ENCODER_PIPELINE_CORPUS_ROOT or fix the path"
        )
    try:
        queries, qrels = read_judged(location, spec.judged.split)
    except CorpusError as error:
        raise dg.Failure(f"domain '{spec.name}' (spec {spec.source_file}): {error}") from error
    return sample_judged(queries, qrels, settings.sizes().judged_queries, settings.seed)


def cleaning_config(spec: DomainSpec, settings: PipelineSettings) -> CleaningConfig:
    return CleaningConfig(
        max_words=spec.unit.max_words, min_words=spec.unit.min_words,
        normalize_whitespace=spec.unit.normalize_whitespace,
        boilerplate_patterns=tuple(spec.unit.boilerplate_patterns),
        num_hashes=spec.dedupe.num_hashes, ngram_size=spec.dedupe.ngram_size,
        bands=spec.dedupe.bands, jaccard_threshold=spec.dedupe.jaccard_threshold,
        sample_documents=settings.sizes().training_documents, seed=settings.seed,
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"daft", "parquet"},
    owners=["team:retrieval"],
    check_specs=[dg.AssetCheckSpec("enough_documents", asset="clean_corpus")],
    deps=["corpus_source"],  # the raw corpus, observed by corpus_drift_sensor (defs/domains/drift.py)
)
def clean_corpus(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                 settings: PipelineSettings) -> dg.MaterializeResult:
    """The domain's whole corpus as retrievable units: loaded, unicode/whitespace-normalized, chunked,
    empties and boilerplate dropped, exact and MinHash near-duplicates removed, stable ids.
    Judged documents are never dropped or merged; chunks keep their source document id. Each unit is
    marked in or out of the training sample (the profile's `training_documents`, a stable salted-hash
    sample, judged documents always in): training data is built on the sample, the served index
    covers every unit."""
    spec = domain_spec(context)
    location = spec.corpus_location() if spec.corpus.format != "python_stdlib" else "(stdlib)"
    judged = _judged(spec, settings)
    protected = {doc for rels in judged[1].values() for doc in rels} if judged else set()
    # Fewer units than training needs pairs is refused here, before any model or LLM runs.
    config = dataclasses.replace(cleaning_config(spec, settings), min_units=MIN_TRAINING_PAIRS)
    store = artifacts.store()
    # Cleaning streams to a scratch file beside the artifacts (the corpus never sits in memory
    # whole), which then moves into the published version with a rename.
    with store.scratch(spec.name) as scratch:
        cleaned = scratch / CORPUS_FILE
        skipped = Skipped()  # malformed entries left out under corpus.on_malformed = "skip"
        try:
            raw = read_corpus(spec.corpus.format, location, spec.corpus.id_field,
                              spec.corpus.title_field, spec.corpus.text_field, spec.corpus.exclude,
                              spec.corpus.on_malformed, skipped, include=spec.corpus.include)
            report = clean_to_parquet(raw, config, cleaned, protected)
        except CorpusError as error:
            raise dg.Failure(f"domain '{spec.name}' (spec {spec.source_file}, corpus {location}): "
                             f"{error}") from error
        with publish(context, artifacts, settings, config.__dict__, upstream=[],
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
                                                             columns=["kept", "dropped"])),
            "sample": md_table(next(sample).to_pandas()),
        },
        check_results=[dg.AssetCheckResult(
            check_name="enough_documents", passed=kept >= minimum,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"documents": kept, "minimum": minimum},
        )],
    )


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"pandas"},
    owners=["team:retrieval"],
    deps=[clean_corpus],
)
def eval_set(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
             settings: PipelineSettings) -> dg.MaterializeResult:
    """The queries the report is judged on: the domain's human-judged set when it has one, else
    structural pairs on a held-out slice of documents (flagged as not human-judged). Its documents
    appear in no training row; only the report reads it."""
    spec = domain_spec(context)
    store = artifacts.store()
    units = read_sample_units(store, spec.name)  # held-out structure comes from the training sample
    judged = _judged(spec, settings)
    if judged:
        split = judged_split(*judged)
    else:
        split = held_out_split(units, spec.queries.pair_extractor, settings.sizes().eval_queries,
                               settings.seed)
    if not split.queries:
        raise dg.Failure(f"domain '{spec.name}': no eval queries could be built "
                         f"(extractor '{spec.queries.pair_extractor}' found no structure)")
    with publish(context, artifacts, settings, {"judged": bool(judged)}, ["clean_corpus"]) as staging:
        write_eval_split(staging / EVAL_FILE, split)
    sample = pd.DataFrame([{"query": text, "relevant": ", ".join(split.qrels[qid])}
                           for qid, text in list(split.queries.items())[:8]])
    return dg.MaterializeResult(metadata={
        "queries": dg.MetadataValue.int(len(split.queries)),
        "eval_documents": dg.MetadataValue.int(len(split.eval_doc_ids)),
        "human_judged": split.human_judged,
        "sample": md_table(sample),
    })
