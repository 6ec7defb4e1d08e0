"""corpus_source: each domain's raw corpus, where its spec points, as an external asset upstream of
clean_corpus. Dagster never materializes it; `corpus_drift_sensor` observes it.

An observation's data version is the corpus's content fingerprint; its metadata is the drift since
the snapshot the served encoder was trained on (`lib.drift`): documents added / changed / removed,
the share of tokens that are new terms and the most frequent of them, and the canary: the served
encoder's eval Recall@10 over its index as built and with the corpus's changes applied.

Which snapshots: clean_corpus writes the raw corpus's snapshot into each of its versions. The
*training* snapshot is the one in the clean_corpus version the latest index_sweep read (index_sweep
runs with every retrain, never with an index refresh); the *indexed* snapshot is the one the served
index was built from.
"""

import dataclasses
import json

import daft
import dagster as dg
import pandas as pd

from encoder_pipeline.defs.corpus.assets import cleaning_config
from encoder_pipeline.domains import DomainSpec, domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.corpus import clean_corpus
from encoder_pipeline.lib.drift import (
    Drift,
    ServedCanary,
    Snapshot,
    Thresholds,
    corpus_snapshot,
    fill_canary,
    measure_drift,
    read_snapshot,
)
from encoder_pipeline.lib.index import load_index
from encoder_pipeline.lib.layout import EMBEDDING_INDEX, read_eval_split
from encoder_pipeline.lib.search import NothingServed, served_index
from encoder_pipeline.lib.sources import CorpusError, fingerprint_files, read_corpus
from encoder_pipeline.resources import PipelineSettings

CORPUS_SOURCE = "corpus_source"
DATA_VERSION_TAG = "dagster/data_version"  # what observable source assets record their version under

corpus_source = dg.AssetSpec(
    CORPUS_SOURCE,
    partitions_def=domain_partitions,
    group_name="corpus",
    kinds={"daft"},
    owners=["team:retrieval"],
    description="The domain's raw corpus where its spec points (files, object storage, or the "
    "Python standard library); read, never written, by the pipeline. `corpus_drift_sensor` records "
    "observations: content fingerprint (data version), documents added / changed / removed since "
    "training, vocabulary shift, canary Recall@10.",
)


def thresholds(spec: DomainSpec) -> Thresholds:
    return Thresholds(spec.drift.retrain_changed_fraction, spec.drift.retrain_new_token_share,
                      spec.drift.canary_recall_drop)


def read_source(spec: DomainSpec) -> daft.DataFrame:
    location = spec.corpus_location()
    return read_corpus(spec.corpus.format, location, spec.corpus.id_field, spec.corpus.title_field,
                       spec.corpus.text_field, spec.corpus.exclude, spec.corpus.on_malformed,
                       include=spec.corpus.include)


def files_fingerprint(spec: DomainSpec) -> str | None:
    """Paths, sizes and mtimes of the source files: a cheap test for "maybe changed". None for
    object storage, which it cannot see into (the content is read every tick there)."""
    location = spec.corpus_location()
    return None if "://" in location else fingerprint_files(spec.corpus.format, location)


def _corpus_version_snapshot(store: ArtifactStore, domain: str, manifest: dict) -> Snapshot | None:
    version = manifest.get("upstream", {}).get("clean_corpus")
    return read_snapshot(store.asset_dir(domain, "clean_corpus") / version) if version else None


def training_version(store: ArtifactStore, domain: str) -> str | None:
    """The clean_corpus version the encoders now in use were trained on (via index_sweep)."""
    try:
        return store.manifest(domain, "index_sweep")["upstream"].get("clean_corpus")
    except FileNotFoundError:
        return None


def training_snapshot(store: ArtifactStore, domain: str) -> Snapshot | None:
    version = training_version(store, domain)
    return read_snapshot(store.asset_dir(domain, "clean_corpus") / version) if version else None


def indexed_manifest(store: ArtifactStore, domain: str) -> dict | None:
    """The manifest of the embedding_index version users search now (what serving_index copied);
    None when nothing is served (no canary then) or that version has been collected."""
    try:
        served = served_index(domain, store)
        version = json.loads((served.index_dir / "manifest.json").read_text())["upstream"][EMBEDDING_INDEX]
        return json.loads((store.asset_dir(domain, EMBEDDING_INDEX) / version / "manifest.json").read_text())
    except (NothingServed, FileNotFoundError):
        return None


def versions(store: ArtifactStore, domain: str) -> dict[str, str | None]:
    """What the drift is measured against; a new one (a retrain, a refresh) means a new measurement."""
    indexed = indexed_manifest(store, domain)
    return {"trained": training_version(store, domain),
            "indexed": indexed.get("upstream", {}).get("clean_corpus") if indexed else None}


def _served_canary(spec: DomainSpec, store: ArtifactStore, settings: PipelineSettings) -> ServedCanary:
    served = served_index(spec.name, store)
    index = load_index(served.index_dir, encoders.model_fingerprint(str(served.model_path)))
    split = read_eval_split(store, spec.name)
    encoder = settings.encoder(spec.trust_remote_code, str(served.model_path))
    return ServedCanary(index, encoder.encode, split.queries, split.qrels)


def _clean_changed(spec: DomainSpec, settings: PipelineSettings, documents: pd.DataFrame,
                   judged: set[str]) -> pd.DataFrame:
    """The same normalization, chunking and filters as clean_corpus, over the changed documents."""
    config = dataclasses.replace(cleaning_config(spec, settings), max_documents=0)
    try:
        return clean_corpus(daft.from_pandas(documents), config, judged)[0]
    except CorpusError:  # raised when every changed document is filtered out
        return pd.DataFrame(columns=["doc_id", "parent_id", "title", "text"])


def measure(spec: DomainSpec, store: ArtifactStore, settings: PipelineSettings, raw: daft.DataFrame,
            current: pd.DataFrame) -> Drift:
    """`lib.drift.measure_drift` against this domain's training and served-index snapshots."""
    indexed = indexed_manifest(store, spec.name)
    return measure_drift(
        raw, current, training_snapshot(store, spec.name),
        _corpus_version_snapshot(store, spec.name, indexed) if indexed else None,
        lambda drift, changes, texts: fill_canary(
            drift, changes, texts, lambda: _served_canary(spec, store, settings),
            lambda documents, judged: _clean_changed(spec, settings, documents, judged)))


def observe(spec: DomainSpec, store: ArtifactStore, settings: PipelineSettings) -> Drift:
    """Read the domain's corpus and measure its drift (raises CorpusError when it cannot be read)."""
    raw = read_source(spec)
    return measure(spec, store, settings, raw, corpus_snapshot(raw))


def observation(domain: str, drift: Drift, action: str, reason: str) -> dg.AssetObservation:
    """corpus_source's observation for one partition: every figure a number, so the UI plots it."""
    metadata = {
        "fingerprint": drift.fingerprint,
        "documents": dg.MetadataValue.int(drift.documents),
        "decision": action,
        "reason": reason,
    }
    if drift.training_fingerprint is not None:
        metadata |= {
            "training_fingerprint": drift.training_fingerprint,
            "added": dg.MetadataValue.int(drift.added),
            "changed": dg.MetadataValue.int(drift.changed),
            "removed": dg.MetadataValue.int(drift.removed),
            "changed_fraction": dg.MetadataValue.float(drift.changed_fraction),
            "new_token_share": dg.MetadataValue.float(drift.new_token_share),
            "new_terms": dg.MetadataValue.md(
                "\n".join(f"- `{term}` ({count} documents)" for term, count in drift.new_terms) or "none"),
        }
    if drift.canary_drop is not None:
        metadata |= {
            "canary_recall_at_10": dg.MetadataValue.float(drift.canary_recall_after),
            "canary_recall_at_10_indexed": dg.MetadataValue.float(drift.canary_recall_before),
            "canary_recall_drop": dg.MetadataValue.float(drift.canary_drop),
        }
    elif drift.canary_note:
        metadata["canary"] = drift.canary_note
    return dg.AssetObservation(CORPUS_SOURCE, partition=domain, metadata=metadata,
                               tags={DATA_VERSION_TAG: drift.fingerprint})
