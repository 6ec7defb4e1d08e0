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
import json
import os
import sysconfig
import textwrap
from pathlib import Path

import daft
from daft import col

CORPUS_COLUMNS = ("doc_id", "title", "text", "anchor")
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
