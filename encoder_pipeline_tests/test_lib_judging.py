"""lib.judging: depth-k pooling in a blind order, the append-only judgment log (a kill mid-write, a
corrected label, two writers at once) and its BEIR view as runs read it, query files, the spec's
[judged] table, and a session's resume point, over a small real corpus."""

import csv
import json
import multiprocessing
import os
import signal
import time

import pandas as pd
import pytest
from judging_fixtures import DEV_QUERIES, EVAL_QUERIES, QUERIES, stdlib_units, tiny_store, write_domain_spec

from encoder_pipeline.domains import load_spec
from encoder_pipeline.lib import judging
from encoder_pipeline.lib.artifacts import Manifest
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, EncoderHandle, resolve_model_path
from encoder_pipeline.lib.judging import (
    LOG_FILE,
    JudgingError,
    JudgingSession,
    Pooler,
    append_judgment,
    blind_order,
    bm25_system,
    dense_system,
    domain_systems,
    eval_queries,
    point_spec_at,
    pool,
    query_id,
    read_judgments,
    read_query_file,
    training_queries,
)
from encoder_pipeline.lib.layout import (
    HEURISTIC_PAIRS,
    MODEL_DIR,
    PAIRS_FILE,
    SYNTHETIC_FILE,
    SYNTHETIC_QUERIES,
    corpus_texts,
)
from encoder_pipeline.lib.metrics import bm25_run
from encoder_pipeline.lib.sources import read_judged

RUNGS = ["encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"]


def test_pool_is_the_deduplicated_top_k_of_each_system_in_a_blind_order():
    rankings = {"bm25": [f"d{i}" for i in range(10)], "dense": ["d2", "d7", "x1", "d0", "x2"]}
    pooled = pool("q1", rankings, depth=3)
    assert sorted(pooled) == sorted({"d0", "d1", "d2", "d7", "x1"})  # top 3 of each, d2 once
    assert sorted(pool("q1", rankings, depth=1)) == ["d0", "d2"]
    system_order = list(dict.fromkeys(doc for ranking in rankings.values() for doc in ranking[:3]))
    assert pooled != system_order and pooled != sorted(pooled)
    # Stable, and the order says nothing of who found a document or at what rank.
    assert pool("q1", rankings, depth=3) == pooled
    reordered = {"dense": ["x1", "d7", "d2"], "bm25": ["d1", "d2", "d0"]}
    assert pool("q1", reordered, depth=3) == pooled
    assert pool("q2", rankings, depth=3) != pooled and pool("q1", rankings, depth=3, seed=1) != pooled
    with pytest.raises(ValueError):
        pool("q1", rankings, depth=0)


def _view(folder):
    """The BEIR view as a run reads it (lib.sources.read_judged: queries with a relevant document)."""
    return read_judged(str(folder), "dev")


def _written_qrels(folder) -> dict[str, dict[str, int]]:
    """Every judgment in the BEIR view's qrels file, zero grades and all-zero queries included."""
    with open(folder / "qrels" / "dev.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    qrels: dict[str, dict[str, int]] = {}
    for row in rows:
        qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def test_latest_label_wins_and_the_beir_view_follows_the_log(tmp_path):
    append_judgment(tmp_path, "parse a date", "time.strptime", 1)
    append_judgment(tmp_path, "parse a date", "datetime.fromisoformat", 1)
    append_judgment(tmp_path, "Parse a date.", "time.strptime", 0)  # the same query, corrected
    queries, qrels = _view(tmp_path)
    qid = query_id("parse a date")
    assert queries == {qid: "parse a date"}
    assert qrels == {qid: {"time.strptime": 0, "datetime.fromisoformat": 1}}
    assert len(read_judgments(tmp_path)) == 3  # append-only: the mistake stays in the log
    assert (tmp_path / "qrels" / "dev.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    for wrong in (2, 1.0, True):  # qrels hold integer grades: 0 or 1
        with pytest.raises(JudgingError):
            append_judgment(tmp_path, "parse a date", "time.strptime", wrong)


def test_a_torn_last_line_loses_only_itself(tmp_path):
    for doc in ("a", "b", "c"):
        append_judgment(tmp_path, "first query", doc, 1)
    with open(tmp_path / LOG_FILE, "ab") as log:  # what a kill in the middle of a write leaves
        log.write(b'{"doc_id": "d", "query": "first que')
    assert [j.doc_id for j in read_judgments(tmp_path)] == ["a", "b", "c"]
    append_judgment(tmp_path, "second query", "e", 1)  # starts its own line after the torn one
    assert [j.doc_id for j in read_judgments(tmp_path)] == ["a", "b", "c", "e"]
    queries, qrels = _view(tmp_path)
    assert qrels == {query_id("first query"): dict.fromkeys("abc", 1), query_id("second query"): {"e": 1}}
    assert set(queries.values()) == {"first query", "second query"}


def test_a_query_with_nothing_relevant_is_kept_in_the_files_but_not_evaluated(tmp_path):
    append_judgment(tmp_path, "kept query", "a", 1)
    append_judgment(tmp_path, "kept query", "b", 0)
    append_judgment(tmp_path, "nothing fits", "c", 0)
    assert _written_qrels(tmp_path)[query_id("nothing fits")] == {"c": 0}
    queries, qrels = _view(tmp_path)  # it would score 0 for every system: it tells none apart
    assert set(queries.values()) == {"kept query"} and qrels[query_id("kept query")] == {"a": 1, "b": 0}


def _append_forever(folder):
    number = 0
    while True:
        append_judgment(folder, f"query {number % 7}", f"doc-{number}", number % 2)
        number += 1


def test_a_writer_killed_mid_append_leaves_a_readable_log(tmp_path):
    writer = multiprocessing.get_context("fork").Process(target=_append_forever, args=(tmp_path,))
    writer.start()
    deadline = time.monotonic() + 30
    while len(read_judgments(tmp_path)) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    before = read_judgments(tmp_path)
    assert len(before) >= 40 and [j.doc_id for j in before] == [f"doc-{n}" for n in range(len(before))]
    append_judgment(tmp_path, "after the kill", "doc-last", 1)  # the next page carries on
    after = read_judgments(tmp_path)
    assert after[:-1] == before and after[-1].doc_id == "doc-last"
    qrels = _written_qrels(tmp_path)
    assert sum(len(docs) for docs in qrels.values()) == len(after) and len(qrels) == 8


def _append_fifty(folder, name, start):
    """50 judgments, each read back at once through the BEIR view (a view rewritten from a stale
    read of the log by the other writer would miss it)."""
    start.wait()
    for number in range(50):
        judgment = append_judgment(folder, f"{name} query {number % 5}", f"{name}-doc-{number}", number % 2)
        assert _written_qrels(folder)[judgment.query_id][judgment.doc_id] == number % 2


def test_two_writers_at_once_never_tear_a_file(tmp_path):
    context = multiprocessing.get_context("fork")
    start = context.Event()
    writers = [context.Process(target=_append_fifty, args=(tmp_path, name, start)) for name in ("left", "right")]
    for writer in writers:
        writer.start()
    start.set()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    lines = (tmp_path / LOG_FILE).read_bytes().splitlines()
    assert len(lines) == 100 and all(json.loads(line) for line in lines)
    assert len(read_judgments(tmp_path)) == 100
    queries, qrels = _view(tmp_path)
    assert len(queries) == 10 and sum(len(docs) for docs in qrels.values()) == 100
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".judgments.lock"]  # no temp file left


def test_queries_file_plain_and_jsonl(tmp_path):
    plain = tmp_path / "queries.txt"
    plain.write_text("parse a date\n\n  Parse a date.  \nwrap text\n")
    assert read_query_file(plain) == ["parse a date", "wrap text"]
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text('{"text": "parse a date", "user": 3}\n{"query": "wrap text"}\n')
    assert read_query_file(jsonl) == ["parse a date", "wrap text"]


@pytest.mark.parametrize(("name", "content", "line", "says"), [
    ("log.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', 3, "not a JSON object"),
    ("log.jsonl", b'{"text": "a"}\n\n{"user": 7}\n', 3, "no `text` or `query` field"),
    ("log.txt", b'{"query": "a"}\n["b"]\n', 2, "no `text` or `query` field"),
    ("queries.txt", b"parse a date\nwrap \xff text\n", 2, "not UTF-8"),
])
def test_a_malformed_queries_file_names_its_file_and_line(tmp_path, name, content, line, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(JudgingError, match=rf"{path}:{line}: {says}"):
        read_query_file(path)


def test_an_empty_or_missing_queries_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(JudgingError, match="no queries"):
        read_query_file(tmp_path / "empty.txt")
    with pytest.raises(JudgingError, match="cannot read"):
        read_query_file(tmp_path / "absent.txt")


def test_eval_queries_are_the_eval_side_only(tmp_path):
    store = tiny_store(tmp_path, "tiny")
    assert eval_queries(store, "tiny") == list(EVAL_QUERIES.values())
    assert not set(eval_queries(store, "tiny")) & set(DEV_QUERIES.values())


def test_pointing_the_spec_at_the_folder_keeps_every_other_line(tmp_path):
    spec_file = write_domain_spec(tmp_path, "tiny")
    original = spec_file.read_text()
    folder = tmp_path / "judged"
    assert point_spec_at(spec_file, folder) is None
    written = spec_file.read_text()
    assert written.startswith(original.rstrip("\n")) and written.endswith(
        f'[judged]\npath = "{folder}"\nsplit = "dev"\n')
    assert load_spec(spec_file).judged_location() == str(folder)
    # Again, elsewhere: the table is replaced, not repeated; a table after it and its comment stay.
    spec_file.write_text(written + "\n# after judged\n[drift]\nretrain_changed_fraction = 0.2\n")
    assert point_spec_at(spec_file, tmp_path / "other") == str(folder)
    text = spec_file.read_text()
    assert text.count("[judged]") == 1 and f'path = "{tmp_path / "other"}"' in text
    assert "# after judged\n[drift]\nretrain_changed_fraction = 0.2\n" in text
    spec = load_spec(spec_file)
    assert spec.judged_location() == str(tmp_path / "other") and spec.drift.retrain_changed_fraction == 0.2
    assert text.replace(f'path = "{tmp_path / "other"}"', f'path = "{folder}"') == (
        written + "\n# after judged\n[drift]\nretrain_changed_fraction = 0.2\n")


def test_a_spec_whose_judged_table_cannot_be_rewritten_is_left_alone(tmp_path):
    spec_file = write_domain_spec(tmp_path, "tiny")
    spec_file.write_text(spec_file.read_text().replace(  # [judged] as a dotted key, before any table
        'name = "tiny"\n', 'name = "tiny"\njudged.path = "somewhere"\n'))
    before = spec_file.read_text()
    with pytest.raises(JudgingError, match=r"set it by hand"):
        point_spec_at(spec_file, tmp_path / "judged")
    assert spec_file.read_text() == before


def test_queries_training_used_are_never_offered_for_judging(tmp_path):
    """A judged set must be unseen: a query of the published training rows (here a structural pair's
    and a synthetic one, in another case and punctuation) is left out of the file's queries, and
    refused when typed into the page."""
    store = tiny_store(tmp_path / "artifacts", "tiny")
    with store.publish(Manifest("tiny", HEURISTIC_PAIRS, "v1", 0, {})) as staging:
        pd.DataFrame({"query": [QUERIES[0]], "positive": ["..."]}).to_parquet(staging / PAIRS_FILE)
    with store.publish(Manifest("tiny", SYNTHETIC_QUERIES, "v1", 0, {})) as staging:
        pd.DataFrame({"query": [QUERIES[2].upper() + "?"], "positive": ["..."]}).to_parquet(
            staging / SYNTHETIC_FILE)
    trained = training_queries(store, "tiny")  # no mined_negatives yet: what is published counts
    units = stdlib_units()
    session = JudgingSession(tmp_path / "judged", QUERIES[:4], Pooler([bm25_system(units)], depth=2),
                             units, trained=trained)
    assert session.left_out == [QUERIES[0], QUERIES[2]]
    assert [session.texts[q] for q in session.order] == [QUERIES[1], QUERIES[3]]
    with pytest.raises(JudgingError, match="training used this query"):
        session.add_query(f"  {QUERIES[0].title()}. ")
    assert session.add_query("parse a date") == 1


def test_systems_of_a_domain_skip_what_is_not_published(tmp_path):
    store = tiny_store(tmp_path / "artifacts", "tiny")
    units = stdlib_units()
    common = {"base": EncoderHandle(DEFAULT_BASE_MODEL), "rungs": RUNGS, "cache_dir": tmp_path / "cache"}
    systems, skipped = domain_systems(store, "tiny", units, teacher="", **common)
    assert [s.name for s in systems] == ["bm25", "off_the_shelf"]
    assert skipped == {"teacher": "it is the off-the-shelf model",
                       **dict.fromkeys(RUNGS, "not materialized")}
    with store.publish(Manifest("tiny", "encoder_heuristic", "v1", 0, {})) as staging:
        (staging / MODEL_DIR).symlink_to(resolve_model_path(DEFAULT_BASE_MODEL))
    systems, skipped = domain_systems(store, "tiny", units, teacher=str(tmp_path / "no-such-model"), **common)
    assert [s.name for s in systems] == ["bm25", "off_the_shelf", "encoder_heuristic"]
    assert "does not exist" in skipped["teacher"] and "encoder_heuristic" not in skipped


def test_pools_of_bm25_and_the_base_model_are_documents(tmp_path):
    units = stdlib_units()
    systems = [bm25_system(units), dense_system("off_the_shelf", EncoderHandle(DEFAULT_BASE_MODEL), units, tmp_path)]
    pooler = Pooler(systems, depth=3)
    queries = {query_id(q): q for q in QUERIES[:2]}
    pools = pooler.pools(queries)
    copy, wrap = pools[query_id(QUERIES[0])], pools[query_id(QUERIES[1])]
    parents = set(units["parent_id"])
    assert set(copy) <= parents and set(wrap) <= parents  # chunks pooled as their document
    assert 3 <= len(copy) <= 6 and 3 <= len(wrap) <= 6
    assert "shutil.copytree" in copy and {"textwrap.wrap", "textwrap.fill"} & set(wrap)
    assert pooler.pools(queries) == pools and copy == blind_order(query_id(QUERIES[0]), copy)


def test_bm25_indexes_the_corpus_once_for_every_batch_of_queries(monkeypatch):
    """A session pools a few queries at a time; each batch searches the index built for the first
    (re-indexing a 40,000-unit corpus per batch made every page turn wait), with the same results."""
    units = stdlib_units()
    built = []

    class CountedIndex(judging.BM25Index):
        def __init__(self, *args):
            built.append(True)
            super().__init__(*args)

    monkeypatch.setattr(judging, "BM25Index", CountedIndex)
    pooler = Pooler([bm25_system(units)], depth=3)
    batches = [{query_id(q): q for q in QUERIES[i:i + 2]} for i in range(0, 4, 2)]
    pools = [pooler.pools(batch) for batch in batches]
    assert len(built) == 1
    texts, parents = corpus_texts(units), list(units["parent_id"])
    for batch, pooled in zip(batches, pools, strict=True):
        fresh = bm25_run(texts, parents, batch, 3 * judging.UNITS_PER_DOCUMENT)
        for qid in batch:
            ranked = [doc for doc, _ in sorted(fresh[qid].items(), key=lambda kv: (-kv[1], kv[0]))]
            assert pooled[qid] == pool(qid, {"bm25": ranked}, 3)


def test_a_query_with_no_candidates(tmp_path):
    units = stdlib_units()
    session = JudgingSession(tmp_path, ["zzxq vvqk"], Pooler([bm25_system(units)], depth=5), units)
    state = session.state()
    assert state["query"]["text"] == "zzxq vvqk" and state["candidates"] == []
    assert state["judged_queries"] == 0 and state["systems"] == ["bm25"]


def test_a_session_resumes_where_the_log_left_off(tmp_path):
    units = stdlib_units()
    pooler = Pooler([bm25_system(units)], depth=2)
    pointed = []
    session = JudgingSession(tmp_path, QUERIES, pooler, units, target=5,
                             on_first_judgment=lambda: pointed.append(True))
    first = session.state()
    assert first["position"] == 0 and first["query"]["text"] == QUERIES[0] and first["target"] == 5
    for candidate in first["candidates"]:
        session.judge(first["query"]["id"], candidate["doc_id"], 1)
    second = session.state(1)
    session.judge(second["query"]["id"], second["candidates"][0]["doc_id"], 0)
    assert pointed == [True]  # once, at the first judgment

    reopened = JudgingSession(tmp_path, QUERIES, pooler, units, target=5)
    state = reopened.state()
    assert state["position"] == 1 and state["judged_queries"] == 2  # the second query is unfinished
    assert [c["label"] for c in state["candidates"]] == [0] + [None] * (len(state["candidates"]) - 1)
    for candidate in state["candidates"][1:]:
        reopened.judge(state["query"]["id"], candidate["doc_id"], 1)

    # A typed query goes after the current one; the file's queries follow the judged ones.
    again = JudgingSession(tmp_path, list(reversed(QUERIES)), pooler, units, target=5)
    assert again.state()["query"]["text"] == QUERIES[-1]  # the first never judged, in the new order
    assert [again.texts[q] for q in again.order[:2]] == QUERIES[:2]
    position = again.add_query("read rows of a CSV file as dictionaries")
    assert position == 3 and again.state()["query"]["text"] == "read rows of a CSV file as dictionaries"
    assert again.add_query("  Copy a directory tree recursively. ") == 0  # a known query: where it is
    with pytest.raises(JudgingError):
        again.judge("h-unknown", "json.dumps", 1)
