"""A small domain store for the judging tests: a clean_corpus of real standard-library docstrings
(some documents chunked into two units) and an eval_set, published as the pipeline publishes them,
in seconds (no Daft, no training)."""

import bisect
import calendar
import csv
import heapq
import inspect
import json
import shutil
import statistics
import textwrap
from pathlib import Path

import pandas as pd

from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
from encoder_pipeline.lib.heldout import EvalSplit, QuerySet
from encoder_pipeline.lib.layout import CLEAN_CORPUS, CORPUS_FILE, EVAL_FILE, EVAL_SET, write_eval_split

MODULES = (bisect, calendar, csv, heapq, json, shutil, statistics, textwrap)
CHUNK_WORDS = 60  # a docstring longer than this is two units of one document
QUERIES = [
    "copy a directory tree recursively",
    "wrap a paragraph of text to a given width",
    "is a year a leap year",
    "serialize an object to a JSON formatted string",
    "median of a list of numbers",
    "find the n largest elements of a dataset",
    "insert an item into a sorted list keeping it sorted",
    "remove common leading whitespace from lines",
]
EVAL_QUERIES = {"q-leap": "how many leap years between two years", "q-mean": "arithmetic mean of data"}
DEV_QUERIES = {"dev-move": "move a file or directory to another location"}


def stdlib_units() -> pd.DataFrame:
    """Public functions of MODULES with a docstring: doc_id, parent_id, title, text, anchor, in_sample."""
    rows = []
    for module in MODULES:
        for name, function in sorted(vars(module).items()):
            doc = inspect.getdoc(function) if inspect.isfunction(function) else None
            if name.startswith("_") or not doc or function.__module__ != module.__name__:
                continue
            parent, words = f"{module.__name__}.{name}", doc.split()
            parts = ([" ".join(words[:CHUNK_WORDS]), " ".join(words[CHUNK_WORDS:])]
                     if len(words) > CHUNK_WORDS else [doc])
            for number, part in enumerate(parts):
                rows.append({"doc_id": parent if len(parts) == 1 else f"{parent}#{number}",
                             "parent_id": parent, "title": parent, "text": part, "anchor": "",
                             "in_sample": True})
    return pd.DataFrame(rows)


def tiny_store(root: Path, domain: str) -> ArtifactStore:
    """`root` as an artifact root holding the domain's clean_corpus and eval_set."""
    store = ArtifactStore(root)
    with store.publish(Manifest(domain, CLEAN_CORPUS, "v1", 0, {})) as staging:
        stdlib_units().to_parquet(staging / CORPUS_FILE)
    split = EvalSplit(QuerySet(EVAL_QUERIES, {"q-leap": {"calendar.leapdays": 1},
                                              "q-mean": {"statistics.mean": 1}}, "structural"),
                      QuerySet(DEV_QUERIES, {"dev-move": {"shutil.move": 1}}, "structural"), set())
    with store.publish(Manifest(domain, EVAL_SET, "v1", 0, {})) as staging:
        write_eval_split(staging / EVAL_FILE, split)
    return store


def write_domain_spec(directory: Path, domain: str) -> Path:
    """The built-in `code` spec under another name (a real spec, with multi-line strings), the base
    model as its teacher (suite time: no second model to assemble and run)."""
    spec = (Path(__file__).resolve().parents[1] / "data" / "domains" / "code.toml").read_text()
    path = directory / f"{domain}.toml"
    path.write_text(spec.replace('name = "code"', f'name = "{domain}"')
                    + f'\n[training]\nteacher_model = "{DEFAULT_BASE_MODEL}"\n')
    return path


def write_queries(path: Path, queries: list[str] = QUERIES) -> Path:
    path.write_text("\n".join(queries) + "\n")
    return path

