"""What every pair extractor is, and the registry the spec's `pair_extractor` is checked against.

An extractor turns retrievable units (columns `doc_id`, `parent_id`, `title`, `text`, `anchor`) into
training pairs (`query`, `positive`, `doc_id`, `extractor`) and says what it rejected and why.
Structural extractors (`title`, `docstring`, `heading`) read structure the corpus has; structure-free
ones (`inverse_cloze`, `cropping`) work on any text. A structural extractor whose queries are one per
unit (`title`, `docstring`) can also give held-out eval queries (`unit_queries`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd

PAIR_COLUMNS = ["query", "positive", "doc_id", "extractor"]
MIN_QUERY_WORDS = 3  # the default of the spec's [queries] min_words, for structural and synthetic queries
# Structural pairs past which structure-free ones are not needed: domain add leaves them out, and a
# rung caps them (lib.pairs.cap_pairs).
STRUCTURAL_ENOUGH = 500


@dataclass(frozen=True)
class ExtractorConfig:
    min_words: int = MIN_QUERY_WORDS  # a query with fewer words is a fragment
    max_shared: int = 20  # a title shared by more units is a label (a site name, a page name)
    seed: int = 0


@dataclass
class Extraction:
    """Pairs, how many units were looked at, and why the others gave none ({reason: count})."""

    extractor: str
    pairs: pd.DataFrame
    units: int
    rejected: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        why = "; ".join(f"{n:,} {reason}" for reason, n in self.rejected.items() if n)
        return (f"{self.extractor}: {len(self.pairs):,} pairs from {self.units:,} units"
                + (f" ({why})" if why else ""))


def pairs_frame(queries, positives, doc_ids, extractor: str) -> pd.DataFrame:
    frame = pd.DataFrame({"query": list(queries), "positive": list(positives), "doc_id": list(doc_ids)})
    return frame.assign(extractor=extractor)[PAIR_COLUMNS]


def salted(key: str, seed: int) -> int:
    """A stable pseudo-random integer per (key, seed): choices that survive re-runs and reordering."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")


def word_count(texts: pd.Series) -> pd.Series:
    return texts.fillna("").str.split().str.len().fillna(0).astype(int)


class Extractor(Protocol):
    key: str
    structural: bool
    description: str

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction: ...


class UnitQueries(Protocol):
    """Extractors whose structure gives each unit at most one query (usable as an eval query)."""

    def unit_queries(self, units: pd.DataFrame, config: ExtractorConfig) -> pd.Series: ...


REGISTRY: dict[str, Extractor] = {}


def register(extractor: Extractor) -> Extractor:
    REGISTRY[extractor.key] = extractor
    return extractor


def get(key: str) -> Extractor:
    if key not in REGISTRY:
        raise KeyError(f"unknown pair extractor {key!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]


Chooser = Callable[[pd.DataFrame, ExtractorConfig], Extraction]
