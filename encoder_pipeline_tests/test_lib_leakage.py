"""The one definition of eval leakage (lib/leakage.py): its filter and its independent audit agree, on
real text from the standard library and the sample corpora."""

import numpy as np
import pandas as pd
import pytest

from encoder_pipeline.lib.formats.python_stdlib import read_python_stdlib
from encoder_pipeline.lib.leakage import (
    NEAR_DUPLICATE_JACCARD,
    EvalTexts,
    LeakFilter,
    _audit_normal_form,
    audit_rows,
    normalize,
)
from encoder_pipeline_tests.conftest import requires_shared_corpora, shared_corpus

# Two real docstring summaries of different stdlib functions that differ by a final period.
CLOSE = "Close the connection"
CLOSE_DOT = "Close the connection."


@pytest.fixture(scope="module")
def stdlib_summaries() -> list[str]:
    return sorted({u["anchor"] for u in read_python_stdlib([]) if u["anchor"]})


def test_the_stdlib_has_summaries_that_differ_by_punctuation_only(stdlib_summaries):
    assert CLOSE in stdlib_summaries and CLOSE_DOT in stdlib_summaries
    assert normalize(CLOSE) == normalize(CLOSE_DOT) == "close the connection"


def test_normalization_keeps_operators_apart_and_both_implementations_agree(stdlib_summaries):
    # In code docstrings "a + b" and "a - b" are different queries: symbols alone are kept.
    assert normalize("Same as a + b.") != normalize("Same as a - b.")
    assert normalize("(negative west of UTC).") == "negative west of utc"
    assert normalize("Ｆｕｌｌ　ｗｉｄｔｈ, Return") == "full width return"
    assert all(normalize(s) == _audit_normal_form(s) for s in stdlib_summaries)


def _rows(queries, positives, negatives=None, doc_ids=None) -> pd.DataFrame:
    rows = pd.DataFrame({"query": queries, "positive": positives})
    if negatives is not None:
        rows["negative_1"] = negatives
    if doc_ids is not None:
        rows["doc_id"] = doc_ids
    return rows


def test_query_leaks_verbatim_by_punctuation_and_as_near_duplicate():
    eval_texts = EvalTexts.of([CLOSE_DOT, "Return the timezone offset as timedelta positive east of UTC"],
                              ["def close(self):\n    self.sock.close()"])
    rows = _rows([CLOSE_DOT, CLOSE, "close THE connection !",
                  "Return the timezone offset as timedelta, positive east of UTC.",  # near: comma
                  "Return the timezone offset as a timedelta positive east of UTC",  # near: a word added
                  "Open the connection"],  # a different query
                 ["x"] * 6)
    found = LeakFilter(eval_texts).find(rows)
    assert found.leaking.tolist() == [True, True, True, True, True, False]
    assert "query ~ eval query" in found.reasons[0]
    assert audit_rows(rows, eval_texts)[0] == 5


def test_documents_leak_in_positive_and_negative_columns_and_by_id():
    web = pd.read_json(shared_corpus("web_qa/python_docs") / "corpus.jsonl", lines=True).head(200)
    eval_doc = web.iloc[10]
    near_copy = eval_doc["text"].replace(" the ", " a ", 1)  # one word changed
    eval_texts = EvalTexts.of(["How do I copy a file?"], [eval_doc["title"] + "\n" + eval_doc["text"],
                                                          eval_doc["text"]], {eval_doc["_id"]})
    others = web.iloc[20:24]["text"].tolist()
    rows = _rows(["q1", "q2", "q3", "q4"], [near_copy, others[0], others[1], others[2]],
                 negatives=[others[3], eval_doc["text"].upper(), others[3], others[3]],
                 doc_ids=["a", "b", eval_doc["_id"], "d"])
    found = LeakFilter(eval_texts).find(rows)
    assert found.leaking.tolist() == [True, True, True, False]
    assert "positive ~ eval document" in found.reasons[0]
    assert "negative_1 ~ eval document" in found.reasons[1]
    assert "is an eval document" in found.reasons[2]
    kept, report = LeakFilter(eval_texts).drop(rows)
    assert list(kept["query"]) == ["q4"] and report.count == 3
    assert audit_rows(rows, eval_texts)[0] == 3


def test_the_threshold_is_where_filter_and_audit_both_turn():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    words = base.split()
    # Replace more and more trailing words: similarity falls through the threshold once.
    variants = [" ".join(words[:len(words) - k] + ["zzzz"] * k) for k in range(len(words))]

    def jaccard(a: str, b: str) -> float:  # the definition, written out once more
        grams = [{t[i:i + 5] for i in range(len(t) - 4)} for t in (a, b)]
        return len(grams[0] & grams[1]) / len(grams[0] | grams[1])

    expected = [jaccard(base, v) >= NEAR_DUPLICATE_JACCARD for v in variants]
    assert expected[0] and not expected[-1] and 1 < sum(expected) < len(variants) - 1
    rows = _rows(variants, ["x"] * len(variants))
    assert LeakFilter(EvalTexts.of([base], [])).find(rows).leaking.tolist() == expected
    assert audit_rows(rows, EvalTexts.of([base], []))[0] == sum(expected)


@requires_shared_corpora
def test_filter_and_audit_agree_on_a_real_corpus_with_templated_documents():
    """GO definitions are templated ("Any process that results in a change in state ..."), so some
    training units are near-duplicates of eval documents: both code paths must find the same ones."""
    folder = shared_corpus("biomedical/gene_ontology")
    corpus = pd.read_json(folder / "corpus.jsonl", lines=True, dtype={"_id": str})
    judged = set(pd.read_csv(folder / "qrels" / "dev.tsv", sep="\t", dtype=str)["corpus-id"])
    held = corpus[corpus["_id"].isin(judged)]
    eval_texts = EvalTexts.of([], (held["title"] + "\n" + held["text"]).tolist() + held["text"].tolist(),
                              judged)
    train = corpus[~corpus["_id"].isin(judged)].sample(1500, random_state=0)
    rows = _rows(train["title"].tolist(), train["text"].tolist())
    found = LeakFilter(eval_texts).find(rows)
    audited, examples = audit_rows(rows, eval_texts)
    assert found.count == audited > 0
    assert examples and all("matches an eval text" in e for e in examples)
    assert np.mean(found.leaking) < 0.1  # templated neighbours, not the whole corpus
