"""`heading`: a heading inside a unit's text -> the section under it (CCPairs' section pairs).

For markdown, HTML and plain-text documents whose units keep their line breaks: a heading is a
markdown `#` line, or a short capitalized line (at most 12 words, no code characters, not ending
like a sentence) followed by a paragraph. The section runs to the next heading and must have at least SECTION_MIN_WORDS words.
"""

from __future__ import annotations

import re

import pandas as pd

from encoder_pipeline.lib.extractors.base import (
    Extraction,
    ExtractorConfig,
    pairs_frame,
    register,
)

MAX_HEADING_WORDS = 12
SECTION_MIN_WORDS = 20
_MARKDOWN = re.compile(r"^\s{0,3}#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
_CODE_CHARACTERS = re.compile(r"[(){}\[\]=<>;|`$@\\]")  # a line with these is code or markup, not a heading


def _heading(line: str, following: str | None) -> str | None:
    match = _MARKDOWN.match(line)
    if match:
        return match.group("text").strip()
    words = line.split()
    if (following is not None and 0 < len(words) <= MAX_HEADING_WORDS and line.strip()[0].isupper()
            and not _CODE_CHARACTERS.search(line) and not line.rstrip().endswith((".", ",", ";", ":", "!"))
            and len(following.split()) > len(words) * 2 and len(following.split()) >= 8):
        return line.strip()
    return None


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, section text) for every heading in `text`, in order."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    found: list[tuple[str, list[str]]] = []
    for number, line in enumerate(lines):
        heading = _heading(line, lines[number + 1] if number + 1 < len(lines) else None)
        if heading:
            found.append((heading, []))
        elif found:
            found[-1][1].append(line.strip())
    return [(heading, "\n".join(body)) for heading, body in found]


class HeadingExtractor:
    key = "heading"
    structural = True
    description = "heading inside a document -> the section under it"

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction:
        queries, positives, doc_ids = [], [], []
        no_heading = too_short = 0
        for doc_id, text in zip(units["doc_id"], units["text"], strict=True):
            found = sections(text)
            usable = [(h, s) for h, s in found
                      if len(h.split()) >= config.min_words and len(s.split()) >= SECTION_MIN_WORDS]
            no_heading += not found
            too_short += bool(found) and not usable
            for heading, section in usable:
                queries.append(heading)
                positives.append(section)
                doc_ids.append(doc_id)
        return Extraction(self.key, pairs_frame(queries, positives, doc_ids, self.key), len(units), {
            "without a heading in their text": no_heading,
            f"whose headings have fewer than {config.min_words} words or sections fewer than "
            f"{SECTION_MIN_WORDS}": too_short})


register(HeadingExtractor())
