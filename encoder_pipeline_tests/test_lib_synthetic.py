"""The synthetic-query recipe (lib/synthetic.py) without Dagster, on real standard-library functions
with the packaged MiniLM; the LLM is a function that answers each prompt from its passage, so what
the recipe does with an answer is known: a query about its own function survives the round trip, a
query about nothing is dropped, an eval query is filtered out, a judge's pick relabels."""

import re

import pandas as pd

from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.heldout import EvalSplit, QuerySet
from encoder_pipeline.lib.leakage import LeakFilter
from encoder_pipeline.lib.pairs import eval_texts
from encoder_pipeline.lib.queries import GENERIC_EXAMPLES, PromptSpec, RelabelConfig
from encoder_pipeline.lib.synthetic import TrainingCorpus, synthesize

EVAL_QUESTION = "how do I read a configuration file"


def _corpus(units: pd.DataFrame, base_model, held_out: str, extractors=("docstring",)) -> TrainingCorpus:
    split = EvalSplit(QuerySet({"q1": EVAL_QUESTION}, {"q1": {held_out: 1}}, "human"),
                      QuerySet({}, {}, "human"), {held_out}, list(extractors))
    return TrainingCorpus(units, split, lambda texts: encoders.encode(base_model, texts),
                          lambda queries: encoders.encode(base_model, queries))


def _answers(passage_of_prompt) -> callable:
    """A stand-in LLM: one answer per prompt, chosen from the passage the prompt ends with."""
    def generate(prompts: list[dict]) -> pd.DataFrame:
        rows = pd.DataFrame(prompts)
        rows["text"] = [passage_of_prompt(re.findall(r"Passage: (.*?)\nQuery:", p["prompt"], re.DOTALL)[-1])
                        for p in prompts]
        return rows.assign(prompt_tokens=10, completion_tokens=5, cached=False)
    return generate


def test_round_trip_relabel_and_leakage_on_real_functions(stdlib_units, base_model):
    units = stdlib_units.head(120).reset_index(drop=True)
    held_out = units["parent_id"].iloc[0]
    corpus = _corpus(units, base_model, held_out)
    assert held_out not in set(corpus.units["parent_id"]) and len(corpus.units) == len(units) - (
        units["parent_id"] == held_out).sum()
    sample = corpus.units.head(12)
    titles = list(sample["title"])

    def answer(passage: str) -> str:  # the passage shown starts with its function's title
        title = max((t for t in titles if passage.startswith(t)), key=len)
        number = titles.index(title)
        if number == 0:
            return EVAL_QUESTION  # an eval question: filtered out of every training file
        if number == 1:
            return "weather forecast for tomorrow in a mountain village"  # about nothing here
        return f"what does {title.rsplit('.', 1)[-1].replace('_', ' ')} in {title.split('.')[0]} do"

    prompt_spec = PromptSpec("a question a programmer asks", "the function does what it asks", GENERIC_EXAMPLES[:2])
    leaks = LeakFilter(eval_texts(corpus.eval, units))
    result = synthesize(corpus, sample, prompt_spec, _answers(answer), queries_per_document=1,
                        relabel_config=RelabelConfig(top_k=10), min_words=3, seed=0, leaks=leaks)
    counts = result.counts
    assert counts["prompts"] == counts["completions"] == 12
    # the eval question is filtered out of the unfiltered file (and out of the training rows, unless
    # the round trip dropped it first)
    assert counts["unfiltered_dropped_eval_overlap"] == 1 and counts["dropped_eval_overlap"] <= 1
    assert EVAL_QUESTION not in set(result.synthetic["query"]) | set(result.unfiltered["query"])
    assert "weather forecast for tomorrow in a mountain village" not in set(result.synthetic["query"])
    assert counts["dropped_round_trip"] >= 1 and counts["kept"] == len(result.synthetic) >= 6
    # every kept row trains on its (possibly relabeled) positive's own text, never a held-out one
    positive_of = dict(zip(corpus.units["doc_id"], corpus.texts(), strict=True))
    assert (result.synthetic["positive"] == result.synthetic["doc_id"].map(positive_of)).all()
    assert not set(result.synthetic["doc_id"]) & set(units["doc_id"][units["parent_id"] == held_out])

    # an LLM judge's pick (here: always the second candidate) relabels the positive it names
    judged = synthesize(corpus, sample, prompt_spec, _answers(answer), queries_per_document=1,
                        relabel_config=RelabelConfig(top_k=10), min_words=3, seed=0, leaks=leaks,
                        judge=lambda prompts: pd.DataFrame({"text": ["2"] * len(prompts)}))
    hits = corpus.search(list(judged.synthetic["query"]), 10)
    relabeled = judged.synthetic["outcome"] == "relabeled"
    assert relabeled.any()
    assert all(row["doc_id"] == hit[1][0] for (_, row), hit, r in
               zip(judged.synthetic.iterrows(), hits, relabeled, strict=True) if r)


def test_synthetic_rows_train_on_the_unit_as_served_where_titles_are_queries(stdlib_units, base_model):
    # Title -> body rows train on the body alone (a title in the positive would answer its own
    # query); a synthetic query was written from title and text and trains on both, as served.
    units = stdlib_units.head(40).reset_index(drop=True)
    corpus = _corpus(units, base_model, units["parent_id"].iloc[0], extractors=["title"])
    assert corpus.structural_positives() == list(corpus.units["text"])

    def answer(passage: str) -> str:
        title = passage.split("\n", 1)[0]
        return f"what does {title.rsplit('.', 1)[-1].replace('_', ' ')} in {title.split('.')[0]} do"

    result = synthesize(corpus, corpus.units.head(10), PromptSpec("a question", "it answers", GENERIC_EXAMPLES[:2]),
                        _answers(answer), queries_per_document=1, relabel_config=RelabelConfig(top_k=10),
                        min_words=3, seed=0, leaks=LeakFilter(eval_texts(corpus.eval, units)))
    served = dict(zip(corpus.ids, document_texts(corpus.units["title"], corpus.units["text"]), strict=True))
    assert len(result.synthetic) >= 5
    assert (result.synthetic["positive"] == result.synthetic["doc_id"].map(served)).all()
    assert not result.synthetic["positive"].isin(corpus.units["text"]).any()
