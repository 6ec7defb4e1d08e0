"""`encoder-pipeline domain add`: a user's corpus becomes a validated spec and a partition of the
real Dagster instance, or nothing is written and the error says which field is wrong."""

import json
import re
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


def policy_rows(n: int) -> list[tuple[str, str, str]]:
    """(id, title, text) of `n` real privacy-policy segments."""
    legal = shared_corpus("legal/privacy_policies")
    rows = [json.loads(line) for line in (legal / "corpus.jsonl").read_text().splitlines()[:n]]
    return [(row["_id"], row["title"], row["text"]) for row in rows]


def write_jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


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


@pytest.mark.parametrize("text_field", ["body", "content", "abstract"])
def test_the_text_column_is_found_without_a_flag(workspace, capsys, text_field):
    """A dump whose text is not in `text`: a common name (`body`, `content`), or the one column
    besides the id (`abstract`), is the text; the spec says so and the run reads it."""
    rows = policy_rows(40)
    write_jsonl(workspace / "dump.jsonl", [{"id": doc, text_field: text} for doc, _, text in rows])
    assert cli.main(["domain", "add", "dump", "--corpus", "dump.jsonl"]) == 0
    assert f"(ids from field 'id', text from field '{text_field}')" in capsys.readouterr().out
    spec = load_domain("dump")
    assert spec.corpus.text_field == text_field
    units = read_corpus(spec.corpus.format, spec.corpus_location(), spec.corpus.id_field,
                        spec.corpus.title_field, spec.corpus.text_field).to_pandas()
    assert units.set_index("doc_id")["text"].to_dict() == {doc: text for doc, _, text in rows}


def test_wrong_field_writes_nothing_and_names_the_fields(workspace, capsys):
    """Two candidate columns and neither a common text name: refused, naming the columns and the flag."""
    (workspace / "c.jsonl").write_text(json.dumps({"id": "1", "question": "why", "answer": "some text here"}) + "\n")
    assert cli.main(["domain", "add", "broken", "--corpus", "c.jsonl"]) == 2
    error = capsys.readouterr().err
    assert "text field 'text' not found" in error and "'answer', 'id', 'question'" in error
    assert "--text-field" in error
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
    for i, (_id, title, text) in enumerate(policy_rows(20)):
        (folder / f"page{i}.md").write_text(f"# {title}\n\n{text}\n")
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder)]) == 0
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["domain", "add", "pages", "--corpus", str(folder), "--force"]) == 0
    assert load_domain("pages").corpus.format == "files"


# --- validation at the door: what the run would refuse is refused here, with the run's message ------

def _refused(workspace, capsys, argv: list[str], message: str) -> None:
    assert cli.main(["domain", "add", "mine", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and "nothing was written or registered" in error, error
    assert not (workspace / "domains" / "mine.toml").exists() and "mine" not in partitions(workspace)


def test_duplicate_ids_are_refused_at_the_door(workspace, capsys):
    rows = [{"_id": "same" if i < 2 else doc, "title": t, "text": x} for i, (doc, t, x) in enumerate(policy_rows(40))]
    write_jsonl(workspace / "c.jsonl", rows)
    _refused(workspace, capsys, ["--corpus", "c.jsonl"], "the corpus has 1 duplicate document ids")


def test_a_judged_set_naming_unknown_documents_is_refused_at_the_door(workspace, capsys):
    rows = policy_rows(40)
    write_jsonl(workspace / "c.jsonl", [{"_id": d, "title": t, "text": x} for d, t, x in rows])
    judged = workspace / "judged"
    (judged / "qrels").mkdir(parents=True)
    write_jsonl(judged / "queries.jsonl", [{"_id": "q1", "text": "do you sell my data"}])
    (judged / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tnot-a-document\t1\n")
    _refused(workspace, capsys, ["--corpus", "c.jsonl", "--judged", str(judged)],
             "the judged set's qrels name 1 documents that are not in the corpus")


@pytest.mark.parametrize("text, message", [("", "no documents left after cleaning"),
                                           ("We never sell your personal data to anyone.", "only 1 distinct units are left")])
def test_all_empty_or_all_identical_texts_are_refused_at_the_door(workspace, capsys, text, message):
    write_jsonl(workspace / "c.jsonl", [{"_id": f"d{i}", "title": "", "text": text} for i in range(40)])
    _refused(workspace, capsys, ["--corpus", "c.jsonl"], message)


def test_a_malformed_line_names_the_flag_that_skips_it(workspace, capsys):
    rows = policy_rows(40)
    (workspace / "c.jsonl").write_text("".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n"
                                               for d, t, x in rows) + '{"_id": "broken", "text": \n')
    _refused(workspace, capsys, ["--corpus", "c.jsonl"], "--on-malformed skip")
    assert cli.main(["domain", "add", "mine", "--corpus", "c.jsonl", "--on-malformed", "skip"]) == 0
    assert "1 malformed entries are left out" in capsys.readouterr().out
    assert load_domain("mine").corpus.on_malformed == "skip"


def test_an_id_column_is_found_and_what_cleaning_changes_is_counted(workspace, capsys):
    """A CSV whose ids are in `id` keeps them; a giant document and the empty texts are warned
    about with counts before anything is built."""
    rows = policy_rows(40)
    giant = " ".join(text for _, _, text in rows)  # about 40 segments' worth of words in one document
    frame = pd.DataFrame({"id": [d for d, _, _ in rows] + ["giant", "empty"],
                          "title": [t for _, t, _ in rows] + ["everything", ""],
                          "text": [x for _, _, x in rows] + [giant, ""]})
    frame.to_csv(workspace / "c.csv", index=False)
    assert cli.main(["domain", "add", "mine", "--corpus", "c.csv"]) == 0
    printed = capsys.readouterr().out
    assert "(ids from field 'id', text from field 'text')" in printed and load_domain("mine").corpus.id_field == "id"
    assert re.search(r"warning: document 'giant' becomes [\d,]+ of the [\d,]+ units \(\d+%\)", printed), printed
    assert re.search(r"warning: 1 units are empty", printed), printed


def test_a_corpus_not_in_english_is_flagged_for_the_english_base_model(workspace, capsys):
    sentences = ["Wir speichern Ihre Daten nur so lange, wie es für den Zweck erforderlich ist.",
                 "Sie können der Verarbeitung Ihrer personenbezogenen Daten jederzeit widersprechen.",
                 "Cookies helfen uns, die Nutzung unserer Webseite zu analysieren und zu verbessern.",
                 "Wir geben Ihre Daten nicht ohne Ihre ausdrückliche Einwilligung an Dritte weiter."]
    write_jsonl(workspace / "c.jsonl", [{"_id": f"d{i}", "title": f"Abschnitt {i}",
                                         "text": f"{sentences[i % 4]} Absatz {i} der Datenschutzerklärung."}
                                        for i in range(40)])
    assert cli.main(["domain", "add", "mine", "--corpus", "c.jsonl"]) == 0
    printed = capsys.readouterr().out
    assert "warning: most of the corpus is not English (de" in printed and "multilingual" in printed
