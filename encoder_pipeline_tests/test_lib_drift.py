"""lib.drift's measurement without Dagster: the drift of a changing corpus against its training and
indexed snapshots, and the canary over a real flat index with the packaged encoder."""

import daft
import numpy as np
import pandas as pd
import pytest

from encoder_pipeline.lib.drift import (
    CANARY_MAX_DOCUMENTS,
    CorpusDiff,
    Drift,
    ServedCanary,
    Snapshot,
    corpus_snapshot,
    diff_snapshots,
    fill_canary,
    measure_drift,
)
from encoder_pipeline.lib.encoders import document_texts, encode
from encoder_pipeline.lib.index import LoadedIndex, build_index

TOPICS = ["sorting a list in place", "opening a file for reading", "parsing a date string",
          "joining paths on any system", "reading environment variables", "spawning a subprocess"]


def corpus(rows: list[tuple[str, str]]) -> daft.DataFrame:
    return daft.from_pandas(pd.DataFrame({"doc_id": [d for d, _ in rows], "title": [""] * len(rows),
                                          "text": [t for _, t in rows]}))


def snapshot(rows: list[tuple[str, str]]) -> Snapshot:
    raw = corpus(rows)
    return Snapshot(corpus_snapshot(raw), frozenset(t for _, text in rows for t in text.lower().split()))


BEFORE = [(f"d{i}", f"How to do {topic} in Python, with an example.") for i, topic in enumerate(TOPICS)]


def test_drift_counts_the_changes_and_reads_only_the_changed_texts():
    now = [*BEFORE[1:4], ("d4", "Quaternion slerp interpolation for gimbal-free rotations."),
           *BEFORE[5:], ("d9", "Kubernetes operators reconcile custom resources.")]
    canaries = []
    drift = measure_drift(corpus(now), corpus_snapshot(corpus(now)), snapshot(BEFORE), snapshot(BEFORE),
                          lambda d, changes, texts: canaries.append((changes, set(texts["doc_id"]))))
    assert (drift.added, drift.changed, drift.removed) == (1, 1, 1)
    assert drift.changed_fraction == pytest.approx(3 / len(BEFORE))
    assert drift.new_token_share > 0 and {"quaternion", "kubernetes"} <= {t for t, _ in drift.new_terms}
    (changes, read), = canaries  # changes since the index was built, texts of new or changed only
    assert sorted(changes.new_or_changed) == ["d4", "d9"] and read == {"d4", "d9"}


def test_without_a_training_or_index_snapshot_nothing_is_compared():
    current = corpus_snapshot(corpus(BEFORE))
    untrained = measure_drift(corpus(BEFORE), current, None, None, lambda *_: pytest.fail("no canary"))
    assert untrained.training_fingerprint is None and untrained.documents == len(BEFORE)
    unserved = measure_drift(corpus(BEFORE), current, snapshot(BEFORE), None, lambda *_: pytest.fail("no canary"))
    assert unserved.training_fingerprint == unserved.fingerprint
    assert unserved.canary_note == "no served index with a corpus snapshot"


@pytest.mark.parametrize("changes, served, note", [
    (CorpusDiff([], [], [], 6), None, "covers the corpus as it is"),
    (CorpusDiff([f"n{i}" for i in range(CANARY_MAX_DOCUMENTS + 1)], [], [], 6), None, "canary skipped"),
    (CorpusDiff(["n1"], [], [], 6), FileNotFoundError("index v3 is gone"), "canary skipped: index v3 is gone"),
])
def test_the_canary_says_why_it_did_not_run(changes, served, note):
    def load():
        raise served
    drift = Drift("f", 6)
    fill_canary(drift, changes, pd.DataFrame(columns=["doc_id", "title", "text"]), load,
                lambda *_: pytest.fail("nothing to clean"))
    assert note in drift.canary_note and drift.canary_drop is None


def test_the_canary_measures_the_served_index_with_the_changes_applied(base_model):
    """Removing the judged documents drops Recall@10 to 0; the new documents are embedded and added."""
    units = pd.DataFrame({"doc_id": [d for d, _ in BEFORE], "parent_id": [d for d, _ in BEFORE],
                          "title": [""] * len(BEFORE), "text": [t for _, t in BEFORE]})
    vectors = encode(base_model, document_texts(units["title"], units["text"]))
    index = LoadedIndex(build_index(vectors, "flat"), list(units["doc_id"]), list(units["parent_id"]),
                        list(units["title"]), {})
    queries, qrels = {"q1": "sort a list", "q2": "open a file"}, {"q1": {"d0": 1}, "q2": {"d1": 1}}
    before, now = snapshot(BEFORE), [*BEFORE[2:], ("d7", "Reading a CSV file row by row.")]
    cleaned = []

    def clean(documents, judged):
        cleaned.append(set(documents["doc_id"]))
        return documents.assign(parent_id=documents["doc_id"])[["doc_id", "parent_id", "title", "text"]]

    drift = Drift("f", len(now))
    changes = diff_snapshots(before.documents, corpus_snapshot(corpus(now)))
    fill_canary(drift, changes, corpus(now).to_pandas(),
                lambda: ServedCanary(index, lambda batch: encode(base_model, batch), queries, qrels), clean)
    assert drift.canary_recall_before == 1.0 and drift.canary_recall_after == 0.0
    assert cleaned == [{"d7"}] and "d7" in index.ids and not {"d0", "d1"} & set(index.ids)
    assert np.isclose(drift.canary_drop, 1.0)
