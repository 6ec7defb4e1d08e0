"""Planted leaks, through the real training-data assets: an eval query verbatim, the same query with
its case and punctuation changed, and a near-duplicate of an eval document under another id, planted
into each training-data asset's input (the corpus, the LLM's answers, the corpus negatives are mined
from). The filter keeps them out of every published file; with the filter broken, each asset's
blocking `no_eval_leakage` check fails on what was published and training does not run.

The domain: 12 human-judged FAQ questions of ../shared/corpora/web_qa/python_docs with their answer
sections, 50 other titled sections, and the planted documents, as a BEIR folder; synthetic queries
come from a local OpenAI-compatible server that answers with eval questions.
"""

import contextlib
import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from fake_llm import FAKE_KEY, FakeOpenAIServer, serving

from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import leakage
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets, shared_corpus

DOMAIN = "leaky"
TRAINING_DATA = {"heuristic_pairs": ["pairs.parquet"],
                 "synthetic_queries": ["synthetic.parquet", "synthetic_unfiltered.parquet"],
                 "mined_negatives": ["mined.parquet"]}


def _near_copy(text: str) -> str:
    """Every ninth word changed: a char-5-gram near-duplicate (lib.leakage) that clean_corpus's
    word-5-gram MinHash dedupe does not merge."""
    words = text.split()
    return " ".join(w.upper() + "s" if i % 9 == 4 else w for i, w in enumerate(words))


def _build_corpus(folder: Path) -> list[str]:
    source = shared_corpus("web_qa/python_docs")
    corpus = pd.read_json(source / "corpus.jsonl", lines=True, dtype={"_id": str})
    queries = pd.read_json(source / "queries.jsonl", lines=True, dtype={"_id": str})
    qrels = pd.read_csv(source / "qrels" / "dev.tsv", sep="\t", dtype=str)
    by_id = corpus.set_index("_id")
    long_answers = qrels[qrels["corpus-id"].map(lambda d: len(by_id.loc[d, "text"].split()) >= 60)]
    judged = long_answers.head(12)
    questions = dict(zip(queries["_id"], queries["text"], strict=True))
    asked = [questions[q] for q in judged["query-id"]]
    answers = [by_id.loc[d, "text"] for d in judged["corpus-id"]]
    titled = corpus[(corpus["title"].str.split().str.len() >= 3)
                    & ~corpus["_id"].isin(judged["corpus-id"])].sample(50, random_state=0)
    planted = pd.DataFrame([
        # an eval question verbatim as a title (a heading -> section pair with the eval query)
        {"_id": "planted-verbatim", "title": asked[0], "text": _near_copy(answers[0])},
        # the same question with case and punctuation changed
        {"_id": "planted-punctuation", "title": asked[1].upper().rstrip("?") + " !!",
         "text": _near_copy(answers[1])},
        # a near-copy of an eval document under another id and title
        {"_id": "planted-near-copy", "title": " ".join(answers[2].split()[:8]),
         "text": _near_copy(answers[2])},
        *({"_id": f"planted-negative-{i}", "title": f"Appendix {i}", "text": _near_copy(answers[i])}
          for i in range(3, 12)),
    ])
    docs = pd.concat([corpus[corpus["_id"].isin(judged["corpus-id"])], titled, planted])
    folder.mkdir(parents=True)
    docs[["_id", "title", "text"]].to_json(folder / "corpus.jsonl", orient="records", lines=True)
    queries[queries["_id"].isin(judged["query-id"])].to_json(folder / "queries.jsonl", orient="records",
                                                             lines=True)
    (folder / "qrels").mkdir()
    judged.assign(score="1").to_csv(folder / "qrels" / "dev.tsv", sep="\t", index=False)
    return asked


SPEC = """name = "leaky"
remote_llm_allowed = true
[corpus]
format = "beir"
path = "{path}"
[unit]
name = "a documentation section"
max_words = 300
min_words = 5
[queries]
form = "a question a Python user asks"
relevance = "the section answers the question"
hard_negative = "a section on the same topic that does not answer it"
pair_extractor = "title"
[judged]
path = "{path}"
[targets]
ndcg_at_10 = 0.5
p95_latency_ms = 50.0
index_mb = 5.0
usd_per_1k_queries = 0.01
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory, stand_in_llm) -> dict:
    """clean_corpus and eval_set of the leaky domain, materialized once; tests copy the store."""
    root = tmp_path_factory.mktemp("leaky")
    asked = _build_corpus(root / "corpus")
    (root / "domains").mkdir()
    (root / "domains" / f"{DOMAIN}.toml").write_text(SPEC.format(path=root / "corpus"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENCODER_PIPELINE_DOMAINS", str(root / "domains"))
        result = _materialize(root / "store", ["clean_corpus", "eval_set"], llm=stand_in_llm)
    assert result.success
    units = pd.read_parquet(ArtifactStore(root / "store").latest(DOMAIN, "clean_corpus") / "corpus.parquet")
    assert {"planted-verbatim", "planted-punctuation", "planted-near-copy"} <= set(units["doc_id"]), \
        "clean_corpus must leave the planted documents for the training stages to meet"
    return {"root": root, "asked": asked}


def _materialize(store_root: Path, names: list[str], llm: LLMResource) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [DOMAIN])
    return dg.materialize(graph_assets(), selection=names, instance=instance,
                          partition_key=DOMAIN, raise_on_error=False,
                          resources={PUBLISHED: published_artifacts,
                                     "artifacts": ArtifactStoreResource(root=str(store_root)),
                                     "settings": PipelineSettings(profile="tiny"), "llm": llm})


@contextlib.contextmanager
def _leaky_llm(base: dict, store_root: Path):
    """Materialize assets of the leaky domain in a copy of the base store, with an LLM endpoint that
    answers every generation prompt with an eval question (verbatim, or with case and punctuation
    changed) and every judge prompt with "1"."""
    shutil.copytree(base["root"] / "store", store_root)
    asked = base["asked"]
    counter = iter(range(10_000))

    def answer(prompt: str) -> str:
        if "Which passage is most relevant" in prompt:
            return "1"
        n = next(counter)
        question = asked[n % len(asked)]
        return question if n % 2 else question.lower().replace("?", " .")

    server = FakeOpenAIServer()
    server.respond = answer
    llm = LLMResource(backend="openai", base_url=server.base_url, model="fake", api_key=FAKE_KEY)
    with serving(server):
        yield lambda names: _materialize(store_root, names, llm), ArtifactStore(store_root)


@pytest.fixture
def run(base, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(base["root"] / "domains"))
    with _leaky_llm(base, tmp_path / "store") as runner:
        yield runner


@pytest.fixture(scope="module")
def filtered(base, tmp_path_factory):
    """The three training-data assets materialized once, filter on: (result, store)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENCODER_PIPELINE_DOMAINS", str(base["root"] / "domains"))
        with _leaky_llm(base, tmp_path_factory.mktemp("filtered") / "store") as (materialize, store):
            yield materialize(list(TRAINING_DATA)), store


def _checks(result) -> dict[str, bool]:
    return {c.asset_key.to_user_string(): c.passed for c in result.get_asset_check_evaluations()
            if c.check_name == "no_eval_leakage"}


def _metadata(result, asset: str) -> dict:
    event = next(e for e in result.get_asset_materialization_events()
                 if e.asset_key.to_user_string() == asset)
    return {k: v.value for k, v in event.materialization.metadata.items()}


PLANTED = {"planted-verbatim", "planted-punctuation", "planted-near-copy"}


def _eval_split(store: ArtifactStore) -> dict:
    return json.loads((store.latest(DOMAIN, "eval_set") / "eval_set.json").read_text())


def test_the_filter_keeps_the_planted_leaks_out_of_the_heuristic_pairs(filtered):
    result, store = filtered
    assert result.success and _checks(result)["heuristic_pairs"]
    # every planted document left in training gave a pair that was dropped (one the eval split drew
    # as a held-out dev document never reaches training in the first place)
    in_training = PLANTED - set(_eval_split(store)["held_out_doc_ids"])
    assert len(in_training) >= 2
    assert _metadata(result, "heuristic_pairs")["pairs_dropped_eval_overlap"] >= len(in_training)
    pairs = pd.read_parquet(store.latest(DOMAIN, "heuristic_pairs") / "pairs.parquet")
    assert not PLANTED & set(pairs["doc_id"])


def test_the_filter_keeps_the_planted_leaks_out_of_the_synthetic_queries(filtered):
    result, store = filtered
    # every answer is an eval question: whatever the round trip keeps, the unfiltered file had them
    assert _metadata(result, "synthetic_queries")["queries_unfiltered_dropped_eval_overlap"] >= 1
    assert _checks(result)["synthetic_queries"]
    eval_questions = {leakage.normalize(q) for q in _eval_split(store)["eval"]["queries"].values()}
    for name in TRAINING_DATA["synthetic_queries"]:
        written = pd.read_parquet(store.latest(DOMAIN, "synthetic_queries") / name)
        assert not {leakage.normalize(q) for q in written["query"]} & eval_questions, name


def test_the_filter_keeps_the_planted_leaks_out_of_the_mined_negatives(filtered):
    result, _ = filtered
    # the planted near-copies of eval documents are the likeliest negatives of the FAQ-like pairs
    assert _metadata(result, "mined_negatives")["dropped_eval_overlap"] >= 1
    assert _checks(result)["mined_negatives"]  # the audit of the published file found none left


def test_a_broken_filter_is_caught_by_each_assets_blocking_check(run, monkeypatch):
    materialize, _ = run
    monkeypatch.setattr(leakage.LeakFilter, "find",
                        lambda self, rows: leakage.LeakReport(leakage.np.zeros(len(rows), dtype=bool)))
    # one asset at a time: each reads what its upstream published, leaks included
    for asset in TRAINING_DATA:
        result = materialize([asset])
        assert _checks(result) == {asset: False}, asset
        metadata = next(c for c in result.get_asset_check_evaluations()).metadata
        assert metadata["leaking_rows"].value > 0
    # blocking: the rung trained on the leaky pairs does not run after the failed check
    result = materialize(["heuristic_pairs", "encoder_heuristic"])
    assert _checks(result) == {"heuristic_pairs": False}
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"heuristic_pairs"}
