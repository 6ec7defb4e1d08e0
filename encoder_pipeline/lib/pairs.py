"""Training pairs from the domain's extractors, and the consistency filter.

Columns out of `extract_training_pairs`: `query`, `positive` (the text the encoder sees), `doc_id`,
`extractor`. Sources: E5 / CCPairs (structural pairs + a consistency filter), inverse cloze (Lee et
al. 2019) and independent cropping (Contriever) where the corpus has no structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sentence_transformers import util

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.extractors import Extraction, ExtractorConfig, get
from encoder_pipeline.lib.extractors.base import PAIR_COLUMNS, STRUCTURAL_ENOUGH
from encoder_pipeline.lib.heldout import EvalSplit
from encoder_pipeline.lib.leakage import EvalTexts

# Once the structural extractors give STRUCTURAL_ENOUGH pairs, structure-free rows are at most
# FREE_SHARE of a rung's structural + structure-free rows: they teach less than real structure.
FREE_SHARE = 0.25


def document_form(units: pd.DataFrame, extractors: Sequence[str]) -> list[str]:
    """The text a unit trains as a structural row's positive (and as the corpus those rows' negatives
    are mined from): its body alone where titles are queries (a title in the positive would answer
    its own query), else title and text as the encoder sees the unit. Synthetic queries train
    against the unit as served (`document_texts`): they were written from title and text, and a
    title is often the very name a query asks for."""
    if "title" in extractors:
        return list(units["text"])
    return document_texts(units["title"], units["text"])


def eval_texts(split: EvalSplit, units: pd.DataFrame) -> EvalTexts:
    """What the leakage filter keeps out of training: the eval and dev queries, every form of every
    held-out unit (title + text as the encoder sees it, the text alone as a title -> body positive),
    and the ids of the held-out documents and of their units."""
    held = units[units["parent_id"].isin(split.held_out_doc_ids)]
    documents = [*document_texts(held["title"], held["text"]), *held["text"]]
    return EvalTexts.of([*split.eval.queries.values(), *split.dev.queries.values()], documents,
                        {*split.held_out_doc_ids, *held["doc_id"]})


@dataclass
class TrainingPairs:
    pairs: pd.DataFrame
    extractions: list[Extraction]

    def summaries(self) -> list[str]:
        return [e.summary() for e in self.extractions]


def extract_training_pairs(units: pd.DataFrame, extractors: Sequence[str], config: ExtractorConfig
                           ) -> TrainingPairs:
    """Every pair the domain's extractors give on `units` (which must exclude held-out documents)."""
    extractions = [get(key).extract(units, config) for key in extractors]
    frames = [e.pairs for e in extractions if len(e.pairs)]
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PAIR_COLUMNS)
    return TrainingPairs(pairs[pairs["positive"].str.strip() != ""].reset_index(drop=True), extractions)


def cap_pairs(pairs: pd.DataFrame, max_pairs: int, seed: int) -> pd.DataFrame:
    """At most `max_pairs` rows; structure-free rows at most FREE_SHARE of them once the structural
    extractors give STRUCTURAL_ENOUGH pairs (else they fill what structure leaves)."""
    free = pairs["extractor"].map(lambda key: not get(key).structural)
    structural, unstructured = pairs[~free], pairs[free]
    if len(structural) >= STRUCTURAL_ENOUGH:
        allowed = int(len(structural) * FREE_SHARE / (1 - FREE_SHARE))
        unstructured = unstructured.sample(min(allowed, len(unstructured)), random_state=seed)
    capped = pd.concat([structural, unstructured])
    if len(capped) > max_pairs:
        capped = capped.sample(max_pairs, random_state=seed)
    return capped.reset_index(drop=True)


def top_k_ids(query_embeddings: np.ndarray, corpus_embeddings: np.ndarray, corpus_ids: list[str],
              top_k: int) -> list[list[tuple[str, float]]]:
    """Exact cosine top-k (embeddings are normalized), chunked by sentence-transformers."""
    hits = util.semantic_search(torch.from_numpy(query_embeddings), torch.from_numpy(corpus_embeddings),
                                top_k=min(top_k, len(corpus_ids)), score_function=util.dot_score)
    return [[(corpus_ids[h["corpus_id"]], float(h["score"])) for h in row] for row in hits]


def rank_of_positive(query_embeddings: np.ndarray, positive_ids: list[str],
                     corpus_embeddings: np.ndarray, corpus_ids: list[str], top_k: int) -> np.ndarray:
    """1-based rank of each query's positive within the top-k, 0 where it is not in the top-k."""
    ranks = np.zeros(len(positive_ids), dtype=int)
    for i, (hits, positive) in enumerate(
        zip(top_k_ids(query_embeddings, corpus_embeddings, corpus_ids, top_k), positive_ids, strict=True)
    ):
        ids = [doc_id for doc_id, _ in hits]
        ranks[i] = ids.index(positive) + 1 if positive in ids else 0
    return ranks
