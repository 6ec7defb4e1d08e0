"""Prompt building and cleaning of real-world-ugly LLM output."""

import os

import pytest

from encoder_pipeline.lib.queries import (
    PromptSpec,
    RelabelConfig,
    build_prompts,
    copies_passage,
    dedupe_queries,
    judge_prompt,
    parse_choice,
    parse_query,
    relabel,
)

PASSAGE = ("def parse_date(text):\n    year, month, day = text.split('-')\n"
           "    return date(int(year), int(month), int(day)) if the string is an ISO formatted date")
EXAMPLES = ["Return the averages of each run of window consecutive values."]


@pytest.mark.parametrize("raw, expected", [
    (" Parse an ISO date string into a date object.\nPassage: def other", "Parse an ISO date string into a date object."),
    ("1. convert a yyyy-mm-dd string to a date", "convert a yyyy-mm-dd string to a date"),
    ('"How do I turn a string into a date?"', "How do I turn a string into a date?"),
    ("\n\n  - parse a date from text  \n", "parse a date from text"),
    ("Query: split a date string into parts", "split a date string into parts"),
    ("Q1: read a calendar date from a string", "read a calendar date from a string"),
    ("q2 - parse a date string", "parse a date string"),
    ("A) turn an ISO string into a date", "turn an ISO string into a date"),
    ("(iv) which function parses dates", "which function parses dates"),
    ("a. Explain how dates are parsed", "Explain how dates are parsed"),
    ("E. coli date parser for lab logs", "E. coli date parser for lab logs"),  # not an item letter
    ("Aside: how are dates parsed", "Aside: how are dates parsed"),
])
def test_parse_cleans_numbering_quotes_and_trailing_text(raw, expected):
    assert parse_query(raw, PASSAGE, EXAMPLES) == expected


@pytest.mark.parametrize("raw", [
    "",
    "   \n  \n",
    "date",  # too short
    "Return the averages of each run of window consecutive values.",  # a copy of the prompt's example
    "year, month, day = text.split('-') return date(int(year), int(month), int(day))",  # copies code
    " ".join(["word"] * 60),  # endless output
])
def test_parse_rejects_unusable_output(raw):
    assert parse_query(raw, PASSAGE, EXAMPLES) is None


def test_min_words_lets_one_word_names_through():
    # a gene or enzyme name is one word; by default such a line is a fragment, not a query
    assert parse_query("urease", "urea amidohydrolase activity", []) is None
    assert parse_query("urease", "urea amidohydrolase activity", [], min_words=1) == "urease"
    assert parse_query("1. ornithine cycle", "urea cycle", [], min_words=1) == "ornithine cycle"


def test_copies_passage_needs_a_long_verbatim_span():
    assert copies_passage("if the string is an ISO formatted date please", PASSAGE)
    assert not copies_passage("is the string an ISO date", PASSAGE)


def test_dedupe_is_case_and_space_insensitive():
    assert dedupe_queries(["Parse a date", "parse  a DATE", None, "other query"]) == [True, False, False, True]


def test_prompts_carry_the_spec_and_vary_in_style():
    spec = PromptSpec(form="a description of what a function does",
                      relevance="the function implements it", examples=(("def f(): pass", "do nothing"),))
    rows = build_prompts(spec, [f"d{i}" for i in range(30)], ["def g(): return 1"] * 30, 2, seed=0)
    assert len(rows) == 60
    assert all(r["prompt"].endswith("Query:") and spec.form in r["prompt"] for r in rows)
    assert "Passage: def f(): pass\nQuery: do nothing" in rows[0]["prompt"]
    assert len({r["style"] for r in rows}) > 1
    # instructions and examples first, the document's style and passage last: a shared prefix
    for r in rows:
        assert r["prompt"].index(r["style"]) > r["prompt"].index("Query: do nothing")
    assert "Query: do nothing" in os.path.commonprefix([r["prompt"] for r in rows])
    assert rows == build_prompts(spec, [f"d{i}" for i in range(30)], ["def g(): return 1"] * 30, 2, seed=0)


def test_relabel_and_round_trip_rules():
    config = RelabelConfig(top_k=3, margin=0.05)
    hits = [
        [("seed", 0.9), ("b", 0.5), ("c", 0.4)],   # seed wins: kept
        [("b", 0.92), ("seed", 0.8), ("c", 0.4)],  # a neighbour clearly better: relabeled
        [("b", 0.82), ("seed", 0.8), ("c", 0.4)],  # within the margin: the seed is kept
        [("b", 0.9), ("c", 0.8), ("d", 0.7), ("seed", 0.6)],  # seed outside the top-3: dropped
    ]
    positives, outcomes = relabel(hits, ["seed"] * 4, config)
    assert outcomes == ["kept", "relabeled", "kept", "dropped_round_trip"]
    assert positives == ["seed", "b", "seed", None]


def test_round_trip_on_real_code(stdlib_units, base_model):
    """Real docstring summaries find their function; summaries attached to the wrong function don't."""
    from encoder_pipeline.lib import encoders
    from encoder_pipeline.lib.extractors import ExtractorConfig
    from encoder_pipeline.lib.pairs import extract_training_pairs, top_k_ids

    pairs = extract_training_pairs(stdlib_units, ["docstring"], ExtractorConfig()).pairs.head(40)
    corpus = encoders.encode(base_model, list(stdlib_units["title"] + "\n" + stdlib_units["text"]))
    hits = top_k_ids(encoders.encode(base_model, list(pairs["query"])), corpus,
                     list(stdlib_units["doc_id"]), 10)
    _, right = relabel(hits, list(pairs["doc_id"]), RelabelConfig(top_k=10))
    _, wrong = relabel(hits, list(pairs["doc_id"].iloc[::-1]), RelabelConfig(top_k=10))
    assert right.count("dropped_round_trip") < len(pairs) / 2
    assert wrong.count("dropped_round_trip") > len(pairs) * 0.8


def test_generation_runs_as_a_daft_udf_through_the_cache(tmp_path):
    """The Daft batch UDF sends each prompt once; a second pass is served from the disk cache."""
    from encoder_pipeline.lib.llm import Completion, GenerationParams
    from encoder_pipeline.lib.queries import generate_frame

    class EchoBackend:  # the real backends are exercised in test_lib_llm.py
        name, model = "echo", "echo-1"
        prompts_per_call, streams_completions = 8, False

        def generate(self, prompts, params, on_complete=None):
            return [Completion(f"query for {p}", 5, 3) for p in prompts]

        def explain(self, error):
            return None

    prompts = [{"doc_id": f"d{i}", "prompt": f"passage {i}"} for i in range(150)]
    seen: list[tuple[int, int]] = []
    first = generate_frame(prompts, EchoBackend, str(tmp_path), GenerationParams(),
                           progress=lambda done, total: seen.append((done, total)))
    assert list(first["text"]) == [f"query for passage {i}" for i in range(150)]
    # progress as the answers come back (the UDF's batches hold 64 prompts), ending at all of them
    assert len(seen) >= 2 and seen[-1] == (150, 150)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert not first["cached"].any() and first["completion_tokens"].sum() == 450
    second = generate_frame(prompts, EchoBackend, str(tmp_path), GenerationParams())
    assert second["cached"].all()
    assert len(list(tmp_path.glob("*.json"))) == 150


def test_an_llm_judge_overrides_the_margin_rule():
    hits = [[("b", 0.82), ("seed", 0.8), ("c", 0.4)], [("b", 0.95), ("seed", 0.8)], [("seed", 0.9)]]
    positives, outcomes = relabel(hits, ["seed"] * 3, RelabelConfig(top_k=3), choices=[0, 1, None])
    assert positives == ["b", "seed", "seed"] and outcomes == ["relabeled", "kept", "kept"]


@pytest.mark.parametrize("answer, expected", [
    ("2", 1), ("[3]", 2), ("The most relevant passage is 1.", 0), ("9", None), ("none of them", None), (None, None),
])
def test_judge_answers_are_parsed(answer, expected):
    assert parse_choice(answer, 4) == expected


def test_judge_prompt_lists_candidates():
    prompt = judge_prompt("parse a date", ["def parse(s): ...", "def fmt(d): ..."], "it does that")
    assert "[1] def parse(s): ..." in prompt and "[2] def fmt(d): ..." in prompt
    assert prompt.endswith("Answer with its number only.")
