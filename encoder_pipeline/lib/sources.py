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
from pathlib import Path

import daft
from daft import col

CORPUS_COLUMNS = ("doc_id", "title", "text", "anchor")
TEXT_FILE_PATTERN = r"\.(txt|text|md|markdown|rst|html?|xhtml)$"
STDLIB_ALWAYS_EXCLUDED = ("test", "tests", "idlelib", "site-packages", "__pycache__")


class CorpusError(ValueError):
    """A corpus that cannot be read as specified; the message names the path and the field."""


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


def summary_line(docstring: str) -> str:
    """The first paragraph of a docstring, on one line: what a user would type to find it."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())


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
    body = list(range(start, node.end_lineno))
    docstring = ast.get_docstring(node) or ""
    if docstring:
        first = node.body[0]
        doc_lines = set(range(first.lineno - 1, first.end_lineno))
        body = [i for i in body if i not in doc_lines]
    code = textwrap.dedent("\n".join(lines[i] for i in body))
    return {
        "doc_id": f"{module}:{qualname}",
        "title": f"{module}.{qualname}",
        "text": code,
        "anchor": summary_line(docstring),
    }


def read_python_stdlib(exclude: list[str]) -> list[dict]:
    """Functions and methods of the running interpreter's standard library, docstrings removed."""
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


def glob_root(pattern: str) -> str:
    """The folder above a glob's first wildcard, as Daft spells paths (local ones as file://)."""
    head = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rsplit("/", 1)[0]
    if _is_remote(head):
        return head
    return "file://" + os.path.abspath(head)


def read_document_files(location: str) -> daft.DataFrame:
    """A folder (or glob) of text, markdown or HTML files, one document per file, through Daft's
    glob and download (streamed; local paths and object-storage URIs alike)."""
    pattern = location if any(ch in location for ch in "*?[") else location.rstrip("/") + "/**/*"
    files = daft.from_glob_path(pattern)
    content = daft.functions.try_decode(daft.functions.download(col("path")), "utf-8")
    parsed = _parse_file(col("path"), content.fill_null(""))
    text_files = daft.functions.regexp(daft.functions.lower(col("path")), TEXT_FILE_PATTERN)
    root = glob_root(pattern)
    relative = daft.functions.regexp_replace(col("path"), "^" + re.escape(root) + "/*", "")
    return files.where(text_files).select(
        relative.alias("doc_id"),
        parsed.get("title").alias("title"),
        parsed.get("text").alias("text"),
        daft.lit("").alias("anchor"),
    )


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
                text_field: str = "text", exclude: list[str] | None = None) -> daft.DataFrame:
    """A lazy Daft frame with CORPUS_COLUMNS, from any supported source."""
    if fmt == "python_stdlib":
        return daft.from_pylist(read_python_stdlib(exclude or []))
    if fmt == "files":
        _require_exists(location, "a folder or glob of .txt/.md/.html files")
        return read_document_files(location)
    if fmt == "beir":
        location = location.rstrip("/") + "/corpus.jsonl"
        _require_exists(location, "a BEIR folder needs corpus.jsonl; set ENCODER_PIPELINE_CORPUS_ROOT "
                        "or corpus.path in the domain spec")
        fmt, id_field, title_field, text_field = "jsonl", "_id", "title", "text"
    else:
        _require_exists(location, "check corpus.path in the domain spec and $ENCODER_PIPELINE_CORPUS_ROOT")
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
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
    queries = {}
    with queries_path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
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
