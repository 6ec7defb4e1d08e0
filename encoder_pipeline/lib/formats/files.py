"""A folder (or glob) of text, markdown or HTML files, one document per file, titled by its first
heading; through Daft's glob and download (streamed; local paths and object-storage URIs alike)."""

from __future__ import annotations

import html.parser
import os
import re

import daft
from daft import col

from encoder_pipeline.lib.formats.base import (
    MALFORMED_HINT,
    CorpusError,
    CorpusFormat,
    Fields,
    Skipped,
    is_remote,
    register,
    require_exists,
)

TEXT_FILE_PATTERN = r"\.(txt|text|md|markdown|rst|html?|xhtml)$"


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
    if is_remote(head):
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


@register
class DocumentFiles(CorpusFormat):
    key = "files"
    uses_fields = False
    location_hint = "a folder or glob of .txt/.md/.html files"

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        require_exists(location, self.location_hint)
        return read_document_files(location, on_malformed, skipped)

    def detects(self, location: str) -> bool:
        return not is_remote(location) and os.path.isdir(location)
