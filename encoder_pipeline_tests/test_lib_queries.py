"""Prompt building and cleaning of real-world-ugly LLM output."""

import pytest

from encoder_pipeline.lib.queries import (
    PromptSpec,
    build_prompts,
    copies_passage,
    dedupe_queries,
    parse_query,
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
    assert rows == build_prompts(spec, [f"d{i}" for i in range(30)], ["def g(): return 1"] * 30, 2, seed=0)
