"""The held-out query sets a run is judged and steered on: the eval set (the report and its verdict)
and the dev slice (the best epoch, the index width), both on documents no training row touches.

Evidence, best first:
- `human`: the domain's judged set (the spec's `[judged]`).
- `structural`: a structural extractor's query (a title, a docstring summary) of held-out documents;
  queries that normalize alike are one query, all their documents relevant.
- `synthetic`: one LLM-written query per held-out document, generated once per corpus (a fixed
  seed, whatever the run's), kept when BM25 finds its document in its top ROUND_TRIP_K: a round trip
  through a lexical model, not the base encoder, which would favour the off-the-shelf model. Split
  by document into a dev and an eval half.

A structural set on which BM25 or the off-the-shelf model already scores UNINFORMATIVE_NDCG nDCG@10
or more cannot tell systems apart (a title evaluated against its own unit is a near-copy of it): it
is recorded and flagged, and synthetic queries take its place.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.extractors import ExtractorConfig, get
from encoder_pipeline.lib.leakage import normalize
from encoder_pipeline.lib.metrics import Qrels, bm25_run, dense_run, evaluate

HUMAN, STRUCTURAL, SYNTHETIC = "human", "structural", "synthetic"
EVIDENCE_WORDS = {
    HUMAN: "human-judged: the figures rest on people's relevance judgments.",
    STRUCTURAL: "structural (not human-judged): held-out documents' own titles or docstring summaries "
                "as queries; real users' queries are usually harder.",
    SYNTHETIC: "synthetic (not human-judged): LLM-written queries of held-out documents, kept when BM25 "
               "finds their document (so BM25's own row, and the hybrid's, are favoured: BM25 finds every "
               "one in its top 10 by construction); a verdict to confirm on real users' queries.",
}
UNINFORMATIVE_NDCG = 0.95
ROUND_TRIP_K = 10
MAX_HELD_OUT_FRACTION = 0.3  # of the candidate queries or documents: the rest must stay to train on
EXPECTED_KEEP_RATE = 0.5  # of synthetic queries past parsing and the round trip, to size generation
MAX_PROMPTS_PER_QUERY = 6  # when fewer are kept, more documents are asked: up to this many per query
SPLIT_SEED = 0  # the held-out sets are the corpus's, not the run's: one for every training seed


def salted(key: str, seed: int = SPLIT_SEED) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


@dataclass
class QuerySet:
    queries: dict[str, str]
    qrels: Qrels  # query id -> {document (parent) id: grade}
    evidence: str

    @property
    def doc_ids(self) -> set[str]:
        return {doc for rels in self.qrels.values() for doc in rels}

    def to_dict(self) -> dict:
        return {"queries": self.queries, "qrels": self.qrels, "evidence": self.evidence}

    @classmethod
    def from_dict(cls, payload: dict) -> QuerySet:
        return cls(payload["queries"], payload["qrels"], payload["evidence"])


@dataclass
class EvalSplit:
    """The eval set, the dev slice, the documents held out of training, and what was learnt building
    them (`notes`: sentences for the report; `scores`: BM25 / off-the-shelf nDCG@10 on each
    structural set measured)."""

    eval: QuerySet
    dev: QuerySet
    held_out_doc_ids: set[str]
    extractors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def queries(self) -> dict[str, str]:
        return self.eval.queries

    @property
    def qrels(self) -> Qrels:
        return self.eval.qrels

    @property
    def evidence(self) -> str:
        return self.eval.evidence

    @property
    def human_judged(self) -> bool:
        return self.eval.evidence == HUMAN

    def to_dict(self) -> dict:
        return {"eval": self.eval.to_dict(), "dev": self.dev.to_dict(),
                "held_out_doc_ids": sorted(self.held_out_doc_ids), "extractors": self.extractors,
                "notes": self.notes, "scores": self.scores}

    @classmethod
    def from_dict(cls, payload: dict) -> EvalSplit:
        return cls(QuerySet.from_dict(payload["eval"]), QuerySet.from_dict(payload["dev"]),
                   set(payload["held_out_doc_ids"]), payload["extractors"], payload["notes"],
                   payload["scores"])


def sample_judged(queries: dict[str, str], qrels: Qrels, size: int, seed: int) -> tuple[dict[str, str], Qrels]:
    """A stable sample of `size` judged queries (0: all), for small-scale runs."""
    if not size or size >= len(queries):
        return queries, qrels
    chosen = sorted(queries, key=lambda q: salted(q, seed))[:size]
    return {q: queries[q] for q in chosen}, {q: qrels[q] for q in chosen}


def structural_queries(units: pd.DataFrame, extractors: Sequence[str], config: ExtractorConfig,
                       exclude: set[str]) -> pd.DataFrame:
    """Per normalized query of the first extractor that gives units queries (title, docstring): its
    text and the documents carrying it (`parents`), outside `exclude`; in a stable salted order.
    Empty when no extractor gives units queries."""
    extractor = next((get(key) for key in extractors if hasattr(get(key), "unit_queries")), None)
    if extractor is None:
        return pd.DataFrame(columns=["text", "parents"])
    candidates = units[~units["parent_id"].isin(exclude)].drop_duplicates("parent_id")
    texts = extractor.unit_queries(candidates, config)
    candidates, texts = candidates[texts != ""], texts[texts != ""]
    keys = texts.map(normalize)
    groups = pd.DataFrame({"key": keys, "text": texts, "parent": candidates["parent_id"]}).groupby(
        "key", sort=False).agg(text=("text", "first"), parents=("parent", list))
    return groups.loc[sorted(groups.index, key=salted)]


def _query_set(groups: pd.DataFrame, evidence: str, prefix: str) -> QuerySet:
    queries = {f"{prefix}-{salted(key)[:12]}": row.text for key, row in groups.iterrows()}
    qrels = {f"{prefix}-{salted(key)[:12]}": dict.fromkeys(row.parents, 1) for key, row in groups.iterrows()}
    return QuerySet(queries, qrels, evidence)


Scorer = Callable[[dict[str, str], Qrels], dict[str, float]]  # -> {"bm25": nDCG@10, "off_the_shelf": ...}


def haystack_scorer(units: pd.DataFrame, encode_corpus: Callable[[list[str]], np.ndarray],
                    encode_queries: Callable[[list[str]], np.ndarray]) -> Scorer:
    """nDCG@10 of BM25 and of the off-the-shelf model (`encode_*`) on `units`: how easy a set is."""
    texts, parents = document_texts(units["title"], units["text"]), list(units["parent_id"])

    def score(queries: dict[str, str], qrels: Qrels) -> dict[str, float]:
        qids = list(queries)
        dense = dense_run(encode_queries([queries[q] for q in qids]), encode_corpus(texts), qids, parents)
        return {"bm25": evaluate(bm25_run(texts, parents, queries), qrels)[0]["ndcg@10"],
                "off_the_shelf": evaluate(dense, qrels)[0]["ndcg@10"]}
    return score
Generator = Callable[[list[str], list[str]], list[str | None]]  # (doc ids, passages) -> one query each


def held_out_synthetic_queries(units: pd.DataFrame, exclude: set[str], wanted: int, generate: Generator
                               ) -> tuple[pd.DataFrame, int]:
    """Generated queries for held-out documents outside `exclude`, kept when BM25 over `units`
    ranks their document in its top ROUND_TRIP_K: columns `query`, `parent`, in salted order, at
    most `wanted`; and how many documents were asked.

    Asked in rounds until `wanted` are kept: the first sized for EXPECTED_KEEP_RATE, each next for
    the rate kept so far (a small local LLM may keep one in five), at most MAX_PROMPTS_PER_QUERY
    prompts per wanted query and MAX_HELD_OUT_FRACTION of the documents. Only kept documents are
    held out; the others stay in training."""
    documents = units[~units["parent_id"].isin(exclude)].drop_duplicates("parent_id")
    ordered = documents.loc[sorted(documents.index, key=lambda i: salted(documents.at[i, "parent_id"]))]
    limit = min(wanted * MAX_PROMPTS_PER_QUERY, int(len(documents) * MAX_HELD_OUT_FRACTION))
    texts, parents = document_texts(units["title"], units["text"]), list(units["parent_id"])
    kept, seen, asked, found, rate = [], set(), 0, 0, EXPECTED_KEEP_RATE
    while found < wanted and asked < limit:
        batch = ordered[asked:min(limit, asked + math.ceil((wanted - found) / rate))]
        generated = generate(list(batch["doc_id"]), document_texts(batch["title"], batch["text"]))
        asked += len(batch)
        rows = pd.DataFrame({"query": generated, "parent": list(batch["parent_id"])}).dropna()
        keys = rows["query"].map(normalize)
        rows = rows[~keys.duplicated() & ~keys.isin(seen)]
        seen |= set(keys)
        if len(rows):
            run = bm25_run(texts, parents, {str(i): q for i, q in enumerate(rows["query"])}, ROUND_TRIP_K)
            kept.append(rows[[parent in run[str(i)] for i, parent in enumerate(rows["parent"])]])
            found += len(kept[-1])
        rate = max(found / asked, 1 / MAX_PROMPTS_PER_QUERY)
    columns = pd.DataFrame(columns=["query", "parent"])
    return pd.concat([columns, *kept]).reset_index(drop=True)[:wanted], asked


def build_split(units: pd.DataFrame, extractors: Sequence[str], config: ExtractorConfig,
                judged: tuple[dict[str, str], Qrels] | None, eval_size: int, dev_size: int,
                score: Scorer, generate: Generator | None, keep: set[str] = frozenset()) -> EvalSplit:
    """The eval set and the dev slice of a corpus (`units`: the training sample, which holds every
    judged document); documents in `keep` (the prompt's examples) are never held out. See the module
    doc for the order of evidence."""
    notes, scores = [], {}
    human = QuerySet(*judged, HUMAN) if judged else None
    held = set(human.doc_ids) if human else set()
    source = next((key for key in extractors if hasattr(get(key), "unit_queries")), "")
    groups = structural_queries(units, extractors, config, held | set(keep))
    groups = groups[:max(1, int(len(groups) * MAX_HELD_OUT_FRACTION))] if len(groups) else groups
    eval_groups = groups[:0] if human else groups[:eval_size]
    dev_groups = groups[len(eval_groups):len(eval_groups) + dev_size]

    def informative(query_set: QuerySet, name: str) -> bool:
        if not query_set.queries:
            return False
        scores[name] = measured = score(query_set.queries, query_set.qrels)
        best = max(measured, key=measured.get)
        if measured[best] < UNINFORMATIVE_NDCG:
            return True
        notes.append(f"The structural {name} set ({len(query_set.queries)} held-out documents' own "
                     f"{source} queries) is uninformative: {best} already scores nDCG@10 "
                     f"{measured[best]:.3f} on it, so it cannot tell systems apart; synthetic held-out "
                     "queries take its place.")
        return False

    structural_eval = _query_set(eval_groups, STRUCTURAL, "q")
    structural_dev = _query_set(dev_groups, STRUCTURAL, "dev")
    eval_set = human or (structural_eval if informative(structural_eval, "eval") else None)
    dev_set = structural_dev if informative(structural_dev, "dev") else None
    held |= structural_eval.doc_ids if eval_set is structural_eval else set()
    held |= structural_dev.doc_ids if dev_set is structural_dev else set()
    if (eval_set is None or dev_set is None) and generate is not None:
        wanted = (0 if eval_set else eval_size) + (0 if dev_set else dev_size)
        kept, asked = held_out_synthetic_queries(units, held | set(keep), wanted, generate)
        notes.append(f"Synthetic held-out queries: {len(kept)} of {asked} generated kept by the BM25 "
                     f"round trip ({len(kept) / max(asked, 1):.0%}), {wanted} wanted.")
        dev_share = 0 if dev_set else (min(dev_size, len(kept) // 4) if eval_set is None else dev_size)
        dev_rows, eval_rows = kept[:dev_share], kept[dev_share:dev_share + (0 if eval_set else eval_size)]

        def from_rows(rows: pd.DataFrame, prefix: str) -> QuerySet:
            ids = [f"{prefix}-{salted(q)[:12]}" for q in rows["query"]]
            return QuerySet(dict(zip(ids, rows["query"], strict=True)),
                            {i: {p: 1} for i, p in zip(ids, rows["parent"], strict=True)}, SYNTHETIC)

        dev_set = dev_set or (from_rows(dev_rows, "dev") if len(dev_rows) else None)
        eval_set = eval_set or (from_rows(eval_rows, "q") if len(eval_rows) else None)
        held |= set(kept["parent"][:dev_share + len(eval_rows)]) if len(kept) else set()
    # Nothing better could be built: the flagged structural sets rather than none.
    eval_set = eval_set or (structural_eval if structural_eval.queries else None)
    dev_set = dev_set or structural_dev
    if eval_set is None or not eval_set.queries:
        raise ValueError("no eval queries could be built: no judged set, no structure that gives "
                         "queries, and no synthetic query survived the round trip")
    held |= eval_set.doc_ids | dev_set.doc_ids
    return EvalSplit(eval_set, dev_set, held, list(extractors), notes, scores)
