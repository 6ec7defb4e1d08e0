"""How embedding_index builds its index: incrementally when only the corpus moved, else in full.

When the latest embedding_index was built from the same index_sweep version (so the same encoder and
the same chosen width x precision) and the corpus has changed since, the index it published is
updated in place of a rebuild: units removed or changed since are dropped, new and changed ones are
embedded by the index's encoder and appended (`lib.index.update_index`). That is the path
`index_refresh_job` takes when `corpus_drift_sensor` finds the drift below the retrain thresholds.

A full build (every unit embedded, the structure rebuilt) happens otherwise: a new sweep (a retrain),
an IVF-PQ index, a previous corpus version no longer on disk, or more than MAX_REFRESH_FRACTION of the
units to replace, because the int8 quantizer's ranges were trained on the old vectors.
"""

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from encoder_pipeline.defs.shared import embeddings_cache
from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.drift import diff_units
from encoder_pipeline.lib.encoders import EncoderHandle
from encoder_pipeline.lib.index import (
    RESCORE_MULTIPLIER,
    UPDATABLE_PRECISIONS,
    LoadedIndex,
    build_quantized,
    load_index,
    update_index,
)
from encoder_pipeline.lib.layout import CORPUS_FILE, corpus_texts
from encoder_pipeline.lib.vector_cache import Progress, cached_embeddings

MAX_REFRESH_FRACTION = 0.3


@dataclass(frozen=True)
class BuiltIndex:
    index: LoadedIndex
    seconds: float  # building or updating the structure, embedding excluded
    mode: str  # "full" or "incremental"
    embedded: int  # units embedded for this version
    removed: int  # units dropped from the previous version (incremental)

    def metadata(self) -> dict:
        return {"build_mode": self.mode, "units_embedded": self.embedded, "units_removed": self.removed}


def _embed(encoder: EncoderHandle, units: pd.DataFrame, store: ArtifactStore, domain: str,
           progress: Progress | None) -> np.ndarray:
    return cached_embeddings(encoder, corpus_texts(units), embeddings_cache(store, domain), progress)


def _refresh(store: ArtifactStore, domain: str, swept: dict, units: pd.DataFrame,
             encoder: EncoderHandle, progress: Progress | None) -> BuiltIndex | None:
    """The previous index updated to `units`, or None when it cannot or should not be."""
    if swept["chosen"]["precision"] not in UPDATABLE_PRECISIONS:
        return None
    try:
        previous = store.latest(domain, "embedding_index")
        upstream = store.manifest(domain, "embedding_index")["upstream"]
        if upstream.get("index_sweep") != store.latest_version(domain, "index_sweep"):
            return None
        old_units = pd.read_parquet(store.asset_dir(domain, "clean_corpus") / upstream["clean_corpus"]
                                    / CORPUS_FILE, columns=["doc_id", "title", "text"])
    except (MissingArtifact, FileNotFoundError, KeyError):
        return None
    gone, fresh = diff_units(old_units, units)
    if len(gone) + len(fresh) > MAX_REFRESH_FRACTION * len(units):
        return None
    index = load_index(previous, swept["revision"])
    vectors = (_embed(encoder, fresh, store, domain, progress) if len(fresh)
               else np.zeros((0, 1), np.float32))
    rows = [row for row, unit in enumerate(index.ids) if unit in gone]
    started = time.perf_counter()
    update_index(index, rows, vectors, list(fresh["doc_id"]), list(fresh["parent_id"]), list(fresh["title"]))
    return BuiltIndex(index, time.perf_counter() - started, "incremental", len(fresh), len(rows))


def build_or_refresh(store: ArtifactStore, domain: str, swept: dict, units: pd.DataFrame,
                     encoder: EncoderHandle, progress: Progress | None = None) -> BuiltIndex:
    """index_sweep's chosen configuration over `units` (the whole corpus), embedded by `encoder` (the
    swept rung's model, run as the settings say): the previous version
    updated when only the corpus moved, else built from scratch. Either way every unit is embedded
    through the per-unit cache, so only units no earlier stage encoded with this rung cost time."""
    refreshed = _refresh(store, domain, swept, units, encoder, progress)
    if refreshed is not None:
        return refreshed
    vectors = _embed(encoder, units, store, domain, progress)
    chosen = swept["chosen"]
    started = time.perf_counter()
    index = build_quantized(vectors, chosen["dims"], chosen["precision"], list(units["doc_id"]),
                            list(units["parent_id"]), list(units["title"]),
                            rescore_multiplier=swept.get("rescore_multiplier", RESCORE_MULTIPLIER))
    return BuiltIndex(index, time.perf_counter() - started, "full", len(units), 0)
