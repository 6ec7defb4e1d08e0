"""`docstring`: the summary of a unit's docstring or leading comment -> the code without it (the
CodeSearchNet pairing). Works on code in any format: the docstring is parsed from the unit's own
text, with Python's `ast` where it parses, else a comment pattern (`/** */`, `/* */`, `//`, `#`,
`--` blocks, or a string literal opening the body). The built-in `python_stdlib` reader strips
docstrings through the same `split_docstring` and keeps the summary in `anchor`, which is read first.
"""

from __future__ import annotations

import ast
import re
import textwrap

import pandas as pd

from encoder_pipeline.lib.extractors.base import (
    Extraction,
    ExtractorConfig,
    pairs_frame,
    register,
)

# A comment block at the start of the unit, or right after its first (signature) line.
_BLOCK = re.compile(r"^\s*/\*\*?(?P<body>.*?)\*/\s*\n?", re.DOTALL)
_LINE_COMMENTS = re.compile(r"^(?P<body>(?:[ \t]*(?://|#(?!!)|--)[^\n]*\n)+)")
_STRING_AFTER_SIGNATURE = re.compile(
    r"^(?P<head>[^\n]*\n)(?P<indent>[ \t]+)(?P<quote>\"\"\"|''')(?P<body>.*?)(?P=quote)[ \t]*\n",
    re.DOTALL)
_TAG_LINE = re.compile(r"^\s*[@:](param|return|returns|throws|raises|type|rtype|arg)\b", re.IGNORECASE)


def summary_line(docstring: str) -> str:
    """The first paragraph of a docstring, on one line, up to its first `@param`-style tag: what a
    user would type to find it."""
    paragraph = []
    for line in docstring.strip().splitlines():
        if not line.strip() and paragraph:
            break
        if _TAG_LINE.match(line):
            break
        if line.strip():
            paragraph.append(line.strip())
    return " ".join(" ".join(paragraph).split())


def _parse_python(source: str) -> tuple[ast.AST, int] | None:
    """The module (or, for an indented snippet such as a method whose string literals reach column
    0, a wrapper class around it) and the number of lines added in front; None if not Python."""
    for prefix in ("", "class _:\n"):
        try:
            tree = ast.parse(prefix + source)
        except (SyntaxError, ValueError):
            continue
        return (tree.body[0] if prefix else tree), prefix.count("\n")
    return None


def _split_python(code: str) -> tuple[str, str] | None:
    """(docstring, code without it) of Python source, ("", code) when it has none, None when the
    text is not Python."""
    source = textwrap.dedent(code)
    parsed = _parse_python(source)
    if parsed is None:
        return None
    tree, offset = parsed
    owner = tree.body[0] if len(tree.body) == 1 and isinstance(
        tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else tree
    docstring = ast.get_docstring(owner)
    if not docstring:
        return "", code
    first = owner.body[0]
    lines = source.splitlines()
    kept = [line for number, line in enumerate(lines, 1 + offset)
            if not first.lineno <= number <= first.end_lineno]
    return docstring, "\n".join(kept)


def _comment_text(block: str) -> str:
    """A comment block without its markers (`/**`, ` * `, `//`, `#`, `--`)."""
    return "\n".join(re.sub(r"^\s*(\*+(?!\S*\*)|//+|#+|--)\s?", "", line) for line in block.splitlines())


def _split_pattern(code: str) -> tuple[str, str] | None:
    for pattern in (_BLOCK, _LINE_COMMENTS):
        match = pattern.match(code)
        if match:
            return _comment_text(match.group("body")), code[match.end():]
    match = _STRING_AFTER_SIGNATURE.match(code)
    if match:
        return match.group("body"), match.group("head") + code[match.end():]
    # a comment block right after the signature line (e.g. a C function's first lines)
    head, _, rest = code.partition("\n")
    for pattern in (_BLOCK, _LINE_COMMENTS):
        match = pattern.match(rest)
        if match:
            return _comment_text(match.group("body")), head + "\n" + rest[match.end():]
    return None


def split_docstring(code: str) -> tuple[str, str]:
    """(the docstring's summary line, the code without the docstring); ("", code) when none."""
    found = _split_python(code)
    if found is None:  # not Python: a comment or docstring pattern
        found = _split_pattern(code)
    if not found or not found[0]:
        return "", code
    docstring, rest = found
    return summary_line(docstring), textwrap.dedent(rest).strip("\n")


def _signature_only(code: str) -> bool:
    """Nothing left but (at most) a signature line, e.g. `def placeholder():`."""
    lines = [line.strip() for line in code.splitlines() if line.strip()]
    return not lines or (len(lines) == 1 and lines[0].endswith((":", "{", ")")))


class DocstringExtractor:
    key = "docstring"
    structural = True
    description = "docstring or leading comment -> the code without it"

    def _split(self, units: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
        """Per unit: the summary and the code without it. A reader that split the docstrings itself
        (python_stdlib, through `split_docstring`) left the summaries in `anchor` and the code in
        `text`; any other corpus is parsed here."""
        anchors = units["anchor"].fillna("") if "anchor" in units else pd.Series("", index=units.index)
        if anchors.ne("").any():
            return anchors.str.strip(), units["text"].fillna("")
        parsed = [split_docstring(text or "") for text in units["text"]]
        return (pd.Series([s for s, _ in parsed], index=units.index).str.strip(),
                pd.Series([c for _, c in parsed], index=units.index))

    def unit_queries(self, units: pd.DataFrame, config: ExtractorConfig) -> pd.Series:
        summaries, _ = self._split(units)
        return summaries.where(summaries.str.split().str.len().fillna(0) >= config.min_words, "")

    def extract(self, units: pd.DataFrame, config: ExtractorConfig) -> Extraction:
        summaries, code = self._split(units)
        words = summaries.str.split().str.len().fillna(0)
        why = pd.Series("", index=units.index)
        why[code.map(_signature_only)] = "that are a docstring alone"
        why[words < config.min_words] = f"whose summary has fewer than {config.min_words} words"
        why[summaries == ""] = "without a docstring or leading comment"
        usable = why == ""
        positives = [f"{title}\n{body}" if title else body
                     for title, body in zip(units["title"].fillna("")[usable], code[usable], strict=True)]
        pairs = pairs_frame(summaries[usable], positives, units["doc_id"][usable], self.key)
        return Extraction(self.key, pairs, len(units), why[why != ""].value_counts().to_dict())


register(DocstringExtractor())
