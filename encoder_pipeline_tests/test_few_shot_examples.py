"""The built-in specs' few-shot examples are clean: no example passage or query is, or is close to, a
judged document or a judged query of any judged set in ../shared/corpora (by lib.leakage's
normalized text and near-duplicate definition, and by MiniLM cosine >= 0.9). The prompt's examples
reach every synthetic query, so an example taken from an eval set would teach the eval answers."""

import pandas as pd
import pytest

from encoder_pipeline.domains import load_domain
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.leakage import EvalTexts, LeakFilter
from encoder_pipeline_tests.conftest import SHARED_CORPORA, requires_shared_corpora

BUILT_INS = ["code", "web_qa", "biomedical", "legal"]
MAX_COSINE = 0.9


def _judged_sets() -> list[tuple[list[str], list[str]]]:
    """(queries, documents) of every judged set beside the repository."""
    sets = []
    for qrels_file in sorted(SHARED_CORPORA.glob("*/*/qrels/*.tsv")):
        folder = qrels_file.parent.parent
        qrels = pd.read_csv(qrels_file, sep="\t", dtype=str)
        queries = pd.read_json(folder / "queries.jsonl", lines=True, dtype={"_id": str})
        corpus = pd.read_json(folder / "corpus.jsonl", lines=True, dtype={"_id": str})
        judged = corpus[corpus["_id"].isin(set(qrels["corpus-id"]))]
        sets.append((queries[queries["_id"].isin(set(qrels["query-id"]))]["text"].tolist(),
                     [f"{t}\n{x}" if t else x for t, x in zip(judged["title"], judged["text"], strict=True)]))
    return sets


@pytest.fixture(scope="module")
def judged(base_model):
    """Every judged query and document, their leak filter, and their MiniLM vectors (encoded once)."""
    sets = _judged_sets()
    assert len(sets) >= 2, "web_qa and biomedical carry judged sets"
    queries, documents = [q for qs, _ in sets for q in qs], [d for _, ds in sets for d in ds]
    return LeakFilter(EvalTexts.of(queries, documents)), encoders.encode(base_model, queries + documents)


@requires_shared_corpora
@pytest.mark.parametrize("name", BUILT_INS)
def test_examples_are_neither_judged_texts_nor_near_them(name, judged, base_model):
    examples = load_domain(name).queries.examples
    assert len(examples) >= 2, f"{name} prompts few-shot"
    matches, judged_vectors = judged
    texts = [e.passage for e in examples] + [e.query for e in examples]
    copied = [t for t in texts if matches.match(t, "query") or matches.match(t, "document")]
    assert not copied, f"{name}: examples equal to or near-duplicates of judged texts: {copied}"
    vectors = encoders.encode(base_model, texts)
    closest = (vectors @ judged_vectors.T).max(axis=1)
    near = [(t[:60], round(float(c), 3)) for t, c in zip(texts, closest, strict=True) if c >= MAX_COSINE]
    assert not near, f"{name}: examples within cosine {MAX_COSINE} of a judged text: {near}"
