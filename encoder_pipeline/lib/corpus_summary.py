"""What a new corpus looks like before anything is built on it: its fields, size, languages and
lengths, and whether a judged set points at documents it actually has. `encoder-pipeline domain add`
prints this so that a wrong field mapping or path shows up in seconds, not after a training run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import daft
import numpy as np
import pandas as pd
import py3langid
from daft import col

from encoder_pipeline.lib import formats
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
from encoder_pipeline.lib.extractors import ExtractorConfig
from encoder_pipeline.lib.extractors.choose import SAMPLE_UNITS, Choice, choose_extractors
from encoder_pipeline.lib.sources import CorpusError, read_corpus, read_judged

ID_FIELDS = ("_id", "id", "doc_id")  # common id columns, in the order they are looked for
TEXT_FIELDS = ("text", "body", "content", "contents", "code", "passage", "document")  # the same, for the text
GIANT_SHARE = 0.1  # one document becoming this share of the units (of at least GIANT_MIN_UNITS) is flagged
GIANT_MIN_UNITS = 20
DUPLICATE_SHARE = 0.5  # most units dropped as duplicates is flagged
ENGLISH_SHARE = 0.5  # below this share of English documents, an English-only base model is flagged


def detect_format(location: str) -> str:
    """The registered format that recognizes `location` (a BEIR folder, any other folder, a file
    suffix); CorpusError asking for --format otherwise."""
    return formats.detect(location)


def source_fields(fmt: str, location: str) -> list[str]:
    """The raw field names of a tabular source (what id/title/text fields can map to)."""
    try:
        return formats.get(fmt).source_fields(location)
    except CorpusError:
        raise
    except Exception as error:  # Daft raises several exception types for unreadable input
        raise CorpusError(f"cannot read {location} as {fmt}: {error}") from error


def mappable_fields(fmt: str, location: str) -> list[str]:
    """The source's field names when its format maps fields to id/title/text (none for one that does not)."""
    return source_fields(fmt, location) if formats.get(fmt).uses_fields else []


def detect_id_field(fields: list[str]) -> str:
    """The first of ID_FIELDS among `fields` ("_id" when none is: then ids are content hashes)."""
    return next((name for name in ID_FIELDS if name in fields), ID_FIELDS[0])


def detect_text_field(fields: list[str], id_field: str, title_field: str) -> str:
    """The first of TEXT_FIELDS among `fields`; else the one field besides the id and the title (a
    dump of `{"id": ..., "abstract": ...}`); else "text", and reading the corpus names the fields."""
    named = next((name for name in TEXT_FIELDS if name in fields), None)
    if named is not None:
        return named
    others = [name for name in fields if name not in (id_field, title_field)]
    return others[0] if len(others) == 1 else TEXT_FIELDS[0]


def cleaning_warnings(units: pd.DataFrame, counts: dict[str, int], skipped: int) -> list[str]:
    """What cleaning will change that a user should hear about before building, with counts:
    `units` the cleaned units (`parent_id`), `counts` the cleaning report's, `skipped` malformed
    entries left out."""
    warnings = []
    per_document = units["parent_id"].value_counts()
    if len(units) >= GIANT_MIN_UNITS and per_document.iloc[0] >= GIANT_SHARE * len(units):
        giants = per_document[per_document >= GIANT_SHARE * len(units)]
        warnings.append("; ".join(f"document {doc!r} becomes {n:,} of the {len(units):,} units ({n / len(units):.0%})"
                                  for doc, n in giants.items())
                        + ": a giant document dominates training and the index; split it or leave it "
                          "out (corpus.exclude)")
    empty = counts.get("dropped_short_or_empty", 0)
    if empty:
        warnings.append(f"{empty:,} units are empty or shorter than unit.min_words and are dropped")
    duplicates = counts.get("exact_duplicates", 0) + counts.get("near_duplicates", 0)
    if duplicates >= DUPLICATE_SHARE * max(counts.get("units_after_chunking", 0), 1):
        warnings.append(f"{duplicates:,} of {counts['units_after_chunking']:,} units are duplicates "
                        f"({counts.get('exact_duplicates', 0):,} exact, {counts.get('near_duplicates', 0):,} "
                        "near): served, but left out of training")
    if skipped:
        warnings.append(f"{skipped:,} malformed entries are left out (on_malformed = \"skip\")")
    return warnings


def language_warning(languages: list[tuple[str, float]], base_model: str, english_only: bool) -> str | None:
    english = dict(languages).get("en", 0.0)
    if not english_only or english >= ENGLISH_SHARE or not languages:
        return None
    shown = ", ".join(f"{code} {share:.0%}" for code, share in languages)
    return (f"most of the corpus is not English ({shown}) and the base model {base_model} was trained "
            "on English: set settings.base_model to a multilingual sentence-transformers model")


@dataclass
class CorpusSummary:
    fields: list[str]
    documents: int
    empty_documents: int
    titled_share: float
    words: dict[str, float]  # percentiles of words per document (p5, p50, p95, max) over the sample
    languages: list[tuple[str, float]]  # (ISO code, share of the sample), most frequent first
    sample_size: int
    judged_queries: int = 0
    judged_documents: int = 0
    judged_documents_missing: int = 0
    warnings: list[str] = field(default_factory=list)
    choice: Choice | None = None  # the extractors a sample of the corpus supports

    def lines(self) -> list[str]:
        out = [
            f"fields: {', '.join(self.fields) if self.fields else '(one document per file)'}",
            (f"documents: {self.documents:,} ({self.empty_documents:,} empty); "
             f"{self.titled_share:.0%} have a title"),
            f"words per document (sample of {self.sample_size}): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in self.words.items()),
            "languages (sample): " + ", ".join(f"{code} {share:.0%}" for code, share in self.languages),
        ]
        if self.judged_queries:
            out.append(f"judged set: {self.judged_queries:,} queries over {self.judged_documents:,} "
                       f"documents, {self.judged_documents_missing:,} of them missing from the corpus")
        if self.choice is not None:
            out.append(f"training pairs from: {', '.join(self.choice.keys) or 'synthetic queries only'}"
                       + (" (a code corpus: layout kept, one function per unit)" if self.choice.code else ""))
            out += [f"  {note}" for note in self.choice.notes]
        return out + [f"warning: {w}" for w in self.warnings]


def summarize_corpus(fmt: str, location: str, id_field: str = "_id", title_field: str = "title",
                     text_field: str = "text", judged: str | None = None, sample: int = 500,
                     seed: int = 0, on_malformed: str = "fail", base_model: str = DEFAULT_BASE_MODEL
                     ) -> CorpusSummary:
    """Read the corpus as the pipeline will (same readers, same field mapping) and describe it.

    Counting streams through Daft; only `sample` documents are pulled into memory for lengths and
    language identification (py3langid).
    """
    frame = read_corpus(fmt, location, id_field, title_field, text_field, on_malformed=on_malformed)
    stats = frame.agg(
        col("doc_id").count().alias("documents"),
        (col("text").length() == 0).cast(daft.DataType.int64()).sum().alias("empty"),
        (col("title").length() > 0).cast(daft.DataType.int64()).sum().alias("titled"),
    ).to_pydict()
    documents = int(stats["documents"][0] or 0)
    if documents == 0:
        raise CorpusError(f"the corpus at {location} has no documents")
    head = frame.limit(max(sample * 4, SAMPLE_UNITS)).to_pandas()
    choice = choose_extractors(head.assign(parent_id=head["doc_id"]), documents, ExtractorConfig(seed=seed))
    rows = head.sample(min(sample, len(head)), random_state=seed)
    texts = (rows["title"].fillna("") + " " + rows["text"].fillna("")).str.strip()
    lengths = texts.str.split().str.len().fillna(0).to_numpy()
    words = {name: float(np.percentile(lengths, q)) for name, q in (("p5", 5), ("p50", 50), ("p95", 95))}
    words["max"] = float(lengths.max()) if len(lengths) else 0.0
    codes = Counter(py3langid.classify(text[:2000])[0] for text in texts if text)
    total = sum(codes.values()) or 1
    summary = CorpusSummary(
        fields=source_fields(fmt, location), documents=documents,
        empty_documents=int(stats["empty"][0] or 0), titled_share=int(stats["titled"][0] or 0) / documents,
        words=words, languages=[(code, n / total) for code, n in codes.most_common(3)],
        sample_size=len(rows), choice=choice,
    )
    if summary.empty_documents > documents / 2:
        summary.warnings.append(f"most documents have empty text: is '{text_field}' the right field?")
    # The packaged default was trained on English; another model's languages are its user's call.
    language = language_warning(summary.languages, base_model, english_only=base_model == DEFAULT_BASE_MODEL)
    if language:
        summary.warnings.append(language)
    if words["p50"] > 400:
        summary.warnings.append("documents are long (median > 400 words): set unit.max_words to chunk them")
    if judged:
        queries, qrels = read_judged(judged)
        wanted = sorted({doc for rels in qrels.values() for doc in rels})
        found = frame.where(col("doc_id").is_in(wanted)).select("doc_id").distinct().count_rows()
        summary.judged_queries, summary.judged_documents = len(queries), len(wanted)
        summary.judged_documents_missing = len(wanted) - found
        if found < len(wanted):
            summary.warnings.append(f"{len(wanted) - found} judged documents are not in the corpus "
                                    f"(id field '{id_field}'?)")
    return summary
