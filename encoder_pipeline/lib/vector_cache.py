"""The on-disk embedding cache every stage encodes a corpus through: one row per text, keyed by the
text's content and the model's revision, sequence length and precision. Above `encoders` (loading,
encoding) and `engines` (where encoding runs: in process or on Ray), so neither imports the other."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from encoder_pipeline.lib.encoders import EncoderHandle, model_fingerprint, native_bf16
from encoder_pipeline.lib.engines import embed_texts

EMBED_SHARD = 4096  # texts encoded and written per cache shard: a crash loses at most one shard
Progress = Callable[[int, int], None]  # (texts done, texts to encode)


def _text_keys(texts: Sequence[str]) -> np.ndarray:
    """One 16-byte content key per text, as rows of a uint8 array."""
    return np.frombuffer(b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts),
                         dtype=np.uint8).reshape(len(texts), 16)


def _cache_folder(encoder: EncoderHandle, cache_dir: str | Path) -> Path:
    """One folder per (model revision, max_seq_length, precision): a key never mixes encoders."""
    precision = "bf16" if encoder.bf16 and native_bf16() else "fp32"  # what inference_precision really runs
    return Path(cache_dir) / f"units-{model_fingerprint(encoder.model)}-{encoder.max_seq_length}-{precision}"


def cached_embeddings(encoder: EncoderHandle, texts: Sequence[str], cache_dir: str | Path,
                      progress: Progress | None = None) -> np.ndarray:
    """Embeddings of `texts` (one row each, in order), each text cached on disk under its content and
    the encoder's revision, sequence length and precision.

    Every stage that encodes a corpus goes through here (pair filtering, mining, the sweep, the
    served index, the report), so a text is encoded once per model: the whole-corpus index reuses the
    sample's vectors, and a re-run or a corpus refresh encodes only new or changed texts. The texts
    not yet cached are encoded in shards of EMBED_SHARD (on Ray when Daft runs there), each written
    whole by a rename before the next starts, so an interrupted encode resumes where it stopped.
    `progress(done, total)` is called after each shard.
    """
    folder = _cache_folder(encoder, cache_dir)
    keys = _text_keys(texts)
    known: dict[bytes, tuple[Path, int]] = {}
    for shard in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
        for row, key in enumerate(np.load(shard)["keys"]):
            known[key.tobytes()] = (shard, row)
    missing = list({key.tobytes(): i for i, key in enumerate(keys)  # each distinct text once
                    if key.tobytes() not in known}.values())
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(missing), EMBED_SHARD):
            rows = missing[start:start + EMBED_SHARD]
            vectors = embed_texts(encoder, [texts[i] for i in rows])
            shard = folder / f"{hashlib.sha1(keys[rows].tobytes()).hexdigest()[:20]}.npz"
            tmp = folder / f".{shard.name}.{os.getpid()}.tmp"  # not *.npz: never read half-written
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=keys[rows], vectors=vectors.astype(np.float32))
            os.replace(tmp, shard)
            for row, i in enumerate(rows):
                known[keys[i].tobytes()] = (shard, row)
            if progress:
                progress(min(start + EMBED_SHARD, len(missing)), len(missing))
    out: np.ndarray | None = None
    by_shard: dict[Path, list[tuple[int, int]]] = {}
    for i, key in enumerate(keys):
        shard, row = known[key.tobytes()]
        by_shard.setdefault(shard, []).append((i, row))
    for shard, pairs in by_shard.items():
        vectors = np.load(shard)["vectors"]
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        targets, rows = zip(*pairs, strict=True)
        out[list(targets)] = vectors[list(rows)]
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
