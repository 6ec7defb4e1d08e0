"""Corpus and judged-set readers. Every reader yields the same columns:
`doc_id`, `title`, `text`, `anchor` (the structural query a unit carries, e.g. a docstring summary).

Files go through Daft's readers (local paths and object-storage URIs alike, streamed); the Python
standard library is parsed with `ast`, as the embedded default corpus that needs no download.
"""

from __future__ import annotations

import ast
import csv
import glob
import hashlib
import html.parser
import json
import os
import re
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import daft
from daft import col

from encoder_pipeline.lib.extractors.docstring import split_docstring

CORPUS_COLUMNS = ("doc_id", "title", "text", "anchor")
TEXT_FILE_PATTERN = r"\.(txt|text|md|markdown|rst|html?|xhtml)$"
STDLIB_ALWAYS_EXCLUDED = ("test", "tests", "idlelib", "site-packages", "__pycache__")


class CorpusError(ValueError):
    """A corpus that cannot be read as specified; the message names the path and the field."""


MALFORMED_HINT = ('set corpus.on_malformed = "skip" in the domain spec to leave such entries out '
                  "(they are counted)")


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


def _is_remote(location: str) -> bool:
    return "://" in location


def _require_exists(location: str, hint: str) -> None:
    if _is_remote(location):
        return
    if any(ch in location for ch in "*?[") and glob.glob(location):
        return
    if not any(ch in location for ch in "*?[") and os.path.exists(location):
        return
    raise CorpusError(f"corpus not found at {location} ({hint})")


def _function_units(path: Path, module: str) -> list[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    units: list[dict] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                units.append(_function_unit(child, lines, module, f"{prefix}{child.name}"))

    visit(tree, "")
    return units


def _function_unit(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], module: str,
                   qualname: str) -> dict:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    summary, code = split_docstring(textwrap.dedent("\n".join(lines[start:node.end_lineno])))
    return {"doc_id": f"{module}:{qualname}", "title": f"{module}.{qualname}", "text": code,
            "anchor": summary}


def read_python_stdlib(exclude: list[str], include: list[str] | None = None) -> list[dict]:
    """Functions and methods of the running interpreter's standard library, docstrings removed;
    `include` (top-level packages or modules), when given, keeps only those."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = set(STDLIB_ALWAYS_EXCLUDED) | set(exclude)
    units: list[dict] = []
    for directory, subdirs, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        if excluded & set(relative.parts):
            subdirs[:] = []
            continue
        subdirs.sort()
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = [*relative.parts, name[:-3]]
            if include and parts[0] not in include:
                continue
            module = ".".join(p for p in parts if p != "__init__")
            units.extend(_function_units(Path(directory) / name, module))
    # Redefinitions (property setters, platform branches) share a qualname: number the repeats.
    seen: dict[str, int] = {}
    for unit in units:
        count = seen[unit["doc_id"]] = seen.get(unit["doc_id"], 0) + 1
        if count > 1:
            unit["doc_id"] = f"{unit['doc_id']}~{count}"
    return units


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, one line per block; headings kept as their own lines."""

    SKIPPED = frozenset({"script", "style", "noscript", "template"})
    BLOCKS = frozenset({"p", "div", "li", "br", "tr", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = [""]
        self.title = ""
        self._skipping = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self.SKIPPED:
            self._skipping += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            self.lines.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCKS:
            self.lines.append("")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skipping:
            self.lines[-1] += data


def parse_document_file(path: str, content: str) -> dict[str, str]:
    """One file -> {title, text}: markdown and HTML lose their markup but keep their headings as
    lines (the heading -> section pairs need them); the title is the first heading (HTML <title>),
    else the file name."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    title = ""
    if suffix in ("html", "htm", "xhtml"):
        parser = _HTMLText()
        parser.feed(content)
        lines = [" ".join(line.split()) for line in parser.lines]
        title = " ".join(parser.title.split())
    else:
        lines = [line.rstrip() for line in content.splitlines()]
        if suffix in ("md", "markdown"):
            lines = [line.lstrip("#").strip() if line.startswith("#") else line for line in lines]
            headings = [line.lstrip("#").strip() for line in content.splitlines() if line.startswith("#")]
            title = headings[0] if headings else ""
    lines = [line for line in lines if line.strip()]
    if not title and suffix in ("html", "htm", "xhtml", "md", "markdown") and lines:
        title = lines[0] if len(lines[0].split()) <= 12 else ""
    if lines and lines[0] == title:
        lines = lines[1:]
    return {"title": title or name.rsplit(".", 1)[0], "text": "\n".join(lines)}


@daft.func(return_dtype=daft.DataType.struct({"title": daft.DataType.string(),
                                              "text": daft.DataType.string()}))
def _parse_file(path: str, content: str) -> dict[str, str]:
    return parse_document_file(path, content)


def _files_pattern(location: str) -> str:
    return location if any(ch in location for ch in "*?[") else location.rstrip("/") + "/**/*"


def _document_files(location: str) -> daft.DataFrame:
    """The text files of a folder (or glob), with Daft's `path` column."""
    files = daft.from_glob_path(_files_pattern(location))
    return files.where(daft.functions.regexp(daft.functions.lower(col("path")), TEXT_FILE_PATTERN))


def _undecodable_files(location: str) -> list[str]:
    """Paths of the text files that are not valid UTF-8 (Daft reads them, local or remote)."""
    content = daft.functions.try_decode(daft.functions.download(col("path")), "utf-8")
    # A column first: Daft 0.7 panics on a download inside a filter predicate.
    decoded = _document_files(location).select("path", content.is_null().alias("undecodable"))
    bad = decoded.where(col("undecodable")).select("path").to_pydict()["path"]
    return sorted(path.removeprefix("file://") for path in bad)


def glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard, as Daft spells paths (local ones as file://)."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rsplit("/", 1)[0]
    if _is_remote(head):
        return head
    return "file://" + os.path.abspath(head)


def read_document_files(location: str, on_malformed: str = "fail",
                        skipped: Skipped | None = None) -> daft.DataFrame:
    """A folder (or glob) of text, markdown or HTML files, one document per file, through Daft's
    glob and download (streamed; local paths and object-storage URIs alike). A file that is not
    UTF-8 fails the read, or with `on_malformed="skip"` is left out and listed in `skipped`."""
    undecodable = _undecodable_files(location)
    if undecodable and on_malformed != "skip":
        raise CorpusError(f"{len(undecodable)} files under {location} are not valid UTF-8, e.g. "
                          f"{undecodable[:3]}; {MALFORMED_HINT}")
    for path in undecodable if skipped is not None else ():
        skipped.add(f"{path}: not valid UTF-8")
    files = _document_files(location)
    if undecodable:
        files = files.where(~daft.functions.regexp_replace(col("path"), "^file://", "").is_in(undecodable))
    content = daft.functions.try_decode(daft.functions.download(col("path")), "utf-8")
    parsed = _parse_file(col("path"), content.fill_null(""))
    root = glob_root(_files_pattern(location))
    relative = daft.functions.regexp_replace(col("path"), "^" + re.escape(root) + "/*", "")
    return files.select(
        relative.alias("doc_id"),
        parsed.get("title").alias("title"),
        parsed.get("text").alias("text"),
        daft.lit("").alias("anchor"),
    )


def _parse_line(raw: bytes) -> tuple[dict | None, str]:
    """A JSONL line as a JSON object, or (None, what is wrong with it)."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 (byte {error.start})"
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg}, column {error.colno})"
    return (record, "") if isinstance(record, dict) else (None, "not a JSON object")


def _has_id(record: dict, id_field: str) -> bool:
    return record.get(id_field) not in (None, "")


@dataclass
class _JsonlScan:
    malformed: Skipped = field(default_factory=Skipped)
    missing_id: Skipped = field(default_factory=Skipped)
    has_ids: bool = False  # some line carries the id field: then a line without one is malformed
    fields: set[str] = field(default_factory=set)

    @property
    def problems(self) -> Skipped:
        if not self.has_ids:
            return self.malformed
        return Skipped(self.malformed.count + self.missing_id.count,
                       (self.malformed.examples + self.missing_id.examples)[:10])


def _scan_jsonl(paths: list[str], id_field: str) -> _JsonlScan:
    """One pass over local JSONL files: malformed lines, by file and line number."""
    scan = _JsonlScan()
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                record, problem = _parse_line(raw)
                if record is None:
                    scan.malformed.add(f"{path}:{number}: {problem}")
                    continue
                scan.fields.update(record)
                if _has_id(record, id_field):
                    scan.has_ids = True
                else:
                    scan.missing_id.add(f"{path}:{number}: no '{id_field}' (corpus.id_field)")
    return scan


def _as_text(value) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _well_formed_lines(paths: list[str], scan: _JsonlScan, id_field: str, title_field: str,
                       text_field: str) -> daft.DataFrame:
    """The well-formed lines of local JSONL files, streamed file by file through a Daft generator
    UDF (Daft's own JSON reader stops at the first bad line), with the source's field names."""
    names = [name for name in dict.fromkeys((id_field, title_field, text_field)) if name in scan.fields
             and (name != id_field or scan.has_ids)]
    has_ids = scan.has_ids

    @daft.func(return_dtype=daft.DataType.struct({name: daft.DataType.string() for name in names}))
    def records(path: str) -> Iterator[dict]:
        with open(path, "rb") as handle:
            for raw in handle:
                record = _parse_line(raw)[0] if raw.strip() else None
                if record is not None and (not has_ids or _has_id(record, id_field)):
                    yield {name: _as_text(record.get(name)) for name in names}

    rows = daft.from_pydict({"path": paths}).select(records(col("path")).alias("record"))
    return rows.select(*[col("record").get(name).alias(name) for name in names])


def _read_jsonl(location: str, id_field: str, title_field: str, text_field: str, on_malformed: str,
                skipped: Skipped | None) -> daft.DataFrame | None:
    """Local JSONL checked line by line first: None when every line is fine (Daft reads it),
    else the well-formed lines under on_malformed="skip"; CorpusError naming the lines otherwise."""
    paths = sorted(glob.glob(location)) if any(ch in location for ch in "*?[") else [location]
    scan = _scan_jsonl(paths, id_field)
    problems = scan.problems
    if not problems.count and (scan.has_ids or id_field not in scan.fields):
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
    return _well_formed_lines(paths, scan, id_field, title_field, text_field)


def _mapped(df: daft.DataFrame, id_field: str, title_field: str, text_field: str,
            location: str) -> daft.DataFrame:
    names = set(df.column_names)
    if text_field not in names:
        raise CorpusError(
            f"{location}: text field '{text_field}' not found (fields present: {sorted(names)}); "
            "set corpus.text_field in the domain spec"
        )
    title = col(title_field).cast(daft.DataType.string()) if title_field in names else daft.lit("")
    text = col(text_field).cast(daft.DataType.string())
    if id_field in names:
        doc_id = col(id_field).cast(daft.DataType.string())
    else:  # stable ids from content when the source has none
        doc_id = text.hash().cast(daft.DataType.string())
    return df.select(
        doc_id.alias("doc_id"),
        title.fill_null("").alias("title"),
        text.fill_null("").alias("text"),
        daft.lit("").alias("anchor"),
    )


def read_corpus(fmt: str, location: str, id_field: str = "_id", title_field: str = "title",
                text_field: str = "text", exclude: list[str] | None = None,
                on_malformed: str = "fail", skipped: Skipped | None = None, *,
                include: list[str] | None = None) -> daft.DataFrame:
    """A lazy Daft frame with CORPUS_COLUMNS, from any supported source.

    Malformed entries (a local JSONL line that is not a UTF-8 JSON object or lacks the id the other
    lines carry; a `files` document that is not UTF-8) raise CorpusError naming file and line, or
    with `on_malformed="skip"` are left out and counted in `skipped`. Remote JSONL is not checked
    line by line: Daft's reader fails on a bad line.
    """
    if fmt == "python_stdlib":
        return daft.from_pylist(read_python_stdlib(exclude or [], include))
    if fmt == "files":
        _require_exists(location, "a folder or glob of .txt/.md/.html files")
        return read_document_files(location, on_malformed, skipped)
    if fmt == "beir":
        location = location.rstrip("/") + "/corpus.jsonl"
        _require_exists(location, "a BEIR folder needs corpus.jsonl; set ENCODER_PIPELINE_CORPUS_ROOT "
                        "or corpus.path in the domain spec")
        fmt, id_field, title_field, text_field = "jsonl", "_id", "title", "text"
    else:
        _require_exists(location, "check corpus.path in the domain spec and $ENCODER_PIPELINE_CORPUS_ROOT")
    if fmt == "jsonl" and not _is_remote(location):
        checked = _read_jsonl(location, id_field, title_field, text_field, on_malformed, skipped)
        if checked is not None:
            return _mapped(checked, id_field, title_field, text_field, location)
    reader = {"jsonl": daft.read_json, "parquet": daft.read_parquet, "csv": daft.read_csv}[fmt]
    try:
        frame = reader(location)  # reads the schema now, so unreadable files fail here
    except FileNotFoundError as error:  # a remote URI: local paths were checked above
        raise CorpusError(f"corpus not found at {location} (check corpus.path in the domain spec "
                          "and the storage credentials in the environment)") from error
    except daft.exceptions.DaftCoreException as error:
        if "empty" in str(error).lower():
            raise CorpusError(f"the corpus at {location} is empty") from error
        raise CorpusError(f"cannot read {location} as {fmt}: {error}") from error
    return _mapped(frame, id_field, title_field, text_field, location)


def read_judged(location: str, split: str = "dev") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """BEIR queries and qrels: ({query_id: text}, {query_id: {doc_id: grade}}), judged queries only."""
    queries_path = Path(location) / "queries.jsonl"
    qrels_path = Path(location) / "qrels" / f"{split}.tsv"
    for path in (queries_path, qrels_path):
        if not path.exists():
            raise CorpusError(f"judged set incomplete: {path} not found")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        for row in reader:
            try:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
            except (KeyError, TypeError, ValueError) as error:
                raise CorpusError(f"{qrels_path}:{reader.line_num}: expected query-id, corpus-id and an "
                                  f"integer score separated by tabs ({error!r})") from error
    queries = {}
    with queries_path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                record, problem = _parse_line(line)
                if record is None or "_id" not in record or not isinstance(record.get("text"), str):
                    raise CorpusError(f"{queries_path}:{number}: "
                                      f"{problem or 'a query needs _id and text'}")
                if str(record["_id"]) in qrels:
                    queries[str(record["_id"])] = record["text"]
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise CorpusError(f"{qrels_path}: {len(missing)} judged queries missing from {queries_path}, "
                          f"e.g. {missing[:3]}")
    return queries, qrels


def fingerprint_files(fmt: str, location: str) -> str:
    """A cheap fingerprint of a corpus's source files (path, size, mtime) for change detection."""
    if fmt == "python_stdlib":
        location = sysconfig.get_paths()["stdlib"]
        paths = [location]
    elif _is_remote(location):
        return hashlib.sha256(location.encode()).hexdigest()[:16]
    elif os.path.isdir(location):
        paths = sorted(str(p) for p in Path(location).rglob("*") if p.is_file())
    else:
        paths = sorted(glob.glob(location))
    digest = hashlib.sha256()
    for path in paths:
        if os.path.exists(path):
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
