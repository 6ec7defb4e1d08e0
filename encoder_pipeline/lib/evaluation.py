"""Systems on haystacks: what the report measures, described as data.

A *haystack* is the set of units the eval queries search: the training sample, where the ladder is
compared (the baselines, the spec's extra models, every rung), or the whole corpus, what users
search (the candidate index, the index served now, the baselines again, the hybrid). A haystack
ten times larger scores lower, so every figure carries the haystack it was measured on.

A *system* is a name, its haystack, and how it answers the eval queries (a run); systems are
evaluated in order, so one may combine the runs before it (the hybrid fuses BM25 and the
candidate). Adding a baseline to the report is adding one `System`.

    systems = [System("bm25", "corpus", lambda hay, runs: bm25_run(...)), ...]
    results = evaluate_systems(systems, {"corpus": corpus}, qrels)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.metrics import Qrels, Run, evaluate

SAMPLE, CORPUS = "sample", "corpus"


@dataclass(frozen=True)
class Haystack:
    """Units searched (columns doc_id, parent_id, title, text) and what they are, in words."""

    key: str
    what: str
    units: pd.DataFrame

    @property
    def texts(self) -> list[str]:
        return document_texts(self.units["title"], self.units["text"])

    @property
    def parents(self) -> list[str]:
        return list(self.units["parent_id"])

    def summary(self) -> dict:
        return {"what": self.what, "units": len(self.units),
                "documents": int(self.units["parent_id"].nunique())}


def haystacks(sample: pd.DataFrame, corpus: pd.DataFrame) -> dict[str, Haystack]:
    """The training sample and the whole corpus; one haystack when the sample is the whole corpus."""
    whole = Haystack(CORPUS, "the whole corpus", corpus)
    if len(sample) == len(corpus):
        return {SAMPLE: Haystack(SAMPLE, "the whole corpus (the training sample is all of it)", corpus),
                CORPUS: whole}
    return {SAMPLE: Haystack(SAMPLE, "the training sample", sample), CORPUS: whole}


@dataclass(frozen=True)
class System:
    """One row of the report: `answer(haystack, runs so far)` returns its run on the eval queries."""

    name: str
    haystack: str
    answer: Callable[[Haystack, dict[str, Run]], Run]
    kind: str = "baseline"  # baseline | extra | rung | candidate | served | hybrid


@dataclass
class Evaluated:
    name: str
    haystack: str
    kind: str
    means: dict[str, float]
    per_query: dict[str, dict[str, float]]
    run: Run


def evaluate_systems(systems: Sequence[System], stacks: dict[str, Haystack], qrels: Qrels
                     ) -> dict[str, Evaluated]:
    """Every system's run on its haystack, scored by pytrec_eval (means and per query), in order."""
    runs: dict[str, Run] = {}
    results: dict[str, Evaluated] = {}
    for system in systems:
        run = system.answer(stacks[system.haystack], runs)
        runs[system.name] = run
        means, per_query = evaluate(run, qrels)
        results[system.name] = Evaluated(system.name, system.haystack, system.kind, means, per_query, run)
    return results
