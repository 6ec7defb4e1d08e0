"""The teacher: the stronger encoder every training row is distilled from, that mines the hard
negatives, and that the report shows off the shelf as the ceiling (and what serving it would cost).

One recipe for every domain: by default the packaged all-mpnet-base-v2 (GPL's teacher role, here a
bi-encoder: its scores of a batch cost one embedding per text). Its embeddings go through the
domain's shared embedding cache (`vector_cache.cached_embeddings`, keyed by the teacher's revision,
sequence length and precision), so mining, the rows' labels and the report encode a text once.
Inference runs in bf16 where the CPU has native bf16 and fp32 otherwise (`encoders.native_bf16`).
The ONNX backend is not used for the teacher: `lib.encoders`' ONNX export is int8-quantized for
serving (lossy), and its fp32 export was not measured faster than bf16 torch on these hosts, nor
than fp32 torch on an AVX2-only one (0.97x for this teacher; `benchmarks/bulk_encoding.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoder_pipeline.lib.encoders import EncoderHandle, model_fingerprint, resolve_model_path
from encoder_pipeline.lib.packaged_models import PackageMissing
from encoder_pipeline.lib.vector_cache import Progress, cached_embeddings

DEFAULT_TEACHER = "all-mpnet-base-v2"


@dataclass(frozen=True)
class TeacherChoice:
    """Which encoder teaches, and why it is not the one asked for when it is not."""

    model: str  # a model name or folder: what mines, scores the rows and is reported
    requested: str  # what the settings, the spec or the profile asked for ("": the base model)
    fallback: str | None = None  # the message when the requested teacher could not be used

    @property
    def revision(self) -> str:
        return model_fingerprint(self.model)

    def describe(self) -> dict:
        """For manifests, metadata and the report."""
        return {"teacher": self.model, "teacher_revision": self.revision, "teacher_requested": self.requested,
                "teacher_fallback": self.fallback or ""}


def choose_teacher(requested: str, base_model: str) -> TeacherChoice:
    """The teacher to use: `requested`, else the base model. A packaged teacher whose packages are
    not installed falls back to the base model, with the message saying how to install them; a
    folder or name that does not load stays an error (the user named it)."""
    if not requested or requested == base_model:
        return TeacherChoice(base_model, requested)
    try:
        resolve_model_path(requested)  # assembles a packaged model from its parts on first use
    except PackageMissing as error:
        return TeacherChoice(base_model, requested,
                             f"the teacher {requested!r} is not installed ({error}); the base model "
                             f"{base_model!r} teaches instead, a weaker signal")
    return TeacherChoice(requested, requested)


@dataclass(frozen=True)
class TeacherEmbedder:
    """texts -> the teacher's embeddings, through the domain's shared embedding cache (picklable, so
    it can cross into training's DDP processes)."""

    encoder: EncoderHandle
    cache_dir: Path
    progress: Progress | None = None

    def __call__(self, texts: list[str]) -> np.ndarray:
        return cached_embeddings(self.encoder, texts, self.cache_dir, self.progress)
