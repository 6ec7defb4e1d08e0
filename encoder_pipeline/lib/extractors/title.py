"""`title`: a unit's title (heading, term name, page title) -> its body (E5's title -> passage pairs).

Honest about itself: a title is a query only when it has at least `min_words` words, differs from
the body, and is shared by at most `max_shared` units. Units sharing a title under that limit (the
paragraphs of one section) are one query's positives together; past it the title is a label (a
website's name over 55 of its policy paragraphs, a page name over every chunk of the page), which no
user types to find one paragraph.
"""

from __future__ import annotations

import pandas as pd

from encoder_pipeline.lib.extractors.base import (
    Extraction,
    ExtractorConfig,
    pairs_frame,
    register,
    word_count,
)
from encoder_pipeline.lib.leakage import normalize


class TitleExtractor:
    key = "title"
    structural = True
    description = "title or heading -> body"

    def _rejections(self, units: pd.DataFrame, config: ExtractorConfig) -> pd.Series:
        """Why each unit's title is not a query ("" when it is)."""
        titles = units["title"].fillna("").str.strip()
        keys = titles.map(normalize)
        shared = keys.map(keys.value_counts())
        why = pd.Series("", index=units.index)
        why[units["text"].fillna("").str.strip() == ""] = "with an empty body"
        why[keys == units["text"].fillna("").map(normalize)] = "whose title is its body"
        why[shared > config.max_shared] = f"whose title is shared by more than {config.max_shared} units"
        why[word_count(titles) < config.min_words] = f"whose title has fewer than {config.min_words} words"
        why[titles == ""] = "without a title"
        return why

    def unit_queries(self, units: pd.DataFrame, config: ExtractorConfig) -> pd.Series:
        titles = units["title"].fillna("").str.strip()
        return titles.where(self._rejections(units, config) == "", "")

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction:
        why = self._rejections(units, config)
        usable = units[why == ""]
        pairs = pairs_frame(usable["title"].str.strip(), usable["text"], usable["doc_id"], self.key)
        return Extraction(self.key, pairs, len(units), why[why != ""].value_counts().to_dict())


register(TitleExtractor())
