"""`encoder-pipeline domain add`: a user's corpus becomes a validated spec and a partition of the
real Dagster instance, or nothing is written and the error says which field is wrong."""

import json
import sqlite3

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline import cli
from encoder_pipeline.domains import load_domain
from encoder_pipeline.lib.sources import read_corpus
from encoder_pipeline_tests.conftest import shared_corpus


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Spec folder, artifact root and Dagster home of a user's own, all throwaway."""
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def partitions(workspace) -> list[str]:
    with dg.DagsterInstance.from_config(str(workspace / "dagster")) as instance:
        return instance.get_dynamic_partitions("domain")


def test_jsonl_with_mapped_fields_becomes_a_partition(workspace, capsys):
    legal = shared_corpus("legal/privacy_policies")
    rows = [json.loads(line) for line in (legal / "corpus.jsonl").read_text().splitlines()[:80]]
    with (workspace / "policies.jsonl").open("w") as out:
        for row in rows:
            out.write(json.dumps({"key": row["_id"], "section": row["title"], "body": row["text"]}) + "\n")
    code = cli.main(["domain", "add", "policies", "--corpus", "policies.jsonl", "--id-field", "key",
                     "--title-field", "section", "--text-field", "body"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "documents: 80" in printed and "fields: key, section, body" in printed and "en " in printed
    spec = load_domain("policies")
    assert spec.corpus.format == "jsonl" and spec.corpus.text_field == "body"
    units = read_corpus(spec.corpus.format, spec.corpus_location(), spec.corpus.id_field,
                        spec.corpus.title_field, spec.corpus.text_field).to_pandas()
    assert set(units["doc_id"]) == {row["_id"] for row in rows}
    assert "policies" in partitions(workspace)


def test_a_sqlite_table_is_detected_and_read_by_the_spec_it_writes(workspace, capsys):
    legal = shared_corpus("legal/privacy_policies")
    rows = pd.read_json(legal / "corpus.jsonl", lines=True, dtype={"_id": str}).head(80)
    with sqlite3.connect(workspace / "policies.sqlite") as connection:
        rows.rename(columns={"_id": "id"}).to_sql("segments", connection, index=False)
    assert cli.main(["domain", "add", "policies", "--corpus", "policies.sqlite", "--id-field", "id"]) == 0
    printed = capsys.readouterr().out
    assert "policies: sqlite corpus at" in printed and "documents: 80" in printed
    spec = load_domain("policies")
    assert spec.corpus.format == "sqlite" and spec.corpus.id_field == "id"
    units = read_corpus(spec.corpus.format, spec.corpus_location(), spec.corpus.id_field,
                        spec.corpus.title_field, spec.corpus.text_field).to_pandas()
    assert set(units["doc_id"]) == set(rows["_id"])
    assert cli.main(["domains"]) == 0 and "policies     sqlite" in capsys.readouterr().out


def test_wrong_field_writes_nothing_and_names_the_fields(workspace, capsys):
    (workspace / "c.jsonl").write_text(json.dumps({"id": "1", "content": "some text here"}) + "\n")
    assert cli.main(["domain", "add", "broken", "--corpus", "c.jsonl"]) == 2
    error = capsys.readouterr().err
    assert "text field 'text' not found" in error and "content" in error
    assert not (workspace / "domains" / "broken.toml").exists()
    assert not list((workspace / "domains").glob(".staging-*"))


def test_beir_folder_with_judged_set_is_detected(workspace, capsys):
    web_qa = shared_corpus("web_qa/python_docs")
    assert cli.main(["domain", "add", "docs", "--corpus", str(web_qa), "--judged", str(web_qa)]) == 0
    printed = capsys.readouterr().out
    assert "judged set: 175 queries over 175 documents, 0 of them missing" in printed
    spec = load_domain("docs")
    assert spec.corpus.format == "beir" and spec.judged is not None


def test_existing_domain_is_not_replaced_without_force(workspace, capsys):
    folder = workspace / "pages"
    folder.mkdir()
    (folder / "a.md").write_text("# Cookies\n\nWe use cookies to keep you signed in.\n")
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder)]) == 0
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder), "--force"]) == 0
    assert load_domain("pages").corpus.format == "files"
