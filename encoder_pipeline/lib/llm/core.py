"""The LLM core every backend shares: sampling parameters, completions, the on-disk response cache,
the `LLMBackend` protocol, the backend registry, and `generate_cached`.

Every completion goes through the cache, so re-runs cost nothing and a crash or budget stop loses
nothing already paid for. Usage, few-shot prompts built by the caller::

    backend = backend_kind("local").build(fields, models_dir)
    report = generate_cached(backend, ResponseCache(cache_dir), prompts, GenerationParams())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; part of the cache key, so changing any of them regenerates."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 64
    no_repeat_ngram_size: int = 3
    seed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False


class BudgetExceeded(RuntimeError):
    """The token or dollar budget was reached before all prompts were sent.

    `completions` holds what the interrupted `generate` call did finish (None where not sent), so
    results already paid for can still be cached.
    """

    def __init__(self, message: str, completions: list[Completion | None] | None = None):
        super().__init__(message)
        self.completions: list[Completion | None] = completions or []


class LLMError(RuntimeError):
    """An LLM endpoint that cannot serve the run (refused key, rate limit or server errors past the
    retries, timeouts); the message names the endpoint, the status and what to check, never the key."""


class ResponseCache:
    """On-disk cache, one JSON file per key under `directory`, written atomically.

    Files are written to a temp file in the same directory and moved into place with os.replace,
    so a reader (or a crashed writer) never sees a half-written entry. Key = sha256 of canonical
    JSON of (backend, model, prompt, params dict).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, backend: str, model: str, prompt: str, params: GenerationParams) -> str:
        payload = {"backend": backend, "model": model, "prompt": prompt, "params": params.as_dict()}
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        path = self._path(key)
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return Completion(
            text=data["text"],
            prompt_tokens=data["prompt_tokens"],
            completion_tokens=data["completion_tokens"],
            cached=True,
        )

    def put(self, key: str, completion: Completion) -> None:
        data = {
            "text": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        }
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False)
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class LLMBackend(Protocol):
    """What `generate_cached` and the synthetic-query stage need of a backend."""

    name: str  # the registry key ("local", "openai"): part of the cache key
    model: str  # model identifier: part of the cache key
    prompts_per_call: int  # prompts per `generate` call (a local batch refills finished rows)
    streams_completions: bool  # `generate` reports each completion through `on_complete`

    def generate(self, prompts: list[str], params: GenerationParams,
                 on_complete: Callable[[int, Completion], None] | None = None) -> list[Completion]: ...

    def explain(self, error: BaseException) -> LLMError | None:
        """The backend's own error as a message for the user (None: not the backend's error)."""
        ...


@dataclass(frozen=True)
class BackendKind:
    """One registered kind of backend. `build(fields, models_dir)`: the backend from the `llm`
    resource's plain fields (picklable: Daft ships the constructor to its workers);
    `documents_go_to(fields)`: where prompts (document text) are sent, None when they stay on this
    machine; `model_label(fields)`: the model as reports name it; `follows_instructions`: an
    instruction-tuned model that can judge candidates (a base model only continues text)."""

    key: str
    build: Callable[[dict, str], LLMBackend]
    documents_go_to: Callable[[dict], str | None]
    model_label: Callable[[dict], str]
    follows_instructions: bool


_BACKENDS: dict[str, BackendKind] = {}


def register_backend(kind: BackendKind) -> BackendKind:
    _BACKENDS[kind.key] = kind
    return kind


def backend_names() -> list[str]:
    return list(_BACKENDS)


def backend_kind(key: str) -> BackendKind:
    if key not in _BACKENDS:
        raise ValueError(f"unknown LLM backend {key!r}; known: {', '.join(_BACKENDS)}")
    return _BACKENDS[key]


@dataclass
class GenerationReport:
    """What generate_cached did; token counts cover only completions generated in this call."""

    completions: list[Completion | None]  # None where not generated (budget reached)
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    stopped_by_budget: bool


def generate_cached(
    backend: LLMBackend,
    cache: ResponseCache,
    prompts: list[str],
    params: GenerationParams,
    chunk_size: int | None = None,
) -> GenerationReport:
    """Generate through the cache: only misses are sent, each chunk cached as soon as it returns,
    or each completion as soon as it arrives where the backend reports them one by one
    (`streams_completions`, as the OpenAI backend's concurrent requests do).

    So a crash or a budget stop loses nothing already paid for, and a re-run resumes where the
    last one stopped. Duplicate prompts are sent once. Chunks hold the backend's
    `prompts_per_call` prompts unless `chunk_size` says otherwise.
    """
    chunk_size = chunk_size or backend.prompts_per_call
    streams = backend.streams_completions
    keys = [cache.key(backend.name, backend.model, prompt, params) for prompt in prompts]
    by_key: dict[str, Completion | None] = {key: cache.get(key) for key in keys}
    cache_hits = sum(by_key[key] is not None for key in keys)
    prompt_for = dict(zip(keys, prompts))
    # similar lengths share a chunk: a batched local backend pads every prompt to the longest
    misses = sorted((key for key, completion in by_key.items() if completion is None),
                    key=lambda key: len(prompt_for[key]))

    prompt_tokens = completion_tokens = 0
    stopped_by_budget = False
    for start in range(0, len(misses), chunk_size):
        chunk = misses[start : start + chunk_size]
        sent = [prompt_for[key] for key in chunk]
        try:
            if streams:
                results: list[Completion | None] = list(backend.generate(
                    sent, params, on_complete=lambda i, c, chunk=chunk: cache.put(chunk[i], c)))
            else:
                results = list(backend.generate(sent, params))
        except BudgetExceeded as stop:
            logger.warning("stopping generation: %s", stop)
            results, stopped_by_budget = stop.completions, True
        for key, completion in zip(chunk, results):
            if completion is None:
                continue
            if not streams:
                cache.put(key, completion)
            by_key[key] = completion
            prompt_tokens += completion.prompt_tokens
            completion_tokens += completion.completion_tokens
        if stopped_by_budget:
            break

    completions = [by_key[key] for key in keys]
    logger.info(
        "%d prompts: %d cache hits, %d generated, %d missing",
        len(prompts),
        cache_hits,
        sum(c is not None and not c.cached for c in completions),
        sum(c is None for c in completions),
    )
    return GenerationReport(
        completions=completions,
        cache_hits=cache_hits,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        stopped_by_budget=stopped_by_budget,
    )
