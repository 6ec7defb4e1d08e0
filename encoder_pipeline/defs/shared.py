"""What every stage's asset does around its `lib` call: find the domain, read upstream artifacts,
publish its own with a manifest, and describe it in metadata."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from encoder_pipeline.domains import DomainSpec, SpecError, load_domain
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest, start_reading, versions_read
from encoder_pipeline.lib.extractors import ExtractorConfig
from encoder_pipeline.lib.heldout import SPLIT_SEED
from encoder_pipeline.lib.layout import CLEAN_CORPUS, Artifact, handle
from encoder_pipeline.lib.llm import GenerationParams, LLMBackend
from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings


def domain_spec(context: dg.AssetExecutionContext) -> DomainSpec:
    """The partition's spec. Every asset starts here, so here starts its ledger of what it reads
    (`publish` records those versions as its upstream)."""
    start_reading()
    try:
        return load_domain(context.partition_key)
    except SpecError as error:
        raise dg.Failure(str(error)) from error


def version_of(context: dg.AssetExecutionContext) -> str:
    """The run's id: a version names the run that published it."""
    try:
        return context.run.run_id[:8]
    except dg.DagsterError:  # invoked directly (`dg.build_asset_context`): there is no run
        return uuid.uuid4().hex[:8]


def publish(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
            settings: PipelineSettings, config: dict[str, Any], upstream: Sequence[Artifact | str],
            corpus_fingerprint: str = ""):
    """Open a staging folder for this asset's new version (see ArtifactStore.publish). Its upstream:
    the version of each handle in `upstream` (what the asset received through `ins=`), the versions
    it read through the store (`start_reading`), and the latest version of any asset `upstream` names
    that it did not read."""
    store = artifacts.store()
    domain = context.partition_key
    asset = context.asset_key.to_user_string()
    read = {name: version for (where, name), version in versions_read().items()
            if where == domain and name != asset}  # not its own earlier versions
    received = {item.asset: item.version for item in upstream if isinstance(item, Artifact)}
    named = [item for item in upstream if isinstance(item, str) and item not in read and item not in received]
    upstream_versions = {**{name: store.latest_version(domain, name) for name in named}, **read, **received}
    fingerprint = corpus_fingerprint
    if not fingerprint and CLEAN_CORPUS in upstream_versions:
        fingerprint = handle(store, domain, CLEAN_CORPUS, upstream_versions[CLEAN_CORPUS]).fingerprint
    manifest = Manifest(
        domain=domain, asset=asset, version=version_of(context),
        seed=settings.seed, config={"profile": settings.profile, **config},
        corpus_fingerprint=fingerprint, upstream=upstream_versions,
    )
    return store.publish(manifest)


class ProgressLog:
    """A `progress(done, total)` callback that logs `what` with a rate and an ETA (corpus encodes,
    training steps), and keeps how many it saw done and how long that took (for metadata: the
    whole-corpus encode's own line)."""

    def __init__(self, context: dg.AssetExecutionContext, what: str):
        self.context, self.what = context, what
        self.started = time.perf_counter()
        self.done, self.seconds = 0, 0.0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.seconds = done, time.perf_counter() - self.started
        eta = self.seconds / max(done, 1) * (total - done)
        rate = done / max(self.seconds, 1e-9)
        shown = f"{rate:.1f}" if rate < 10 else f"{rate:.0f}"  # training steps come slower than texts
        self.context.log.info(f"{self.what}: {done:,} of {total:,} ({done / max(total, 1):.0%}), "
                              f"{shown}/s, about {eta:.0f} s left")

    def metadata(self, prefix: str) -> dict:
        return {f"{prefix}_units_encoded": dg.MetadataValue.int(self.done),
                f"{prefix}_encode_seconds": dg.MetadataValue.float(round(self.seconds, 2))}


def extractor_config(spec: DomainSpec) -> ExtractorConfig:
    """The spec's query length; choices seeded per corpus, not per run (the same pairs every seed)."""
    return ExtractorConfig(min_words=spec.queries.min_words, seed=SPLIT_SEED)


def llm_generation(spec: DomainSpec, llm: LLMResource, store: ArtifactStore, seed: int
                   ) -> tuple[Callable[[], LLMBackend], str, GenerationParams]:
    """(backend factory, response cache folder, sampling parameters) for generating this domain's
    queries; refused before any request when the LLM is remote and the spec does not allow it."""
    if llm.is_remote and not spec.remote_llm_allowed:
        raise dg.Failure(f"domain '{spec.name}' does not allow sending documents to a remote LLM; "
                         f"set remote_llm_allowed = true in {spec.source_file} to opt in")
    return (llm.backend_factory(store.root / "_models"), str(store.domain_dir(spec.name) / "_llm_cache"),
            llm.params(seed))


def embeddings_cache(store: ArtifactStore, domain: str) -> Path:
    """Content-keyed corpus embeddings shared by the stages of one domain."""
    return store.domain_dir(domain) / "_embeddings"


def md_table(frame: pd.DataFrame, max_chars: int = 160) -> dg.MetadataValue:
    """A markdown table for the UI, long cells shortened."""
    shown = frame.copy()
    for column in shown.columns:
        if not pd.api.types.is_numeric_dtype(shown[column]):
            shown[column] = (shown[column].astype(str).str.replace(r"\s+", " ", regex=True)
                             .str.replace("|", "\\|").str.slice(0, max_chars))
    return dg.MetadataValue.md(shown.to_markdown(index=False))
