"""Synthetic queries: few-shot prompts from the domain spec, output cleaning, round-trip filter.

Columns out of `build_prompts`: `doc_id`, `prompt`, `style`; of `parse_query`: one clean query or
None. Sources: doc2query (Nogueira et al. 2019), InPars / Promptagator (few-shot prompting of a
generator), Gecko (Lee et al. 2024: a task/length taxonomy per document; round-trip filtering).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

# Gecko-style variety: each document draws one style, so queries are not all restatements of the
# first sentence.
QUERY_STYLES = (
    "a short keyword search query (3 to 6 words)",
    "a natural question a user would type",
    "a one-sentence request describing what the user wants to do",
)
PASSAGE_WORDS = 120
MIN_QUERY_WORDS = 3
MAX_QUERY_WORDS = 32
COPIED_SPAN_WORDS = 8  # a query repeating this many consecutive passage words is a copy, not a query


@dataclass(frozen=True)
class PromptSpec:
    form: str
    relevance: str
    examples: tuple[tuple[str, str], ...]  # (passage, query)


def _shorten(text: str, words: int = PASSAGE_WORDS) -> str:
    tokens = text.split()
    return " ".join(tokens[:words]) + (" ..." if len(tokens) > words else "")


def _style_for(doc_id: str, variant: int, seed: int) -> str:
    digest = hashlib.sha1(f"{seed}:{variant}:{doc_id}".encode()).digest()
    return QUERY_STYLES[digest[0] % len(QUERY_STYLES)]


def build_prompt(spec: PromptSpec, passage: str, style: str) -> str:
    """A few-shot completion prompt (the local model is a base model: it continues text)."""
    header = (f"Each passage below is followed by a search query it answers. A query is {spec.form}. "
              f"The passage is relevant when {spec.relevance}. Write {style}.\n\n")
    shots = "".join(f"Passage: {_shorten(p)}\nQuery: {q}\n\n" for p, q in spec.examples)
    return f"{header}{shots}Passage: {_shorten(passage)}\nQuery:"


def build_prompts(spec: PromptSpec, doc_ids: Sequence[str], passages: Sequence[str],
                  per_document: int, seed: int) -> list[dict]:
    rows = []
    for doc_id, passage in zip(doc_ids, passages, strict=True):
        for variant in range(per_document):
            style = _style_for(doc_id, variant, seed)
            rows.append({"doc_id": doc_id, "variant": variant, "style": style,
                         "prompt": build_prompt(spec, passage, style)})
    return rows


_NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|q(?:uery)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_passage(query: str, passage: str, span: int = COPIED_SPAN_WORDS) -> bool:
    """True when the query repeats `span` consecutive words of the passage verbatim."""
    q, p = _words(query), _words(passage)
    if len(q) < span:
        return False
    passage_grams = {tuple(p[i : i + span]) for i in range(len(p) - span + 1)}
    return any(tuple(q[i : i + span]) in passage_grams for i in range(len(q) - span + 1))


def parse_query(raw: str, passage: str, example_queries: Sequence[str]) -> str | None:
    """The first usable line of a completion: numbering and quotes stripped, copies rejected."""
    for line in raw.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        if line.lower().startswith(("passage:", "query:")):
            line = line.split(":", 1)[1].strip()
            if not line:
                continue
        line = _NUMBERING.sub("", line).strip().strip("\"'`").strip()
        words = line.split()
        if not (MIN_QUERY_WORDS <= len(words) <= MAX_QUERY_WORDS):
            return None
        if any(line.lower() == example.lower() for example in example_queries):
            return None
        if copies_passage(line, passage):
            return None
        return line
    return None


def dedupe_queries(queries: Sequence[str | None]) -> list[bool]:
    """Keep the first occurrence of each query (case- and space-insensitive)."""
    seen, keep = set(), []
    for query in queries:
        key = " ".join(query.lower().split()) if query else None
        keep.append(bool(key) and key not in seen)
        if key:
            seen.add(key)
    return keep
