"""Every registered corpus format (lib/formats/) reads into the same columns, with field mapping and clear errors.
Real text: the legal sample corpus (../shared/corpora/legal/privacy_policies) rewritten in each
format."""

import json
import sqlite3

import pandas as pd
import pytest

from encoder_pipeline.lib import formats
from encoder_pipeline.lib.formats import CORPUS_COLUMNS
from encoder_pipeline.lib.formats.files import parse_document_file
from encoder_pipeline.lib.formats.jsonl import parse_line
from encoder_pipeline.lib.sources import CorpusError, read_corpus
from encoder_pipeline_tests.conftest import shared_corpus

LEGAL = "legal/privacy_policies"


@pytest.fixture(scope="module")
def legal_docs() -> pd.DataFrame:
    lines = (shared_corpus(LEGAL) / "corpus.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:60]]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_tabular_formats_map_their_fields(tmp_path, legal_docs, fmt):
    renamed = legal_docs.rename(columns={"_id": "key", "title": "heading", "text": "body"})
    path = tmp_path / f"part-0.{fmt}"
    if fmt == "jsonl":
        renamed.to_json(path, orient="records", lines=True)
    elif fmt == "parquet":
        renamed.to_parquet(path)
    else:
        renamed.to_csv(path, index=False)
    frame = read_corpus(fmt, str(tmp_path / f"*.{fmt}"), id_field="key", title_field="heading",
                        text_field="body").to_pandas()
    assert tuple(frame.columns) == CORPUS_COLUMNS
    assert frame.set_index("doc_id").loc["policy-1", "text"] == legal_docs.set_index("_id").loc[
        "policy-1", "text"]
    assert len(frame) == len(legal_docs)


def test_missing_text_field_names_the_fields_present(tmp_path, legal_docs):
    legal_docs.to_parquet(tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=r"text field 'body' not found.*'_id', 'text', 'title'"):
        read_corpus("parquet", str(tmp_path / "c.parquet"), text_field="body")


def test_folder_of_files_one_document_per_file(tmp_path, legal_docs):
    articles = legal_docs[legal_docs["_id"].str.startswith("gdpr-art")].head(3)
    if articles.empty:  # the sample's first rows are policy segments: use them as pages instead
        articles = legal_docs.head(3)
    (tmp_path / "sub").mkdir()
    markdown, page, plain = articles.to_dict("records")
    (tmp_path / "a.md").write_text(f"# {markdown['title']}\n\n{markdown['text']}\n\n## Scope\n\nMore.\n")
    (tmp_path / "sub" / "b.html").write_text(
        f"<html><head><title>{page['title']}</title><style>p {{color: red}}</style></head>"
        f"<body><h1>{page['title']}</h1><p>{page['text']}</p><script>track()</script></body></html>")
    (tmp_path / "c.txt").write_text(plain["text"])
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")
    frame = read_corpus("files", str(tmp_path)).to_pandas().set_index("doc_id")
    assert sorted(frame.index) == ["a.md", "c.txt", "sub/b.html"]
    assert frame.loc["a.md", "title"] == markdown["title"]
    assert frame.loc["a.md", "text"].splitlines()[-2:] == ["Scope", "More."]  # headings kept
    assert frame.loc["sub/b.html", "title"] == page["title"]
    assert "track()" not in frame.loc["sub/b.html", "text"] and "color" not in frame.loc["sub/b.html", "text"]
    assert frame.loc["sub/b.html", "text"] == " ".join(page["text"].split())
    assert frame.loc["c.txt", "title"] == "c" and frame.loc["c.txt", "text"] == plain["text"]


def test_html_entities_and_markdown_title():
    parsed = parse_document_file("x/page.htm", "<p>Terms &amp; conditions</p><p>Apply to all users of the site.</p>")
    assert parsed == {"title": "Terms & conditions", "text": "Apply to all users of the site."}
    assert parse_document_file("notes.md", "intro\n# Heading\nbody")["title"] == "Heading"


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_corpus("files", str(tmp_path / "missing"))


def _sqlite(path, frames: dict[str, pd.DataFrame]) -> None:
    with sqlite3.connect(path) as connection:
        for table, frame in frames.items():
            frame.to_sql(table, connection, index=False)


def test_a_sqlite_table_reads_like_the_same_rows_as_jsonl(tmp_path, legal_docs):
    renamed = legal_docs.rename(columns={"_id": "key", "title": "heading", "text": "body"})
    _sqlite(tmp_path / "policies.db", {"segments": renamed})
    renamed.to_json(tmp_path / "policies.jsonl", orient="records", lines=True)
    fields = {"id_field": "key", "title_field": "heading", "text_field": "body"}
    from_sqlite = read_corpus("sqlite", str(tmp_path / "policies.db"), **fields).to_pandas()
    from_jsonl = read_corpus("jsonl", str(tmp_path / "policies.jsonl"), **fields).to_pandas()
    assert tuple(from_sqlite.columns) == CORPUS_COLUMNS
    pd.testing.assert_frame_equal(from_sqlite.sort_values("doc_id").reset_index(drop=True),
                                  from_jsonl.sort_values("doc_id").reset_index(drop=True))


def test_a_sqlite_file_with_several_tables_needs_one_named(tmp_path, legal_docs):
    _sqlite(tmp_path / "both.db", {"segments": legal_docs.head(5), "articles": legal_docs.tail(7)})
    with pytest.raises(CorpusError, match=r'holds 2 tables \(articles, segments\).*both.db#articles'):
        read_corpus("sqlite", str(tmp_path / "both.db"))
    assert len(read_corpus("sqlite", f"{tmp_path / 'both.db'}#articles").to_pandas()) == 7
    with pytest.raises(CorpusError, match=r"no table 'pages' \(tables: articles, segments\)"):
        read_corpus("sqlite", f"{tmp_path / 'both.db'}#pages")
    (tmp_path / "not.db").write_text("plain text, not a database")
    with pytest.raises(CorpusError, match="cannot read .*not.db as a SQLite database"):
        read_corpus("sqlite", str(tmp_path / "not.db"))


def test_formats_are_detected_from_the_registry(tmp_path):
    (tmp_path / "beir").mkdir()
    (tmp_path / "beir" / "corpus.jsonl").write_text("")
    (tmp_path / "pages").mkdir()
    cases = {"beir": "beir", "pages": "files", "a.jsonl": "jsonl", "a.parquet": "parquet", "a.csv": "csv",
             "a.sqlite": "sqlite", "a.db#t": "sqlite", "s3://bucket/a.parquet": "parquet"}
    assert {name: formats.detect(name if "://" in name else str(tmp_path / name)) for name in cases} == cases
    with pytest.raises(CorpusError, match=r"cannot tell the format of .*a\.xlsx: pass --format \(.*sqlite"):
        formats.detect(str(tmp_path / "a.xlsx"))


@pytest.mark.parametrize("line, message", [
    (b'{"_id": "1", "text": "a\x01b"}\n', ("not valid JSON (raw control character U+0001 inside a string "
                                           "(write it as \\u0001), character 24)")),
    (b'{"_id": "1", "text": \n', "not valid JSON (Expecting value, character 23)"),
    (b'["a list"]\n', "not a JSON object"),
    (b'{"_id": "\xff"}\n', "not valid UTF-8 (byte 9)"),
])
def test_a_malformed_line_is_named_in_plain_words(line, message):
    assert parse_line(line) == (None, message)
