"""Positive-aware mining on hand-made scores: a fake teacher maps each text to a chosen unit vector,
so every query-document cosine below is set by the test, and the filter's choices can be checked
exactly rather than statistically."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from encoder_pipeline.lib.negatives import MiningConfig, mine_by_form, mine_negatives

DIM = 32
# document: (cosine to query 1, cosine to query 2); each document also gets its own orthogonal
# direction so that documents are distinct and vectors stay unit length.
DOCS = {
    "pos alpha": (0.80, 0.00),
    "pos beta": (0.00, 0.50),
    "alpha beta gamma": (0.90, 0.10),
    "alpha delta": (0.78, 0.00),
    "alpha beta epsilon": (0.77, 0.48),
    "alpha zeta": (0.75, 0.20),
    "alpha beta eta": (0.60, 0.47),
    "alpha theta": (0.50, 0.30),
    "beta iota": (0.40, 0.60),
    "alpha kappa": (0.30, 0.00),
    "beta lambda": (0.20, 0.20),
}
# "pos beta" as served in a title domain (title + body): the positive of a synthetic row
SERVED_BETA = "Beta\npos beta"
QUERIES = {"alpha query": 0, "beta query": 1}
PAIRS = pd.DataFrame({"query": ["alpha query", "beta query"], "positive": ["pos alpha", "pos beta"]})
# perc_pos 0.95: query 1 drops scores above 0.76, query 2 above 0.475
DROPPED = {"alpha query": {"alpha beta gamma", "alpha delta", "alpha beta epsilon"},
           "beta query": {"alpha beta epsilon", "beta iota"}}


class FakeTeacher:
    """Just enough of a SentenceTransformer for mine_hard_negatives: fixed vectors per text."""

    device = torch.device("cpu")
    model_card_data = SimpleNamespace(base_model="fake-teacher")

    def __init__(self):
        self.vectors = {}
        for text, axis in QUERIES.items():
            self.vectors[text] = np.eye(DIM, dtype=np.float32)[axis]
        for j, (text, (a, b)) in enumerate({**DOCS, SERVED_BETA: (0.0, 0.55)}.items()):
            vector = np.zeros(DIM, dtype=np.float32)
            vector[0], vector[1], vector[2 + j] = a, b, np.sqrt(1 - a * a - b * b)
            self.vectors[text] = vector
        self.encoded_batches = 0

    def get_embedding_dimension(self):
        return DIM

    def encode(self, texts, **kwargs):
        self.encoded_batches += 1
        return np.stack([self.vectors[t] for t in texts])

    encode_query = encode_document = encode

    def similarity_pairwise(self, a, b):
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)


def mine(tmp_path, **config):
    teacher = FakeTeacher()
    config = {"range_max": 20, "seed": 0, **config}
    result = mine_negatives(PAIRS, list(DOCS), teacher, MiningConfig(**config), tmp_path)
    return result, teacher


def negatives(row, n):
    return [row[f"negative_{i}"] for i in range(1, n + 1)]


def test_filter_drops_exactly_the_candidates_above_perc_pos(tmp_path):
    result, _ = mine(tmp_path, num_negatives=3, sampling_strategy="random")
    report = result.report
    assert report.candidates == 2 * (len(DOCS) - 1)  # every other document, for both queries
    assert report.dropped_false_negatives == sum(len(d) for d in DROPPED.values()) == 5
    assert len(result.rows) == 2
    for _, row in result.rows.iterrows():
        assert not set(negatives(row, 3)) & DROPPED[row["query"]]
        assert row["positive"] not in negatives(row, 3)
        for i in range(1, 4):
            assert row[f"score_negative_{i}"] <= 0.95 * row["score_positive"] + 1e-6
    sample = report.dropped_sample
    assert len(sample) == 2  # one (the teacher's top dropped candidate) per query
    assert (sample["candidate_score"] > 0.95 * sample["positive_score"]).all()
    assert set(sample["candidate"]) == {"alpha beta gamma", "beta iota"}


def test_range_min_skips_the_top_survivors_and_top_sampling_takes_the_next(tmp_path):
    result, _ = mine(tmp_path, num_negatives=3, range_min=1, sampling_strategy="top")
    rows = result.rows.set_index("query")
    # query 1's survivors in teacher order: 0.75 (skipped by range_min=1), 0.60, 0.50, 0.40, ...
    assert negatives(rows.loc["alpha query"], 3) == ["alpha beta eta", "alpha theta", "beta iota"]
    assert list(rows.loc["alpha query", ["score_negative_1", "score_negative_2", "score_negative_3"]]) \
        == pytest.approx([0.60, 0.50, 0.40], abs=1e-6)
    # query 2's: 0.47 (skipped), 0.30, 0.20, 0.20 (two documents tie at 0.20)
    assert negatives(rows.loc["beta query"], 3)[0] == "alpha theta"


def test_random_sampling_is_seeded(tmp_path):
    first, _ = mine(tmp_path / "a", num_negatives=3, seed=1)
    again, _ = mine(tmp_path / "b", num_negatives=3, seed=1)
    pd.testing.assert_frame_equal(first.rows, again.rows)


def test_chunks_reuse_the_cached_corpus_embeddings(tmp_path):
    whole, _ = mine(tmp_path / "whole", num_negatives=2, sampling_strategy="top")
    chunked, teacher = mine(tmp_path / "chunked", num_negatives=2, sampling_strategy="top",
                            query_chunk_size=1)
    pd.testing.assert_frame_equal(whole.rows, chunked.rows)
    assert chunked.report.dropped_false_negatives == whole.report.dropped_false_negatives
    # the corpus once, then one batch of queries per chunk: the report re-encodes nothing
    assert teacher.encoded_batches == 1 + 2
    assert len(list((tmp_path / "chunked").glob("corpus_embeddings_*.npy"))) == 1


def test_sibling_positives_of_a_repeated_query_are_never_its_negatives(tmp_path):
    # "alpha delta" is a second paragraph under the same heading as "pos alpha"; "beta query" sits
    # between them so that chunking by rows would split the heading's two pairs apart.
    siblings = pd.DataFrame({"query": ["alpha query", "beta query", "alpha query"],
                             "positive": ["pos alpha", "pos beta", "alpha delta"]})
    result = mine_negatives(siblings, list(DOCS), FakeTeacher(),
                            MiningConfig(range_max=20, num_negatives=3, sampling_strategy="top",
                                         perc_pos=1.0, query_chunk_size=1), tmp_path)
    alpha_rows = result.rows[result.rows["query"] == "alpha query"]
    assert len(alpha_rows) == 2
    for _, row in alpha_rows.iterrows():
        assert not {"pos alpha", "alpha delta"} & set(negatives(row, 3))


def test_bm25_negatives_pass_the_same_filter(tmp_path):
    result, _ = mine(tmp_path, num_negatives=3, bm25_negatives=1, sampling_strategy="top")
    assert [c for c in result.rows.columns if c.startswith("negative_")] == \
        ["negative_1", "negative_2", "negative_3"]
    assert result.report.bm25_negatives_per_row == 1
    for _, row in result.rows.iterrows():
        texts = negatives(row, 3)
        assert len(set(texts)) == 3 and row["positive"] not in texts
        assert not set(texts) & DROPPED[row["query"]]
        assert row["score_negative_3"] <= 0.95 * row["score_positive"] + 1e-6
        # BM25 needs a shared word: the query's own term
        assert row["query"].split()[0] in row["negative_3"]


def test_bm25_share_must_leave_a_teacher_negative():
    with pytest.raises(ValueError, match="bm25_negatives"):
        MiningConfig(num_negatives=2, bm25_negatives=2)


def test_each_row_is_mined_from_units_in_its_positive_form(tmp_path):
    # A title domain: the title -> body row's positive is a body, the synthetic row's is the unit as
    # served. Mined from bodies, the synthetic row would get its own unit's body ("pos beta": 0.50,
    # under 95% of its positive's 0.55) as a hard negative.
    bodies = list(DOCS)
    served = [SERVED_BETA if text == "pos beta" else text for text in bodies]
    structural = PAIRS.iloc[:1]
    synthetic = pd.DataFrame({"query": ["beta query"], "positive": [SERVED_BETA]})
    config = MiningConfig(range_max=20, num_negatives=3, sampling_strategy="top", seed=0)
    one_corpus = mine_negatives(pd.concat([structural, synthetic]), bodies, FakeTeacher(), config, tmp_path / "one")
    assert negatives(one_corpus.rows.set_index("query").loc["beta query"], 3)[0] == "pos beta"

    result = mine_by_form([(structural, bodies), (synthetic, served)], FakeTeacher(), config, tmp_path / "forms")
    rows = result.rows.set_index("query")
    assert "pos beta" not in negatives(rows.loc["beta query"], 3)
    assert negatives(rows.loc["alpha query"], 3) == negatives(
        mine_negatives(structural, bodies, FakeTeacher(), config, tmp_path / "alone").rows.iloc[0], 3)
    report = result.report
    assert (report.pairs_in, report.rows_out) == (2, 2)
    assert report.candidates == 2 * (len(DOCS) - 1)  # each query against the other units of its corpus
    # groups sharing a corpus are mined together, as one call
    together = mine_by_form([(structural, bodies), (PAIRS.iloc[1:], bodies)], FakeTeacher(), config, tmp_path / "same")
    pd.testing.assert_frame_equal(together.rows, mine_negatives(PAIRS, bodies, FakeTeacher(), config,
                                                                tmp_path / "plain").rows)
