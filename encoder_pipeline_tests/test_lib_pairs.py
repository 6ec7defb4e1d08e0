"""Eval split, structural pairs and the consistency filter on the real `code` corpus."""

import numpy as np
import pandas as pd

from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.pairs import extract_pairs, held_out_split, rank_of_positive, split_dev


def test_held_out_split_is_disjoint_from_training_pairs(stdlib_units):
    split = held_out_split(stdlib_units, "docstring", 20, seed=0)
    assert len(split.queries) == 20 and not split.human_judged
    assert all(len(rels) == 1 for rels in split.qrels.values())
    pairs = extract_pairs(stdlib_units, "docstring", split.eval_doc_ids)
    assert len(pairs) > 50
    assert not set(pairs["doc_id"]) & split.eval_doc_ids
    assert held_out_split(stdlib_units, "docstring", 20, seed=0).queries == split.queries
    assert held_out_split(stdlib_units, "docstring", 20, seed=1).queries != split.queries


def test_docstring_pairs_pair_summary_with_code(stdlib_units):
    pairs = extract_pairs(stdlib_units, "docstring", set())
    row = pairs.iloc[0]
    unit = stdlib_units.set_index("doc_id").loc[row["doc_id"]]
    assert row["query"] == unit["anchor"]
    assert row["positive"] == f"{unit['title']}\n{unit['text']}"
    assert row["query"] not in row["positive"]


def test_consistency_filter_keeps_findable_pairs(stdlib_units, base_model):
    pairs = extract_pairs(stdlib_units, "docstring", set()).head(60)
    corpus = list(stdlib_units["title"] + "\n" + stdlib_units["text"])
    corpus_vectors = encoders.encode(base_model, corpus)
    queries = encoders.encode(base_model, list(pairs["query"]))
    ranks = rank_of_positive(queries, list(pairs["doc_id"]), corpus_vectors, list(stdlib_units["doc_id"]), 10)
    assert 0.3 < np.mean(ranks > 0) < 1.0, "the base model finds many but not all positives"
    shuffled = rank_of_positive(queries, list(pairs["doc_id"].sample(frac=1, random_state=1)),
                                corpus_vectors, list(stdlib_units["doc_id"]), 10)
    assert np.mean(shuffled > 0) < np.mean(ranks > 0) / 2


def test_dev_slice_is_carved_by_document(stdlib_units):
    pairs = extract_pairs(stdlib_units, "docstring", set())
    train, dev = split_dev(pairs, 0.1, 100, seed=0)
    assert len(dev) > 0 and len(train) + len(dev) == len(pairs)
    assert not set(train["doc_id"]) & set(dev["doc_id"])


def test_sibling_paragraphs_under_one_heading_are_judged_together():
    units = pd.DataFrame({
        "doc_id": ["a1", "a2", "b1", "c1"], "parent_id": ["a1", "a2", "b1", "c1"],
        "title": ["Article 17 right to erasure", "Article 17 right to erasure",
                  "Article 20 data portability", "Article 21 right to object"],
        "text": ["p. 1 erase", "p. 2 exceptions", "p. 1 port", "p. 1 object"], "anchor": ""})
    split = held_out_split(units, "title", num_queries=3, seed=0, max_fraction=1.0)
    assert len(split.queries) == 3
    erasure = next(q for q, text in split.queries.items() if "erasure" in text)
    assert split.qrels[erasure] == {"a1": 1, "a2": 1}
    assert split.eval_doc_ids == {"a1", "a2", "b1", "c1"}
    assert extract_pairs(units, "title", split.eval_doc_ids).empty


def test_held_out_queries_leave_most_structure_for_training():
    units = pd.DataFrame({"doc_id": [f"d{i}" for i in range(20)], "parent_id": [f"d{i}" for i in range(20)],
                          "title": [f"Article {i} on topic number {i}" for i in range(20)],
                          "text": "body", "anchor": ""})
    split = held_out_split(units, "title", num_queries=300, seed=0)
    assert len(split.queries) == 6  # 30% of 20 distinct headings, however many were asked for


def test_queries_that_normalize_alike_are_one_eval_query_with_all_their_documents():
    """Two stdlib functions whose summaries differ by a final period: one eval query, both held out,
    neither left to train on."""
    from encoder_pipeline.lib.sources import read_python_stdlib

    units = pd.DataFrame([u for u in read_python_stdlib([])
                          if u["anchor"] in ("Close the connection", "Close the connection.")])
    assert len(units) >= 2
    units["parent_id"] = units["doc_id"]
    split = held_out_split(units, "docstring", num_queries=5, seed=0, max_fraction=1.0)
    assert len(split.queries) == 1
    [relevant] = split.qrels.values()
    assert set(relevant) == set(units["doc_id"]) == split.eval_doc_ids
    assert extract_pairs(units, "docstring", split.eval_doc_ids).empty
