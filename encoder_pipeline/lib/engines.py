"""Where the data stages run: Daft's native runner (the default) or a Ray cluster.

`use_daft_runner(address)` points Daft at a Ray cluster when an address is configured
(`settings.ray_address`, or ENCODER_PIPELINE_RAY_ADDRESS); every Daft stage of the process then runs
there (`clean_corpus`, synthetic generation). Daft fixes its runner once per process, which fits
Dagster's executors: each step runs in its own process (or pod) and sets it when it starts.

`embed_texts` is the corpus embedding of mining and indexing: on the Ray runner a Daft frame of
texts goes through a `@daft.cls` embedder, one model per Ray actor (`workers` actors, each with
`gpus_per_worker` GPUs); on the native runner it is the same encode call in this process.
`configure_engines` (called by the `settings` resource as each step starts) sets both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import daft
import numpy as np

from encoder_pipeline.lib.encoders import EncoderHandle

RAY_ADDRESS_ENV = "ENCODER_PIPELINE_RAY_ADDRESS"
EMBED_BATCH = 256  # texts per UDF call (each call sorts its texts by length, as encode does)


class RunnerError(RuntimeError):
    """Daft already runs on another runner in this process."""


@dataclass
class _EmbedPlan:
    workers: int = 0
    gpus_per_worker: float = 0.0


_PLAN = _EmbedPlan()  # per process, like Daft's runner


def configure_engines(ray_address: str, embed_workers: int = 0, embed_gpus: float = 0.0) -> str:
    """The process's Daft runner (`use_daft_runner`) and how `embed_texts` spreads work on Ray."""
    _PLAN.workers, _PLAN.gpus_per_worker = embed_workers, embed_gpus
    return use_daft_runner(ray_address)


def use_daft_runner(ray_address: str) -> str:
    """Run this process's Daft work on the Ray cluster at `ray_address` ("auto": the cluster this
    process belongs to); empty: native (unless DAFT_RUNNER or an earlier call chose). Returns the
    runner type now in force."""
    if not ray_address:
        if daft.runners._get_runner() is None and not os.environ.get("DAFT_RUNNER"):
            daft.set_runner_native()  # Daft would infer Ray wherever this process called ray.init()
        return daft.get_or_infer_runner_type()
    if daft.runners._get_runner() is not None:  # set already: by an earlier step, or Daft ran natively
        current = daft.get_or_infer_runner_type()
        if current != "ray":
            raise RunnerError(f"Daft already ran on the {current} runner in this process; the Ray address "
                              f"({RAY_ADDRESS_ENV} / settings.ray_address = {ray_address!r}) must be set "
                              "before any Daft work, e.g. under the multiprocess executor")
        return current
    daft.set_runner_ray(address=ray_address)
    return "ray"


def on_ray() -> bool:
    return daft.runners._get_runner() is not None and daft.get_or_infer_runner_type() == "ray"


class _Embedder:
    """Loads the encoder once per worker; a batch of texts in, their normalized embeddings out."""

    def __init__(self, encoder: EncoderHandle):
        self.encode = encoder.bound()

    @daft.method.batch(return_dtype=daft.DataType.list(daft.DataType.float32()), batch_size=EMBED_BATCH)
    def embed(self, texts: daft.Series) -> list[np.ndarray]:
        return list(self.encode(texts.to_pylist()))


def embed_texts(encoder: EncoderHandle, texts: Sequence[str]) -> np.ndarray:
    """L2-normalized float32 embeddings of `texts`, one row each, in order; on the Ray runner
    spread over the configured actors (0: one per EMBED_BATCH texts, at most the cluster's CPUs)."""
    if not on_ray() or not texts:
        return encoder.encode(texts)
    import ray

    workers = _PLAN.workers or max(1, min(int(ray.cluster_resources().get("CPU", 1)),
                                          len(texts) // EMBED_BATCH))
    embedder = daft.cls(max_concurrency=workers, gpus=_PLAN.gpus_per_worker)(_Embedder)
    frame = daft.from_pydict({"row": list(range(len(texts))), "text": list(texts)}).into_partitions(workers)
    embed = embedder(encoder).embed
    frame = frame.select("row", embed(daft.col("text")).alias("vector"))
    result = frame.to_pydict()
    order = np.argsort(np.asarray(result["row"]))
    return np.asarray([result["vector"][i] for i in order], dtype=np.float32)


def ray_address_from_env() -> str:
    return os.environ.get(RAY_ADDRESS_ENV, "")
