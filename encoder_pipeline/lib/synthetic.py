"""The corpus training data is built from, and the synthetic-query recipe on it (Gecko / Promptagator):
few-shot prompts with a per-document task, persona and length; answers parsed and deduplicated; each
query retrieves from the training corpus: dropped when its seed document is not in the top-k (round
trip), its positive relabeled when another document fits it better (an LLM judge where one is given,
else the base encoder's margin rule); then the leakage filter. `defs/training_data` wraps these in assets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.heldout import EvalSplit
from encoder_pipeline.lib.leakage import LeakFilter
from encoder_pipeline.lib.pairs import document_form, rank_of_positive, top_k_ids
from encoder_pipeline.lib.queries import (
    JUDGE_CANDIDATES,
    PromptSpec,
    RelabelConfig,
    build_prompts,
    dedupe_queries,
    judge_prompt,
    parse_choice,
    parse_query,
    relabel,
)

Encode = Callable[[list[str]], np.ndarray]
Generate = Callable[[list[dict]], pd.DataFrame]  # prompts -> lib.queries.generate_frame's rows


class TrainingCorpus:
    """The training sample minus the held-out (eval and dev) documents, embedded by the base model
    (`encode_corpus`, cached per unit by the caller), and the extractors eval_set resolved."""

    def __init__(self, sample_units: pd.DataFrame, split: EvalSplit, encode_corpus: Encode,
                 encode_queries: Encode):
        self.eval = split
        self.units = sample_units[~sample_units["parent_id"].isin(split.held_out_doc_ids)].reset_index(drop=True)
        self.ids = list(self.units["doc_id"])
        self.extractors = split.extractors
        self._encode_corpus, self._encode_queries = encode_corpus, encode_queries

    def texts(self) -> list[str]:
        """Each unit as the encoder sees it when served: a synthetic query's positive."""
        return document_texts(self.units["title"], self.units["text"])

    def structural_positives(self) -> list[str]:
        """Each unit as a structural row's positive (`lib.pairs.document_form`)."""
        return document_form(self.units, self.extractors)

    def embeddings(self) -> np.ndarray:
        return self._encode_corpus(self.texts())

    def ranks(self, queries: list[str], positive_ids: list[str], top_k: int) -> np.ndarray:
        return rank_of_positive(self._encode_queries(queries), positive_ids, self.embeddings(), self.ids, top_k)

    def search(self, queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        if not queries:
            return []
        return top_k_ids(self._encode_queries(queries), self.embeddings(), self.ids, top_k)


def judge_candidates(queries: list[str], hits: list, corpus: TrainingCorpus, relevance: str,
                     generate_greedy: Generate) -> list[int | None]:
    """An instruction-following LLM's pick among each query's top retrieved passages (None: no
    usable answer)."""
    text_of = dict(zip(corpus.ids, corpus.texts(), strict=True))
    prompts = [{"prompt": judge_prompt(query, [text_of[d] for d, _ in row[:JUDGE_CANDIDATES]], relevance)}
               for query, row in zip(queries, hits, strict=True)]
    answers = generate_greedy(prompts)["text"]
    return [parse_choice(a if isinstance(a, str) else None, min(JUDGE_CANDIDATES, len(row)))
            for a, row in zip(answers, hits, strict=True)]


@dataclass
class SyntheticQueries:
    """`rows`: every prompt with its answer and parsed `query`; `synthetic`: the training rows;
    `unfiltered`: every parsed query with its seed document (for the ablation benchmark), leak-filtered
    too; `counts`: what each step kept."""

    rows: pd.DataFrame
    synthetic: pd.DataFrame
    unfiltered: pd.DataFrame
    counts: dict[str, int]


def synthesize(corpus: TrainingCorpus, sample: pd.DataFrame, prompt_spec: PromptSpec, generate: Generate, *,
               queries_per_document: int, relabel_config: RelabelConfig, min_words: int, seed: int,
               leaks: LeakFilter, judge: Generate | None = None) -> SyntheticQueries:
    """Synthetic training queries for `sample` (units of `corpus`); `judge`, when given, generates
    greedily for the LLM judge (a remote instruction-following model; the local base model cannot)."""
    passages = document_texts(sample["title"], sample["text"])
    prompts = build_prompts(prompt_spec, list(sample["doc_id"]), passages, queries_per_document, seed)
    rows = generate(prompts)
    by_doc = dict(zip(sample["doc_id"], passages, strict=True))
    examples = [query for _, query in prompt_spec.examples]
    rows["query"] = [parse_query(raw, by_doc[d], examples, min_words) if isinstance(raw, str) else None
                     for raw, d in zip(rows["text"], rows["doc_id"], strict=True)]
    parsed = rows[rows["query"].notna()]
    parsed = parsed[dedupe_queries(list(parsed["query"]))].reset_index(drop=True)
    hits = corpus.search(list(parsed["query"]), relabel_config.top_k)
    choices = judge_candidates(list(parsed["query"]), hits, corpus, prompt_spec.relevance, judge) if judge else None
    parsed["positive_id"], parsed["outcome"] = relabel(hits, list(parsed["doc_id"]), relabel_config, choices)
    positive_of = dict(zip(corpus.ids, corpus.texts(), strict=True))
    kept = parsed[parsed["outcome"] != "dropped_round_trip"]
    synthetic, leaked = leaks.drop(pd.DataFrame({
        "query": kept["query"], "positive": kept["positive_id"].map(positive_of),
        "doc_id": kept["positive_id"], "seed_doc_id": kept["doc_id"], "outcome": kept["outcome"],
        "style": kept["style"]}))
    unfiltered, leaked_unfiltered = leaks.drop(pd.DataFrame({
        "query": parsed["query"], "positive": parsed["doc_id"].map(positive_of),
        "doc_id": parsed["doc_id"], "outcome": parsed["outcome"]}))
    outcomes = parsed["outcome"].value_counts()
    counts = {"prompts": len(prompts), "completions": int(rows["text"].notna().sum()),
              "parsed": int(rows["query"].notna().sum()), "deduplicated": len(parsed),
              "dropped_round_trip": int(outcomes.get("dropped_round_trip", 0)),
              "relabeled": int(outcomes.get("relabeled", 0)), "dropped_eval_overlap": leaked.count,
              "unfiltered_dropped_eval_overlap": leaked_unfiltered.count, "kept": len(synthetic)}
    return SyntheticQueries(rows, synthetic, unfiltered, counts)


def greedy(params):
    """Sampling parameters for a judge: deterministic, a few tokens."""
    return dataclasses.replace(params, temperature=0.0, max_new_tokens=4)
