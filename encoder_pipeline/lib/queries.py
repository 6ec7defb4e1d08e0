"""Synthetic queries: few-shot prompts from the domain spec, generation as a Daft batch UDF,
output cleaning, positive relabeling and the round-trip filter.

Columns out of `build_prompts`: `doc_id`, `variant`, `style`, `prompt`; `generate_frame` adds
`text`, `prompt_tokens`, `completion_tokens`, `cached`; `parse_query` gives one clean query or None;
`relabel` gives each query's positive and what happened to it.
Sources: doc2query (Nogueira et al. 2019), InPars / Promptagator (few-shot prompting of a generator,
round-trip consistency), Gecko (Lee et al. 2024: a task / persona / length taxonomy per document,
positives relabeled among retrieved neighbours).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import daft
import pandas as pd
import pyarrow as pa
from daft import col

from encoder_pipeline.lib.extractors.base import MIN_QUERY_WORDS
from encoder_pipeline.lib.llm import (
    GenerationParams,
    LLMBackend,
    LLMError,
    ResponseCache,
    generate_cached,
)

# Gecko-style variety: each document draws a task, a persona and a length, so queries are not all
# restatements of the passage's first sentence.
QUERY_TASKS = (
    "asks for what the passage provides",
    "describes a problem the passage solves, without naming it",
    "asks about one specific detail the passage states",
)
QUERY_PERSONAS = ("a newcomer to the field", "an experienced practitioner", "someone in a hurry")
QUERY_LENGTHS = ("3 to 6 words", "about 10 words", "one full sentence")
PASSAGE_WORDS = 120
MAX_QUERY_WORDS = 32
COPIED_SPAN_WORDS = 8  # a query repeating this many consecutive passage words is a copy, not a query


@dataclass(frozen=True)
class PromptSpec:
    form: str
    relevance: str
    examples: tuple[tuple[str, str], ...]  # (passage, query)


# Few-shot examples for a spec that writes none: a base model prompted zero-shot continues the passage
# instead of querying it. One per style a corpus may have (prose, code, a definition, a clause); written
# for this purpose, in no judged set (test_few_shot_examples.py checks).
GENERIC_EXAMPLES: tuple[tuple[str, str], ...] = (
    (("Before replacing a bicycle chain, count the links on the old one and shift onto the smallest "
      "sprockets. Open the chain at its quick link, thread the new chain through the derailleur and "
      "join it with the link the manufacturer supplies."),
     "how do I put a new chain on my bike"),
    (("def median(values):\n    ordered = sorted(values)\n    middle = len(ordered) // 2\n"
      "    if len(ordered) % 2:\n        return ordered[middle]\n"
      "    return (ordered[middle - 1] + ordered[middle]) / 2"),
     "middle value of a list of numbers"),
    (("Dew point\nThe temperature to which air must be cooled, at constant pressure and water content, "
      "for the water vapour in it to start condensing."),
     "temperature at which condensation begins"),
    (("Either party may end this agreement by giving the other thirty days' written notice. Fees paid "
      "for the period after the end date are refunded in proportion to the days left."),
     "can I cancel and get part of my money back"),
)
STRUCTURE_EXAMPLES = 2  # a corpus's own structural pairs shown besides the generic ones
MAX_EXAMPLES = 4  # every example lengthens each prompt's prefill on a CPU
EXAMPLE_WORDS = 80
_CODE, _PROSE = GENERIC_EXAMPLES[1], GENERIC_EXAMPLES[0]


def prompt_examples(written: Sequence[tuple[str, str]], structural: pd.DataFrame, code: bool = False
                    ) -> tuple[tuple[str, str], ...]:
    """The prompt's examples: the spec's own when it writes any (they always win); else up to
    STRUCTURE_EXAMPLES of the corpus's structural pairs (passage, its title or docstring summary),
    then generic ones, those of the corpus's style first (code for code), MAX_EXAMPLES in all."""
    if written:
        return tuple(written)
    own = tuple(zip(structural["positive"], structural["query"], strict=True))[:STRUCTURE_EXAMPLES]
    generic = (_CODE, _PROSE) if code else tuple(e for e in GENERIC_EXAMPLES if e != _CODE)
    return (own + generic)[:MAX_EXAMPLES]


def _shorten(text: str, words: int = PASSAGE_WORDS) -> str:
    tokens = text.split()
    return " ".join(tokens[:words]) + (" ..." if len(tokens) > words else "")


def _style_for(doc_id: str, variant: int, seed: int) -> str:
    digest = hashlib.sha1(f"{seed}:{variant}:{doc_id}".encode()).digest()
    task = QUERY_TASKS[digest[0] % len(QUERY_TASKS)]
    persona = QUERY_PERSONAS[digest[1] % len(QUERY_PERSONAS)]
    length = QUERY_LENGTHS[digest[2] % len(QUERY_LENGTHS)]
    return f"a query of {length} by {persona} that {task}"


def build_prompt(spec: PromptSpec, passage: str, style: str) -> str:
    """A few-shot completion prompt (the local model is a base model: it continues text).

    What all documents share (instructions, examples) comes first and the document's own style and
    passage last, so a local backend computes the shared prefix once for every prompt of a domain.
    """
    header = (f"Each passage below is followed by a search query it answers. A query is {spec.form}. "
              f"The passage is relevant when {spec.relevance}.\n\n")
    shots = "".join(f"Passage: {_shorten(p, EXAMPLE_WORDS)}\nQuery: {q}\n\n" for p, q in spec.examples)
    return f"{header}{shots}Write {style}.\n\nPassage: {_shorten(passage)}\nQuery:"


def build_prompts(spec: PromptSpec, doc_ids: Sequence[str], passages: Sequence[str],
                  per_document: int, seed: int) -> list[dict]:
    rows = []
    for doc_id, passage in zip(doc_ids, passages, strict=True):
        for variant in range(per_document):
            style = _style_for(doc_id, variant, seed)
            rows.append({"doc_id": doc_id, "variant": variant, "style": style,
                         "prompt": build_prompt(spec, passage, style)})
    return rows


# Bullets, "1." / "(2)" / "3:", "Q1:" / "Query 2 -", and letter or roman items: "a)", "(B)", "(iv)",
# "a." (lower case only: "E. coli ..." starts many a biomedical query).
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):]|(?i:q(?:uery)?)\s*\d*\s*[:.)-]|\(?(?i:[a-z]|[ivx]{1,4})\)|[a-h]\.(?=\s))\s*")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_passage(query: str, passage: str, span: int = COPIED_SPAN_WORDS) -> bool:
    """True when the query repeats `span` consecutive words of the passage verbatim."""
    q, p = _words(query), _words(passage)
    if len(q) < span:
        return False
    passage_grams = {tuple(p[i : i + span]) for i in range(len(p) - span + 1)}
    return any(tuple(q[i : i + span]) in passage_grams for i in range(len(q) - span + 1))


def parse_query(raw: str, passage: str, example_queries: Sequence[str],
                min_words: int = MIN_QUERY_WORDS) -> str | None:
    """The first usable line of a completion: numbering and quotes stripped, copies rejected."""
    for line in raw.replace("\r", "\n").split("\n"):
        line = line.strip()
        if not line:
            continue
        if line.lower().startswith(("passage:", "query:")):
            line = line.split(":", 1)[1].strip()
            if not line:
                continue
        line = _NUMBERING.sub("", line).strip().strip("\"'`").strip()
        words = line.split()
        if not (min_words <= len(words) <= MAX_QUERY_WORDS):
            return None
        if any(line.lower() == example.lower() for example in example_queries):
            return None
        if copies_passage(line, passage):
            return None
        return line
    return None


def dedupe_queries(queries: Sequence[str | None]) -> list[bool]:
    """Keep the first occurrence of each query (case- and space-insensitive)."""
    seen, keep = set(), []
    for query in queries:
        key = " ".join(query.lower().split()) if query else None
        keep.append(bool(key) and key not in seen)
        if key:
            seen.add(key)
    return keep


COMPLETION_DTYPE = daft.DataType.struct({
    "text": daft.DataType.string(), "prompt_tokens": daft.DataType.int64(),
    "completion_tokens": daft.DataType.int64(), "cached": daft.DataType.bool(),
    "error": daft.DataType.string(),
})


@daft.cls(max_concurrency=1, use_process=False)
class CachedGenerator:
    """A Daft batch UDF around an LLM backend and its on-disk cache: the model loads once per worker,
    every call goes through `generate_cached`, so the cache and the budget apply to each batch.
    (`daft.functions.prompt` has no cache hook and no budget, hence this class.)

    An endpoint failure the backend can explain (refused key, retries used up) is returned in the
    `error` field rather than raised, since Daft would bury it in a traceback; later batches then
    send nothing, and `generate_frame` raises it as LLMError."""

    def __init__(self, make_backend: Callable[[], LLMBackend], cache_dir: str, params: GenerationParams,
                 owner_pid: int | None = None):
        if owner_pid is not None and os.getppid() == owner_pid:  # in a Daft worker process
            _exit_with_owner(owner_pid)
        self.backend = make_backend()
        self.cache = ResponseCache(cache_dir)
        self.params = params
        self.failure: str | None = None

    # 64 prompts per call: the local backend sorts them by length into its generate batches (less
    # padding); the cache is written per call, so a crash loses at most one call's generations.
    @daft.method.batch(return_dtype=COMPLETION_DTYPE, batch_size=64, unnest=True)
    def generate(self, prompts: daft.Series) -> list[dict | None]:
        if self.failure is None:
            try:
                report = generate_cached(self.backend, self.cache, prompts.to_pylist(), self.params)
                return [None if c is None else {"text": c.text, "prompt_tokens": c.prompt_tokens,
                                                "completion_tokens": c.completion_tokens,
                                                "cached": c.cached, "error": None}
                        for c in report.completions]
            except Exception as error:
                explained = self.backend.explain(error)
                if explained is None:
                    raise
                self.failure = str(explained)
        return [{"text": None, "prompt_tokens": 0, "completion_tokens": 0, "cached": False,
                 "error": self.failure}] * len(prompts)


def _exit_with_owner(owner_pid: int) -> None:
    """End this worker once the process that started it is gone. A run killed with SIGKILL (or by
    the OOM killer) leaves Daft's worker orphaned, still sending its batch of prompts, which a re-run
    started meanwhile would send too: paid twice."""

    def watch() -> None:
        while os.getppid() == owner_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def generate_frame(prompts: list[dict], make_backend: Callable[[], LLMBackend], cache_dir: str,
                   params: GenerationParams, progress: Callable[[int, int], None] | None = None
                   ) -> pd.DataFrame:
    """Run every prompt through the cached generator as a streaming Daft pipeline;
    `progress(answered, prompts)` is called as each batch of answers comes back."""
    if not prompts:
        return pd.DataFrame(columns=["doc_id", "variant", "style", "prompt", "text", "prompt_tokens",
                                     "completion_tokens", "cached"])
    generator = CachedGenerator(make_backend, cache_dir, params, owner_pid=os.getpid())
    frame = daft.from_pylist(prompts).select("*", generator.generate(col("prompt")))
    batches = []
    for batch in frame.to_arrow_iter():
        batches.append(batch)
        if progress:
            progress(sum(b.num_rows for b in batches), len(prompts))
    rows = pa.Table.from_batches(batches).to_pandas()
    failures = rows["error"].dropna()
    if len(failures):
        raise LLMError(f"{failures.iloc[0]} (the answers received before it are cached: a re-run "
                       "resumes)")
    return rows.drop(columns="error")


def query_generator(spec: PromptSpec, make_backend: Callable[[], LLMBackend], cache_dir: str,
                    params: GenerationParams, min_words: int, seed: int,
                    progress: Callable[[int, int], None] | None = None
                    ) -> Callable[[list[str], list[str]], list[str | None]]:
    """`generate(doc_ids, passages)`: one parsed query per passage (None where the answer gave
    none), through the cached generator, as `lib.heldout` wants it."""
    examples = [query for _, query in spec.examples]

    def generate(doc_ids: list[str], passages: list[str]) -> list[str | None]:
        rows = generate_frame(build_prompts(spec, doc_ids, passages, 1, seed), make_backend, cache_dir, params,
                              progress)
        answers = dict(zip(rows["doc_id"], rows["text"], strict=True))
        return [parse_query(answers[doc], passage, examples, min_words) if isinstance(answers[doc], str)
                else None for doc, passage in zip(doc_ids, passages, strict=True)]
    return generate


@dataclass(frozen=True)
class RelabelConfig:
    top_k: int = 10  # round trip: the seed document must be among the query's top-k
    margin: float = 0.05  # relabel only when a neighbour beats the seed by this much (cosine)


JUDGE_CANDIDATES = 4


def judge_prompt(query: str, candidates: Sequence[str], relevance: str) -> str:
    """Ask an instruction-following LLM which retrieved passage answers a query best (Gecko)."""
    listed = "\n\n".join(f"[{i}] {_shorten(text, 80)}" for i, text in enumerate(candidates, 1))
    return (f"A passage is relevant to a query when {relevance}.\n\nQuery: {query}\n\n{listed}\n\n"
            f"Which passage is most relevant to the query? Answer with its number only.")


def parse_choice(text: str | None, candidates: int) -> int | None:
    """The 0-based candidate an LLM judge picked, or None when its answer names none."""
    match = re.search(r"\d+", text or "")
    if not match or not 1 <= int(match.group()) <= candidates:
        return None
    return int(match.group()) - 1


def relabel(hits: Sequence[Sequence[tuple[str, float]]], seed_ids: Sequence[str],
            config: RelabelConfig, choices: Sequence[int | None] | None = None
            ) -> tuple[list[str | None], list[str]]:
    """Gecko's positive relabeling, and the round-trip filter.

    For each query, `hits` are its retrieved (doc_id, score) pairs, best first, from the corpus minus
    eval documents. A query whose seed is not in the top-k is dropped (`dropped_round_trip`): the
    generator wrote something its passage does not answer. Otherwise the judge decides the positive:
    an LLM's pick among the top candidates (`choices`, index into `hits`) where one was given, else
    the encoder with a margin rule: the top neighbour replaces the seed only when it scores more than
    `margin` above it. A changed positive is `relabeled` (the query fits another document better, so
    training it with that one as a negative would teach the wrong thing); otherwise `kept`.
    """
    choices = choices if choices is not None else [None] * len(seed_ids)
    positives, outcomes = [], []
    for row, seed, choice in zip(hits, seed_ids, choices, strict=True):
        top = list(row[: config.top_k])
        scores = dict(top)
        if seed not in scores:
            positives.append(None)
            outcomes.append("dropped_round_trip")
            continue
        if choice is not None and choice < len(top):
            positive = top[choice][0]
        elif top[0][0] != seed and top[0][1] - scores[seed] > config.margin:
            positive = top[0][0]
        else:
            positive = seed
        positives.append(positive)
        outcomes.append("kept" if positive == seed else "relabeled")
    return positives, outcomes
