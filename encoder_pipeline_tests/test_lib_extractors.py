"""Every pair extractor on real text: the standard library's code, the Python manual's sections and
the privacy-policy paragraphs of ../shared/corpora."""

import ast
import sysconfig
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from encoder_pipeline.lib.extractors import REGISTRY, ExtractorConfig, get
from encoder_pipeline.lib.extractors.docstring import split_docstring
from encoder_pipeline.lib.extractors.heading import sections
from encoder_pipeline.lib.extractors.structure_free import split_sentences
from encoder_pipeline_tests.conftest import shared_corpus

CONFIG = ExtractorConfig()


def _units(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("title", "anchor"):
        if column not in frame:
            frame[column] = ""
    return frame.assign(parent_id=frame["doc_id"])


def _stdlib_functions(module: str) -> list[dict]:
    """The functions of one stdlib module as a generic code corpus would hold them: docstrings in."""
    path = Path(sysconfig.get_paths()["stdlib"]) / module
    source = path.read_text()
    lines = source.splitlines()
    return [{"doc_id": f"{module}:{node.name}",
             "text": textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))}
            for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)]


def test_the_registry_holds_every_extractor_and_names_them_when_asked_for_another():
    assert set(REGISTRY) == {"title", "docstring", "heading", "inverse_cloze", "cropping"}
    assert {k for k, e in REGISTRY.items() if not e.structural} == {"inverse_cloze", "cropping"}
    with pytest.raises(KeyError, match="known: cropping, docstring, heading, inverse_cloze, title"):
        get("titles")


def test_docstrings_are_parsed_from_code_text_and_stripped_from_the_positive():
    functions = _stdlib_functions("textwrap.py")
    extraction = get("docstring").extract(_units(functions), CONFIG)
    dedent = extraction.pairs.set_index("doc_id").loc["textwrap.py:dedent"]
    assert dedent["query"] == "Remove any common leading whitespace from every line in `text`."
    assert dedent["positive"].startswith("def dedent(text):") and '"""' not in dedent["positive"]
    assert len(extraction.pairs) + sum(extraction.rejected.values()) == len(functions)


def test_a_docstring_only_function_and_code_without_docstring_give_no_pair():
    units = _units([
        {"doc_id": "only", "text": 'def placeholder():\n    """Do nothing yet, on purpose."""'},
        {"doc_id": "bare", "text": "def add(a, b):\n    # add them\n    return a + b"},
    ])
    extraction = get("docstring").extract(units, CONFIG)
    assert extraction.pairs.empty
    assert extraction.rejected == {"that are a docstring alone": 1, "without a docstring or leading comment": 1}


@pytest.mark.parametrize(("code", "summary", "rest"), [
    ("/**\n * Compute the checksum of a buffer.\n * @param buf the bytes\n */\nfunction crc(buf) { return 0; }",
     "Compute the checksum of a buffer.", "function crc(buf) { return 0; }"),
    ("// Parse a date string into a Date.\nfunction parse(s) { return new Date(s); }",
     "Parse a date string into a Date.", "function parse(s) { return new Date(s); }"),
    ("int max(int a, int b)\n/* The larger of two integers. */\n{ return a > b ? a : b; }",
     "The larger of two integers.", "int max(int a, int b)\n{ return a > b ? a : b; }"),
    ("-- Customers who ordered twice.\nSELECT id FROM orders GROUP BY id HAVING count(*) > 1",
     "Customers who ordered twice.", "SELECT id FROM orders GROUP BY id HAVING count(*) > 1"),
])
def test_comment_blocks_of_other_languages(code, summary, rest):
    assert split_docstring(code) == (summary, rest)


def test_the_stdlib_reader_splits_docstrings_through_the_same_function():
    from encoder_pipeline.lib.formats.python_stdlib import read_python_stdlib

    unit = next(u for u in read_python_stdlib([]) if u["doc_id"] == "textwrap:dedent")
    function = next(f for f in _stdlib_functions("textwrap.py") if f["doc_id"] == "textwrap.py:dedent")
    assert (unit["anchor"], unit["text"]) == split_docstring(function["text"])


def test_titles_are_queries_only_when_they_could_be_one():
    body = "Personal information is shared with payment processors to complete your purchase."
    units = _units(
        [{"doc_id": f"fool-{i}", "title": "www.fool.com privacy policy", "text": f"{body} Clause {i}."}
         for i in range(50)]  # a site name over 50 paragraphs
        + [{"doc_id": "same", "title": "Cookies we use", "text": "Cookies we use"},  # title = body
           {"doc_id": "short", "title": "Cookies", "text": body},
           {"doc_id": "a1", "title": "How we share your data", "text": body},
           {"doc_id": "a2", "title": "How we share your data", "text": body + " Also with couriers."}])
    extraction = get("title").extract(units, CONFIG)
    assert sorted(extraction.pairs["doc_id"]) == ["a1", "a2"]  # siblings under one heading: both
    assert extraction.rejected == {"whose title is shared by more than 20 units": 50,
                                   "whose title is its body": 1, "whose title has fewer than 3 words": 1}
    assert "2 pairs from 54 units" in extraction.summary()
    one_word = get("title").extract(units, ExtractorConfig(min_words=1))
    assert "short" in set(one_word.pairs["doc_id"])  # the spec's [queries] min_words is honoured


def test_policy_paragraphs_titled_by_their_website_give_no_title_pairs_but_structure_free_ones():
    corpus = pd.read_json(shared_corpus("legal/privacy_policies") / "corpus.jsonl", lines=True,
                          dtype={"_id": str})
    policies = _units(corpus[corpus["_id"].str.startswith("policy-")].rename(columns={"_id": "doc_id"})
                      .to_dict("records"))
    assert get("title").extract(policies, CONFIG).pairs.empty
    cloze = get("inverse_cloze").extract(policies, CONFIG)
    crops = get("cropping").extract(policies, CONFIG)
    assert len(cloze.pairs) > 100 and len(crops.pairs) > 100
    row = cloze.pairs.iloc[0]
    text = policies.set_index("doc_id").loc[row["doc_id"], "text"]
    assert row["query"] in " ".join(text.split()) and row["query"] not in row["positive"]
    again = get("inverse_cloze").extract(policies, CONFIG)
    assert again.pairs.equals(cloze.pairs)  # the same cut on a re-run
    crop = crops.pairs.iloc[0]
    assert 8 <= len(crop["query"].split()) <= 24 and crop["positive"] in " ".join(
        policies.set_index("doc_id").loc[crop["doc_id"], "text"].split())


def test_one_sentence_passages_give_no_inverse_cloze_pair():
    units = _units([{"doc_id": "one", "text": "The controller shall keep records of processing."},
                    {"doc_id": "two", "text": "Data is kept. It is deleted after a year."}])
    extraction = get("inverse_cloze").extract(units, CONFIG)
    assert extraction.pairs.empty and extraction.rejected["with fewer than 3 sentences"] == 2
    assert split_sentences("Use e.g. this. Then That one. 3 more.") == ["Use e.g. this.", "Then That one.",
                                                                          "3 more."]


def test_headings_inside_a_document_give_heading_to_section_pairs():
    text = ("# Installing the client\nDownload the package for your platform and run the installer "
            "with administrator rights, then restart the machine so the service can start.\n"
            "Troubleshooting a failed start\nWhen the service does not start, open the event log, look "
            "for errors from the client and reinstall it with the repair option selected.\n"
            "A line that ends like a sentence.\nshort body")
    assert [h for h, _ in sections(text)] == ["Installing the client", "Troubleshooting a failed start"]
    extraction = get("heading").extract(_units([{"doc_id": "guide", "text": text},
                                                {"doc_id": "flat", "text": "no headings here at all"}]),
                                        CONFIG)
    assert list(extraction.pairs["query"]) == ["Installing the client", "Troubleshooting a failed start"]
    assert extraction.pairs.iloc[1]["positive"].startswith("When the service does not start")
    assert extraction.rejected["without a heading in their text"] == 1
