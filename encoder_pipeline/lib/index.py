"""FAISS indexes bound to the encoder that built them.

An index folder holds `index.faiss`, `ids.json` (row -> unit id, parent id, title) and `index.json`
(the encoder revision, dimension, kind). Loading with a different encoder is refused: vectors from two
encoders live in different spaces and mixing them silently ruins retrieval.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np


class EncoderMismatch(ValueError):
    """The index was built with another encoder revision than the one offered to query it."""


@dataclass
class LoadedIndex:
    index: faiss.Index
    ids: list[str]
    parents: list[str]
    titles: list[str]
    info: dict

    def search(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        scores, rows = self.index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32),
                                         min(k, self.index.ntotal))
        return [[(int(r), float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0]
                for rr, ss in zip(rows, scores, strict=True)]


def build_index(embeddings: np.ndarray, kind: str = "sq8") -> faiss.Index:
    """`flat` (fp32, exact) or `sq8` (int8 scalar quantizer: 4x smaller, inner product)."""
    dim = embeddings.shape[1]
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "sq8":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise ValueError(f"unknown index kind {kind!r} (expected 'flat' or 'sq8')")
    index.add(vectors)
    return index


def save_index(directory: str | Path, index: faiss.Index, ids: list[str], parents: list[str],
               titles: list[str], encoder_revision: str, kind: str, build_seconds: float) -> int:
    """Write the index folder; returns the bytes a server loads to answer queries."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(directory / "index.faiss"))
    (directory / "ids.json").write_text(json.dumps({"ids": ids, "parents": parents, "titles": titles}))
    info = {"encoder_revision": encoder_revision, "kind": kind, "dim": index.d,
            "count": index.ntotal, "build_seconds": round(build_seconds, 3)}
    (directory / "index.json").write_text(json.dumps(info, indent=2))
    return served_bytes(directory)


def served_bytes(directory: str | Path) -> int:
    """Every byte loaded to serve a query: the vectors and the id map."""
    return sum(os.path.getsize(Path(directory) / name) for name in ("index.faiss", "ids.json"))


def load_index(directory: str | Path, encoder_revision: str) -> LoadedIndex:
    directory = Path(directory)
    info = json.loads((directory / "index.json").read_text())
    if info["encoder_revision"] != encoder_revision:
        raise EncoderMismatch(
            f"index at {directory} was built with encoder {info['encoder_revision']}, "
            f"not {encoder_revision}: re-embed the corpus with this encoder"
        )
    mapping = json.loads((directory / "ids.json").read_text())
    return LoadedIndex(faiss.read_index(str(directory / "index.faiss")), mapping["ids"],
                       mapping["parents"], mapping["titles"], info)
