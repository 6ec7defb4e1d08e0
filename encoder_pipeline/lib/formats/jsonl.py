"""JSON Lines files (a file, a glob, or a URI). Local files are checked line by line first, so a
malformed line is named (file:line: what is wrong) rather than stopping Daft's reader halfway."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import daft
from daft import col

from encoder_pipeline.lib.formats.base import (
    MALFORMED_HINT,
    CorpusError,
    DaftTableFormat,
    Fields,
    Skipped,
    daft_table,
    has_wildcard,
    is_remote,
    mapped,
    register,
    require_exists,
)


def parse_line(raw: bytes) -> tuple[dict | None, str]:
    """A JSONL line as a JSON object, or (None, what is wrong with it)."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 (byte {error.start})"
    except json.JSONDecodeError as error:
        # Python's message for a raw control character ends in a dangling "at": name the character.
        what = error.msg.removesuffix(" at")
        if what == "Invalid control character":
            code = ord(error.doc[error.pos])
            what = f"raw control character U+{code:04X} inside a string (write it as \\u{code:04x})"
        return None, f"not valid JSON ({what}, character {error.pos + 1})"
    return (record, "") if isinstance(record, dict) else (None, "not a JSON object")


def _has_id(record: dict, id_field: str) -> bool:
    return record.get(id_field) not in (None, "")


@dataclass
class _Scan:
    malformed: Skipped = field(default_factory=Skipped)
    missing_id: Skipped = field(default_factory=Skipped)
    has_ids: bool = False  # some line carries the id field: then a line without one is malformed
    fields: dict[str, None] = field(default_factory=dict)  # in the order lines first show them

    @property
    def problems(self) -> Skipped:
        if not self.has_ids:
            return self.malformed
        return Skipped(self.malformed.count + self.missing_id.count,
                       (self.malformed.examples + self.missing_id.examples)[:10])


def _scan(paths: list[str], id_field: str) -> _Scan:
    """One pass over local JSONL files: malformed lines, by file and line number."""
    scan = _Scan()
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                record, problem = parse_line(raw)
                if record is None:
                    scan.malformed.add(f"{path}:{number}: {problem}")
                    continue
                scan.fields.update(dict.fromkeys(record))
                if _has_id(record, id_field):
                    scan.has_ids = True
                else:
                    scan.missing_id.add(f"{path}:{number}: no '{id_field}' (corpus.id_field)")
    return scan


def _as_text(value) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _well_formed_lines(paths: list[str], scan: _Scan, fields: Fields) -> daft.DataFrame:
    """The well-formed lines of local JSONL files, streamed file by file through a Daft generator
    UDF (Daft's own JSON reader stops at the first bad line), with the source's field names."""
    id_field = fields.id_field
    names = [name for name in dict.fromkeys((id_field, fields.title_field, fields.text_field))
             if name in scan.fields and (name != id_field or scan.has_ids)]
    has_ids = scan.has_ids

    @daft.func(return_dtype=daft.DataType.struct({name: daft.DataType.string() for name in names}))
    def records(path: str) -> Iterator[dict]:
        with open(path, "rb") as handle:
            for raw in handle:
                record = parse_line(raw)[0] if raw.strip() else None
                if record is not None and (not has_ids or _has_id(record, id_field)):
                    yield {name: _as_text(record.get(name)) for name in names}

    rows = daft.from_pydict({"path": paths}).select(records(col("path")).alias("record"))
    return rows.select(*[col("record").get(name).alias(name) for name in names])


def _checked(location: str, fields: Fields, on_malformed: str, skipped: Skipped | None
             ) -> daft.DataFrame | None:
    """Local JSONL checked line by line: None when every line is fine (Daft reads it), else the
    well-formed lines under on_malformed="skip"; CorpusError naming the lines otherwise."""
    paths = sorted(glob.glob(location)) if has_wildcard(location) else [location]
    scan = _scan(paths, fields.id_field)
    problems = scan.problems
    if not problems.count and (scan.has_ids or fields.id_field not in scan.fields):
        return None
    if problems.count and on_malformed != "skip":
        raise CorpusError(f"{problems.count} malformed line(s) in {location}, e.g. "
                          f"{'; '.join(problems.examples[:3])}; {MALFORMED_HINT}")
    if not scan.fields:
        raise CorpusError(f"no well-formed line in {location} ({problems.count} malformed, e.g. "
                          f"{'; '.join(problems.examples[:3])})")
    if skipped is not None:
        skipped.count += problems.count
        skipped.examples.extend(problems.examples[: 10 - len(skipped.examples)])
    return _well_formed_lines(paths, scan, fields)


@register
class JSONL(DaftTableFormat):
    key = "jsonl"
    suffixes = (".jsonl", ".json")
    reader = staticmethod(daft.read_json)

    def source_fields(self, location: str) -> list[str]:
        """Local files: from the well-formed lines (a malformed one is reported when the corpus is
        read, where it can be skipped)."""
        if is_remote(location):
            return super().source_fields(location)
        require_exists(location, self.location_hint)
        return list(_scan(sorted(glob.glob(location)) if has_wildcard(location) else [location], "").fields)

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        """Remote JSONL is not checked line by line: Daft's reader fails on a bad line."""
        require_exists(location, self.location_hint)
        checked = None if is_remote(location) else _checked(location, fields, on_malformed, skipped)
        frame = checked if checked is not None else daft_table(self.reader, location, self.key)
        return mapped(frame, fields, location)
