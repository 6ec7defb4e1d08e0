"""FAISS indexes bound to the encoder that built them, at a chosen Matryoshka width and precision.

A configuration is `dims` (the first `dims` columns of each embedding, re-normalized: the encoders are
trained under MatryoshkaLoss, so a prefix is itself an embedding) x `precision`:

| precision     | FAISS structure                                   | bytes / vector       |
|---------------|---------------------------------------------------|----------------------|
| `fp32`        | `IndexFlatIP` (exact)                             | 4 x dims             |
| `fp16`        | `IndexScalarQuantizer` QT_fp16                    | 2 x dims             |
| `int8`        | `IndexScalarQuantizer` QT_8bit (per-dim min/max)  | dims                 |
| `binary+int8` | `IndexBinaryFlat` on sign bits, then rescoring    | dims / 8 + dims      |
| `binary+fp32` | `IndexBinaryFlat` on sign bits, then rescoring    | dims / 8 + 4 x dims  |
| `ivfpq`       | `IndexIVFPQ` (large corpora only)                 | dims / 4 (+ lists)   |

The binary precisions follow sentence-transformers' embedding quantization recipe: the sign bits
(`quantize_embeddings(..., "ubinary")`) retrieve `rescore_multiplier x k` candidates by Hamming
distance, and the float query is then scored against those candidates' int8 (a QT_8bit scalar
quantizer, decoded by FAISS) or fp32 vectors. Both files count as served bytes.

An index folder holds `index.faiss`, optionally `rescore.faiss` (the rescoring vectors), `ids.json.gz`
(row -> unit id, parent document, title; each parent stored once; gzipped, since on a small corpus
the id strings otherwise weigh as much as int8 vectors) and `index.json` (encoder
revision, dims, precision, count). Loading with a different encoder is refused: vectors from two
encoders live in different spaces and mixing them silently ruins retrieval.

`LoadedIndex.search` always takes full-dimension normalized query embeddings, as the encoder outputs
them; truncation, re-normalization, binarization and rescoring happen inside, according to `info`.

GPU: with `faiss-gpu` and `faiss.get_num_gpus() > 0`, `on_gpus` clones an index onto every GPU:
the exact flat index for bulk searches (`LoadedIndex.bulk_search`, and mining's candidate search),
and IVF-PQ for its k-means training and adds (then copied back: the served index is a CPU one).
The other structures stay on the CPU: FAISS has no GPU counterpart of the flat
`IndexScalarQuantizer`, the binary rescoring step is a CPU gather, and served single-query latency
is measured on one CPU thread anyway.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from sentence_transformers.util.quantization import quantize_embeddings

# The Matryoshka widths the encoders are trained for (lib.losses) and the sweep tries.
MATRYOSHKA_DIMS: tuple[int, ...] = (384, 192, 96, 48)
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "binary+int8", "binary+fp32", "ivfpq")
BINARY_PRECISIONS = ("binary+int8", "binary+fp32")
RESCORE_MULTIPLIER = 4  # binary: candidates retrieved per result, then rescored
RESCORE_CHUNK = 64  # queries rescored at once (bounds the gathered candidate vectors)
IVFPQ_MIN_VECTORS = 20_000  # below this, IVF-PQ saves little and its k-means has too few points
PQ_SUBVECTOR_DIMS = 4  # IVF-PQ: one byte per 4 dimensions
LEGACY_KINDS = {"flat": "fp32", "sq8": "int8"}  # the names build_index used first

INDEX_FILE, RESCORE_FILE, IDS_FILE, INFO_FILE = "index.faiss", "rescore.faiss", "ids.json.gz", "index.json"
LEGACY_IDS_FILE = "ids.json"
SERVED_FILES = (INDEX_FILE, RESCORE_FILE, IDS_FILE, LEGACY_IDS_FILE, INFO_FILE)


class EncoderMismatch(ValueError):
    """The index was built with another encoder revision than the one offered to query it."""


@dataclass(frozen=True)
class IndexConfig:
    dims: int
    precision: str

    @property
    def name(self) -> str:
        return f"{self.precision}@{self.dims}"


def truncate(embeddings: np.ndarray, dims: int) -> np.ndarray:
    """The first `dims` columns, re-normalized to unit length (float32, C-contiguous)."""
    vectors = np.asarray(embeddings, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if dims >= vectors.shape[1]:
        return np.ascontiguousarray(vectors)
    prefix = vectors[:, :dims]
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    return np.ascontiguousarray(prefix / np.maximum(norms, 1e-12), dtype=np.float32)


def sweep_dims(model_dim: int, dims: Sequence[int] | None = None) -> list[int]:
    """The widths to try, widest first: the model's own width plus every `dims` (default
    MATRYOSHKA_DIMS) below it."""
    chosen = {model_dim, *(d for d in (MATRYOSHKA_DIMS if dims is None else dims) if 0 < d <= model_dim)}
    return sorted(chosen, reverse=True)


def index_configs(model_dim: int, n_vectors: int, dims: Sequence[int] | None = None,
                  precisions: Sequence[str] = PRECISIONS) -> list[IndexConfig]:
    """Every (dims, precision) worth building: `ivfpq` only from IVFPQ_MIN_VECTORS vectors, binary
    only at widths divisible by 8."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"unknown precision(s) {sorted(unknown)}; expected some of {PRECISIONS}")
    configs = []
    for d in sweep_dims(model_dim, dims):
        for precision in precisions:
            if precision == "ivfpq" and n_vectors < IVFPQ_MIN_VECTORS:
                continue
            if precision in BINARY_PRECISIONS and d % 8:
                continue
            configs.append(IndexConfig(d, precision))
    return configs


def ivfpq_params(n_vectors: int, dims: int) -> dict[str, int]:
    """nlist ~ sqrt(n) (at least 39 training points per list), m subquantizers of PQ_SUBVECTOR_DIMS
    dimensions (a divisor of dims), 8 bits each, nprobe = nlist / 8 (at least 8)."""
    nlist = max(1, min(round(math.sqrt(n_vectors)), n_vectors // 39))
    m = max(1, dims // PQ_SUBVECTOR_DIMS)
    while dims % m:
        m -= 1
    return {"nlist": nlist, "m": m, "nbits": 8, "nprobe": min(nlist, max(8, nlist // 8))}


def on_gpus(index: faiss.Index) -> faiss.Index:
    """`index` cloned onto every GPU (sharded) when faiss-gpu sees one; else `index` itself."""
    if faiss.get_num_gpus() == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = True  # IVF-PQ codes above 48 bytes need float16 lookup tables on GPU
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _flat_or_sq(vectors: np.ndarray, precision: str) -> faiss.Index:
    dim = vectors.shape[1]
    if precision == "fp32":
        index = faiss.IndexFlatIP(dim)
    elif precision in ("fp16", "int8"):
        qtype = faiss.ScalarQuantizer.QT_fp16 if precision == "fp16" else faiss.ScalarQuantizer.QT_8bit
        index = faiss.IndexScalarQuantizer(dim, qtype, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    elif precision == "ivfpq":
        params = ivfpq_params(len(vectors), dim)
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, params["nlist"], params["m"],
                                 params["nbits"], faiss.METRIC_INNER_PRODUCT)
        if faiss.get_num_gpus() > 0:  # k-means and encoding on the GPUs, served from the CPU
            gpu = on_gpus(index)
            gpu.train(vectors)
            gpu.add(vectors)
            index = faiss.index_gpu_to_cpu(gpu)
            index.nprobe = params["nprobe"]
            return index
        index.train(vectors)
        index.nprobe = params["nprobe"]
    else:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    index.add(vectors)
    return index


def build_index(embeddings: np.ndarray, kind: str = "sq8") -> faiss.Index:
    """One FAISS index over the vectors as given: `flat`/`fp32` (exact), `sq8`/`int8` (4x smaller),
    `fp16` or `ivfpq`. For a Matryoshka width or a binary precision, use `build_quantized`."""
    precision = LEGACY_KINDS.get(kind, kind)
    if precision in BINARY_PRECISIONS:
        raise ValueError(f"{kind!r} needs rescoring vectors: use build_quantized")
    return _flat_or_sq(np.ascontiguousarray(embeddings, dtype=np.float32), precision)


@dataclass
class LoadedIndex:
    index: faiss.Index | faiss.IndexBinary
    ids: list[str]
    parents: list[str]
    titles: list[str]
    info: dict
    rescore: faiss.Index | None = None  # binary precisions: the int8 or fp32 vectors to rescore with
    _gpu: faiss.Index | None = field(default=None, repr=False)

    @property
    def dims(self) -> int:
        return int(self.info.get("dims", self.index.d))

    @property
    def precision(self) -> str:
        return _precision_of(self.info)

    def search_arrays(self, query_embeddings: np.ndarray, k: int, index: faiss.Index | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (queries, k'), rows -1 where fewer than k results exist."""
        queries = truncate(query_embeddings, self.dims)
        k = min(k, self.index.ntotal)
        if self.precision not in BINARY_PRECISIONS:
            return (index or self.index).search(queries, k)
        candidates = min(k * int(self.info.get("rescore_multiplier", RESCORE_MULTIPLIER)),
                         self.index.ntotal)
        _, rows = self.index.search(quantize_embeddings(queries, precision="ubinary"), candidates)
        parts = [self._rescore(queries[i:i + RESCORE_CHUNK], rows[i:i + RESCORE_CHUNK], k)
                 for i in range(0, len(queries), RESCORE_CHUNK)]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])

    def _rescore(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The float queries against their candidates' int8 (decoded by FAISS) or fp32 vectors."""
        safe = np.where(rows >= 0, rows, 0)
        vectors = self.rescore.reconstruct_batch(safe.ravel()).reshape(*rows.shape, -1)
        scores = np.einsum("qd,qcd->qc", queries, vectors)
        scores[rows < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, axis=1)
        top_rows = np.take_along_axis(rows, order, axis=1)
        top_rows[~np.isfinite(top_scores)] = -1
        return top_scores.astype(np.float32), top_rows

    def search(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Top-k (row, score) per query; takes full-dimension normalized embeddings."""
        return _as_hits(*self.search_arrays(query_embeddings, k))

    def bulk_search(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for many queries at once (evaluation); on a GPU when one is there and trivial."""
        if self.precision == "fp32" and isinstance(self.index, faiss.IndexFlat) and faiss.get_num_gpus() > 0:
            if self._gpu is None:
                self._gpu = on_gpus(self.index)
            return _as_hits(*self.search_arrays(query_embeddings, k, self._gpu))
        return self.search(query_embeddings, k)


def _precision_of(info: dict) -> str:
    """`precision` from an index's info; folders written before it existed carry only `kind`."""
    kind = info.get("precision", info.get("kind", "fp32"))
    return LEGACY_KINDS.get(kind, kind)


def _as_hits(scores: np.ndarray, rows: np.ndarray) -> list[list[tuple[int, float]]]:
    return [[(int(r), float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0]
            for rr, ss in zip(rows, scores, strict=True)]


def build_quantized(embeddings: np.ndarray, dims: int, precision: str,
                    ids: Sequence[str] | None = None, parents: Sequence[str] | None = None,
                    titles: Sequence[str] | None = None,
                    rescore_multiplier: int = RESCORE_MULTIPLIER) -> LoadedIndex:
    """An index of `embeddings` (full-dimension, normalized) at `dims` x `precision`, ready to search.

    ids / parents / titles default to the row numbers (and empty titles).
    """
    model_dim = int(np.asarray(embeddings).shape[1])
    if dims > model_dim:
        raise ValueError(f"dims {dims} exceeds the embedding dimension {model_dim}")
    vectors = truncate(embeddings, dims)
    n = len(vectors)
    info: dict = {"dims": dims, "precision": precision, "model_dim": model_dim, "count": n}
    rescore = None
    if precision in BINARY_PRECISIONS:
        if dims % 8:
            raise ValueError(f"binary precision needs dims divisible by 8, not {dims}")
        index = faiss.IndexBinaryFlat(dims)
        index.add(quantize_embeddings(vectors, precision="ubinary"))
        rescore = _flat_or_sq(vectors, precision.split("+")[1])
        info["rescore_multiplier"] = rescore_multiplier
    else:
        index = _flat_or_sq(vectors, precision)
        if precision == "ivfpq":
            info.update(ivfpq_params(n, dims))
    rows = [str(i) for i in range(n)]
    return LoadedIndex(index, list(ids) if ids is not None else rows,
                       list(parents) if parents is not None else rows,
                       list(titles) if titles is not None else [""] * n, info, rescore)


# IVF lists keep the ids given at add time, so after remove_ids a row number is no longer a position
# in the id map; the flat structures compact in order, so positions stay aligned with it.
UPDATABLE_PRECISIONS = ("fp32", "fp16", "int8", "binary+int8", "binary+fp32")


def update_index(loaded: LoadedIndex, remove_rows: Sequence[int], embeddings: np.ndarray,
                 ids: Sequence[str], parents: Sequence[str], titles: Sequence[str]) -> LoadedIndex:
    """Drop `remove_rows`, then append `embeddings` (full-dimension, normalized, from the encoder
    that built the index) with their ids; changes `loaded` in place and returns it.

    Kept vectors keep their relative order, so the id map stays aligned with the rows. The int8
    scalar quantizer keeps the per-dimension ranges it was trained on: a new vector outside them is
    clipped, which is why a refresh that replaces a large share of the corpus should rebuild.
    """
    if loaded.precision not in UPDATABLE_PRECISIONS:
        raise ValueError(f"{loaded.precision} indexes cannot be updated in place; rebuild them")
    rows = np.unique(np.asarray(remove_rows, dtype=np.int64))
    if len(rows):
        for structure in (loaded.index, loaded.rescore):
            if structure is not None:
                structure.remove_ids(rows)
    kept = np.ones(len(loaded.ids), dtype=bool)
    kept[rows] = False
    if len(embeddings):
        vectors = truncate(embeddings, loaded.dims)
        if loaded.precision in BINARY_PRECISIONS:
            loaded.index.add(quantize_embeddings(vectors, precision="ubinary"))
            loaded.rescore.add(vectors)
        else:
            loaded.index.add(vectors)

    def merged(old: Sequence[str], new: Sequence[str]) -> list[str]:
        return [value for value, keep in zip(old, kept, strict=True) if keep] + list(new)

    loaded.ids, loaded.parents, loaded.titles = (merged(loaded.ids, ids), merged(loaded.parents, parents),
                                                 merged(loaded.titles, titles))
    loaded.info = {**loaded.info, "count": int(loaded.index.ntotal)}
    loaded._gpu = None  # a GPU copy made before the update is stale
    return loaded


def save_index(directory: str | Path, index: faiss.Index | LoadedIndex, ids: Sequence[str],
               parents: Sequence[str], titles: Sequence[str], encoder_revision: str, kind: str = "",
               build_seconds: float = 0.0) -> int:
    """Write the index folder; returns the bytes a server loads to answer queries.

    `index` is a `LoadedIndex` from `build_quantized` (its dims and precision are kept), or a bare
    FAISS index from `build_index` with its `kind`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(index, LoadedIndex):
        loaded = index
    else:
        precision = LEGACY_KINDS.get(kind, kind or "fp32")
        loaded = LoadedIndex(index, [], [], [], {"dims": index.d, "precision": precision,
                                                 "model_dim": index.d, "count": index.ntotal})
    if isinstance(loaded.index, faiss.IndexBinary):
        faiss.write_index_binary(loaded.index, str(directory / INDEX_FILE))
    else:
        faiss.write_index(loaded.index, str(directory / INDEX_FILE))
    if loaded.rescore is not None:
        faiss.write_index(loaded.rescore, str(directory / RESCORE_FILE))
    payload = json.dumps(_id_map(ids, parents, titles), separators=(",", ":")).encode()
    (directory / IDS_FILE).write_bytes(gzip.compress(payload, mtime=0))
    info = {"encoder_revision": encoder_revision, **loaded.info, "kind": kind or loaded.precision,
            "dim": loaded.dims, "build_seconds": round(build_seconds, 3)}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2))
    return served_bytes(directory)


def served_bytes(directory: str | Path) -> int:
    """Every byte loaded to serve a query: the index, the rescoring vectors, the id map, the info."""
    directory = Path(directory)
    return sum(os.path.getsize(directory / name) for name in SERVED_FILES if (directory / name).exists())


def vector_bytes(directory: str | Path) -> int:
    """The index and rescoring files alone (what the precision and width change)."""
    directory = Path(directory)
    return sum(os.path.getsize(directory / name) for name in (INDEX_FILE, RESCORE_FILE)
               if (directory / name).exists())


def load_index(directory: str | Path, encoder_revision: str) -> LoadedIndex:
    """The index folder, refused (EncoderMismatch) unless it was built by `encoder_revision`."""
    directory = Path(directory)
    info = json.loads((directory / INFO_FILE).read_text())
    if info["encoder_revision"] != encoder_revision:
        raise EncoderMismatch(
            f"index at {directory} was built with encoder {info['encoder_revision']}, "
            f"not {encoder_revision}: re-embed the corpus with this encoder"
        )
    ids, parents, titles = _read_id_map(read_id_map(directory))
    if _precision_of(info) in BINARY_PRECISIONS:
        index = faiss.read_index_binary(str(directory / INDEX_FILE))
        rescore = faiss.read_index(str(directory / RESCORE_FILE))
    else:
        index, rescore = faiss.read_index(str(directory / INDEX_FILE)), None
        if "nprobe" in info:
            index.nprobe = int(info["nprobe"])
    return LoadedIndex(index, ids, parents, titles, info, rescore)


def _id_map(ids: Sequence[str], parents: Sequence[str], titles: Sequence[str]) -> dict:
    """Row -> unit id, parent document, title, without repeating itself: parents are omitted when
    every unit is its own document, else stored once each and referenced by row."""
    ids, parents = list(ids), list(parents)
    if parents == ids:
        return {"ids": ids, "parents": None, "titles": list(titles)}
    unique = list(dict.fromkeys(parents))
    position = {parent: i for i, parent in enumerate(unique)}
    return {"ids": ids, "parent_ids": unique, "parent_rows": [position[p] for p in parents],
            "titles": list(titles)}


def read_id_map(directory: str | Path) -> dict:
    path = Path(directory) / IDS_FILE
    if not path.exists() and (Path(directory) / LEGACY_IDS_FILE).exists():  # indexes built before gzip
        return json.loads((Path(directory) / LEGACY_IDS_FILE).read_text())
    return json.loads(gzip.decompress(path.read_bytes()))


def _read_id_map(mapping: dict) -> tuple[list[str], list[str], list[str]]:
    ids = mapping["ids"]
    if "parent_rows" in mapping:
        parents = [mapping["parent_ids"][i] for i in mapping["parent_rows"]]
    else:
        parents = mapping["parents"] if mapping.get("parents") is not None else list(ids)
    return ids, parents, mapping["titles"]
