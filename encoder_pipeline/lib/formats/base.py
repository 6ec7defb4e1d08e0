"""What every corpus format shares: the columns a reader yields, the errors it raises, and the
registry a format joins by key (`@register`). The spec's `corpus.format`, `domain add --format` and
format detection are all built from the registry's keys: a new format is one module here.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import daft
from daft import col

CORPUS_COLUMNS = ("doc_id", "title", "text", "anchor")
MALFORMED_HINT = ('set corpus.on_malformed = "skip" in the domain spec (`domain add`: --on-malformed skip) '
                  "to leave such entries out (they are counted)")


class CorpusError(ValueError):
    """A corpus that cannot be read as specified; the message names the path and the field."""


@dataclass
class Skipped:
    """Entries left out under `corpus.on_malformed = "skip"`: how many, the first few named
    ("file:line: what is wrong")."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, entry: str) -> None:
        self.count += 1
        if len(self.examples) < 10:
            self.examples.append(entry)


@dataclass(frozen=True)
class Fields:
    """How a source's records map onto CORPUS_COLUMNS, and what to leave out (the spec's `[corpus]`)."""

    id_field: str = "_id"
    title_field: str = "title"
    text_field: str = "text"
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()


def is_remote(location: str) -> bool:
    return "://" in location


def has_wildcard(location: str) -> bool:
    return any(ch in location for ch in "*?[")


def require_exists(location: str, hint: str) -> None:
    if is_remote(location):
        return
    if has_wildcard(location) and glob.glob(location):
        return
    if not has_wildcard(location) and os.path.exists(location):
        return
    raise CorpusError(f"corpus not found at {location} ({hint})")


def mapped(frame: daft.DataFrame, fields: Fields, location: str) -> daft.DataFrame:
    """A source frame's columns as CORPUS_COLUMNS: ids from the id field (else from the text's hash,
    stable), a missing title as empty."""
    names = set(frame.column_names)
    if fields.text_field not in names:
        raise CorpusError(
            f"{location}: text field '{fields.text_field}' not found (fields present: {sorted(names)}); "
            "set corpus.text_field in the domain spec (`domain add`: --text-field)"
        )
    title = col(fields.title_field).cast(daft.DataType.string()) if fields.title_field in names else daft.lit("")
    text = col(fields.text_field).cast(daft.DataType.string())
    if fields.id_field in names:
        doc_id = col(fields.id_field).cast(daft.DataType.string())
    else:  # stable ids from content when the source has none
        doc_id = text.hash().cast(daft.DataType.string())
    return frame.select(
        doc_id.alias("doc_id"),
        title.fill_null("").alias("title"),
        text.fill_null("").alias("text"),
        daft.lit("").alias("anchor"),
    )


class CorpusFormat:
    """One way a corpus is stored. Subclasses set `key` and implement `read`; the rest has defaults
    for a format read from a file, a glob of files or a URI."""

    key: str = ""
    suffixes: tuple[str, ...] = ()  # file suffixes `domain add` recognizes as this format
    uses_location: bool = True  # False: the corpus is built in (no `corpus.path`)
    uses_fields: bool = True  # False: id/title/text come from the format, not from `*_field`
    selects_packages: bool = False  # True: `corpus.include` / `exclude` name packages to keep / leave out
    location_hint: str = "check corpus.path in the domain spec and $ENCODER_PIPELINE_CORPUS_ROOT"

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        """A lazy Daft frame with CORPUS_COLUMNS."""
        raise NotImplementedError

    def source_fields(self, location: str) -> list[str]:
        """The raw field names id/title/text can map to (empty where the format fixes them)."""
        return []

    def detects(self, location: str) -> bool:
        """Whether `location` looks like this format (`domain add` without --format)."""
        return Path(location.rstrip("/").split("?", 1)[0]).suffix.lower() in self.suffixes

    def source_paths(self, location: str) -> list[str]:
        """The local files a change to the corpus would touch (drift's cheap fingerprint)."""
        if os.path.isdir(location):
            return sorted(str(p) for p in Path(location).rglob("*") if p.is_file())
        return sorted(glob.glob(location)) if has_wildcard(location) else [location]

    def describe(self, location: str) -> str:
        """Where the corpus is, in words (`encoder-pipeline domains`, the model card)."""
        return location

    def present(self, location: str) -> bool:
        """Whether the corpus can be found from here (remote locations are assumed to be)."""
        return is_remote(location) or bool(glob.glob(location) if has_wildcard(location)
                                            else os.path.exists(location))


REGISTRY: dict[str, CorpusFormat] = {}


def register(cls: type[CorpusFormat]) -> type[CorpusFormat]:
    REGISTRY[cls.key] = cls()
    return cls


def get(key: str) -> CorpusFormat:
    if key not in REGISTRY:
        raise CorpusError(f"unknown corpus format {key!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def detect(location: str) -> str:
    """The format of a corpus location, for `domain add` without --format; the first registered
    format that recognizes it (folders before suffixes)."""
    for key, corpus_format in REGISTRY.items():
        if corpus_format.uses_location and corpus_format.detects(location):
            return key
    readable = ", ".join(key for key, f in REGISTRY.items() if f.uses_location)
    raise CorpusError(f"cannot tell the format of {location}: pass --format ({readable})")


def daft_table(reader, location: str, key: str) -> daft.DataFrame:
    """`reader(location)` (Daft's read_json / read_parquet / read_csv), its errors as CorpusError."""
    try:
        return reader(location)  # reads the schema now, so unreadable files fail here
    except FileNotFoundError as error:  # a remote URI: local paths are checked before
        raise CorpusError(f"corpus not found at {location} (check corpus.path in the domain spec "
                          "and the storage credentials in the environment)") from error
    except daft.exceptions.DaftCoreException as error:
        if "empty" in str(error).lower():
            raise CorpusError(f"the corpus at {location} is empty") from error
        raise CorpusError(f"cannot read {location} as {key}: {error}") from error


class DaftTableFormat(CorpusFormat):
    """A file format Daft reads as a table (local paths, globs and URIs alike, streamed)."""

    @staticmethod
    def reader(location: str) -> daft.DataFrame:
        raise NotImplementedError

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        require_exists(location, self.location_hint)
        return mapped(daft_table(self.reader, location, self.key), fields, location)

    def source_fields(self, location: str) -> list[str]:
        return list(daft_table(self.reader, location, self.key).column_names)
