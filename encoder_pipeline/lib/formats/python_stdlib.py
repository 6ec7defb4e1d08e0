"""The running interpreter's standard library, one unit per function or method, parsed with `ast`:
the embedded default corpus, which needs no download. Docstrings are split off through the same
function the `docstring` extractor uses on any code (their summaries go to `anchor`)."""

from __future__ import annotations

import ast
import os
import sysconfig
import textwrap
from pathlib import Path

import daft

from encoder_pipeline.lib.extractors.docstring import split_docstring
from encoder_pipeline.lib.formats.base import CorpusFormat, Fields, Skipped, register

ALWAYS_EXCLUDED = ("test", "tests", "idlelib", "site-packages", "__pycache__")


def _function_unit(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], module: str,
                   qualname: str) -> dict:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    summary, code = split_docstring(textwrap.dedent("\n".join(lines[start:node.end_lineno])))
    return {"doc_id": f"{module}:{qualname}", "title": f"{module}.{qualname}", "text": code,
            "anchor": summary}


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


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def read_python_stdlib(exclude: list[str], include: list[str] | None = None) -> list[dict]:
    """Functions and methods of the running interpreter's standard library, docstrings removed;
    `include` (top-level packages or modules), when given, keeps only those."""
    root = Path(stdlib_root())
    excluded = set(ALWAYS_EXCLUDED) | set(exclude)
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


@register
class PythonStdlib(CorpusFormat):
    key = "python_stdlib"
    uses_location = False
    uses_fields = False
    selects_packages = True

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        return daft.from_pylist(read_python_stdlib(list(fields.exclude), list(fields.include)))

    def detects(self, location: str) -> bool:
        return False

    def source_paths(self, location: str) -> list[str]:
        return [stdlib_root()]

    def describe(self, location: str) -> str:
        return "the running interpreter's standard library"

    def present(self, location: str) -> bool:
        return True
