"""Structure-free pairs, for any text: they need no title, heading or docstring.

- `inverse_cloze` (Lee, Chang & Toutanova 2019, "Latent Retrieval for Weakly Supervised Open Domain
  Question Answering"): a sentence cut from the unit is the query, the unit without it the positive.
- `cropping` (Izacard et al. 2021, Contriever): two independent random spans of one unit; the
  shorter (CROP_QUERY_WORDS) is the query, the longer (half the unit or more) the positive.

Every choice is a salted hash of the unit id and the seed, so a re-run picks the same pairs.
"""

from __future__ import annotations

import re

import pandas as pd

from encoder_pipeline.lib.extractors.base import (
    Extraction,
    ExtractorConfig,
    pairs_frame,
    register,
    salted,
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
MIN_SENTENCES = 3
MAX_QUERY_WORDS = 40
CROP_QUERY_WORDS = (8, 24)
CROP_MIN_UNIT_WORDS = 40


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join((text or "").split())) if s.strip()]


class InverseClozeExtractor:
    key = "inverse_cloze"
    structural = False
    description = "a sentence cut from the unit -> the unit without it"

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction:
        queries, positives, doc_ids = [], [], []
        few, none = 0, 0
        for doc_id, text in zip(units["doc_id"], units["text"], strict=True):
            sentences = split_sentences(text)
            if len(sentences) < MIN_SENTENCES:
                few += 1
                continue
            candidates = [i for i, s in enumerate(sentences)
                          if config.min_words <= len(s.split()) <= MAX_QUERY_WORDS]
            if not candidates:
                none += 1
                continue
            cut = candidates[salted(doc_id, config.seed) % len(candidates)]
            queries.append(sentences[cut])
            positives.append(" ".join(sentences[:cut] + sentences[cut + 1:]))
            doc_ids.append(doc_id)
        return Extraction(self.key, pairs_frame(queries, positives, doc_ids, self.key), len(units),
                          {f"with fewer than {MIN_SENTENCES} sentences": few,
                           "without a sentence of query length": none})


class CroppingExtractor:
    key = "cropping"
    structural = False
    description = "two independent random spans of one unit"

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction:
        queries, positives, doc_ids = [], [], []
        short = 0
        low, high = CROP_QUERY_WORDS
        for doc_id, text in zip(units["doc_id"], units["text"], strict=True):
            words = (text or "").split()
            if len(words) < CROP_MIN_UNIT_WORDS:
                short += 1
                continue
            draw = salted(doc_id, config.seed)
            length = low + draw % (high - low + 1)
            start = (draw >> 8) % (len(words) - length + 1)
            span = len(words) // 2 + (draw >> 16) % (len(words) - len(words) // 2 + 1)
            other = (draw >> 24) % (len(words) - span + 1)
            queries.append(" ".join(words[start:start + length]))
            positives.append(" ".join(words[other:other + span]))
            doc_ids.append(doc_id)
        return Extraction(self.key, pairs_frame(queries, positives, doc_ids, self.key), len(units),
                          {f"with fewer than {CROP_MIN_UNIT_WORDS} words": short})


register(InverseClozeExtractor())
register(CroppingExtractor())
