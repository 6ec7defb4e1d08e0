"""Tests for lib/llm/: a real local HTTP server plays the OpenAI endpoint; the real gemma runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fake_llm import COMPLETION_TOKENS, FAKE_KEY, PROMPT_TOKENS, FakeOpenAIServer, serving

from encoder_pipeline.lib.llm import (
    BudgetExceeded,
    Completion,
    GenerationParams,
    LocalGGUFBackend,
    OpenAIBackend,
    ResponseCache,
    core,
    ensure_local_gguf,
    generate_cached,
    local_gguf,
)
from encoder_pipeline.resources import LLMResource


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with serving(FakeOpenAIServer()) as srv:
        yield srv


def make_backend(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIBackend:
    return OpenAIBackend(server.base_url, "fake-model", FAKE_KEY, **kwargs)


PARAMS = GenerationParams(max_new_tokens=8)


# --- ResponseCache -------------------------------------------------------------------------------


def test_cache_roundtrip_marks_cached(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    key = cache.key("openai", "m", "prompt", PARAMS)
    assert cache.get(key) is None
    cache.put(key, Completion("héllo\n", prompt_tokens=3, completion_tokens=2))
    assert cache.get(key) == Completion("héllo\n", 3, 2, cached=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.json"]


def test_cache_key_covers_backend_model_prompt_and_params(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    base = cache.key("openai", "m", "p", PARAMS)
    same_params = GenerationParams(max_new_tokens=8)
    assert base == ResponseCache(tmp_path).key("openai", "m", "p", same_params)
    others = {
        cache.key("local", "m", "p", PARAMS),
        cache.key("openai", "m2", "p", PARAMS),
        cache.key("openai", "m", "p2", PARAMS),
        cache.key("openai", "m", "p", GenerationParams(max_new_tokens=8, seed=1)),
    }
    assert len(others) == 4 and base not in others


def test_cache_failed_write_keeps_old_entry_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ResponseCache(tmp_path)
    key = cache.key("openai", "m", "p", PARAMS)
    cache.put(key, Completion("old", 1, 1))

    def crash(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(core.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        cache.put(key, Completion("new", 1, 1))
    assert cache.get(key) == Completion("old", 1, 1, cached=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.json"]


# --- OpenAIBackend against a real HTTP server ----------------------------------------------------


def test_openai_retries_429_and_500_then_succeeds(server: FakeOpenAIServer) -> None:
    server.script = [429, 500]
    backend = make_backend(server, max_retries=2)
    [completion] = backend.generate(["q"], PARAMS)
    assert completion == Completion("answer to q", PROMPT_TOKENS, COMPLETION_TOKENS)
    assert server.requests == 3
    assert backend.tokens_used == PROMPT_TOKENS + COMPLETION_TOKENS


def test_openai_gives_up_after_max_retries(server: FakeOpenAIServer) -> None:
    server.script = [429, 429]
    with pytest.raises(openai.RateLimitError):
        make_backend(server, max_retries=1).generate(["q"], PARAMS)
    assert server.requests == 2


def test_openai_slow_server_times_out_after_retries(server: FakeOpenAIServer) -> None:
    server.delay_s = 1.5
    backend = make_backend(server, max_retries=1, timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError, match="timed out"):
        backend.generate(["q"], PARAMS)
    assert server.requests == 2
    assert time.monotonic() - start < 1.5
    assert backend.tokens_used == 0


def test_openai_runs_requests_concurrently_in_order(server: FakeOpenAIServer) -> None:
    server.delay_s = 0.1
    backend = make_backend(server, max_concurrency=3)
    prompts = [f"q{i}" for i in range(9)]
    completions = backend.generate(prompts, PARAMS)
    assert [c.text for c in completions] == [f"answer to {p}" for p in prompts]
    assert 1 < server.max_in_flight <= 3


# A fresh process, where openai's response models are not built yet, with pydantic's window between
# deleting a model's schema and setting it widened to 50 ms: concurrent answers parsed in that window
# failed with "BaseModel cannot be instantiated directly" (seen once in a suite run, unwidened).
FIRST_ANSWERS_AT_ONCE = """
import time
from pydantic._internal import _model_construction
build = _model_construction.complete_model_class
def slow_build(*args, **kwargs):
    time.sleep(0.05)
    return build(*args, **kwargs)
_model_construction.complete_model_class = slow_build
from fake_llm import FAKE_KEY, FakeOpenAIServer, serving
from encoder_pipeline.lib.llm import GenerationParams, OpenAIBackend
with serving(FakeOpenAIServer()) as server:
    backend = OpenAIBackend(server.base_url, "fake-model", FAKE_KEY, max_concurrency=8)
    prompts = [f"q{i}" for i in range(8)]
    texts = [c.text for c in backend.generate(prompts, GenerationParams(max_new_tokens=8))]
    assert texts == [f"answer to {p}" for p in prompts], texts
    assert server.max_in_flight > 1, server.max_in_flight
"""


def test_the_first_answers_parse_when_they_arrive_together() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FIRST_ANSWERS_AT_ONCE], env=env, check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_openai_tracks_dollar_cost_and_stops_at_dollar_budget(server: FakeOpenAIServer) -> None:
    # each request costs 10 * $1/1M + 5 * $2/1M = $20e-6; worst case before sending is
    # 1 (estimated prompt) * $1/1M + 8 (max_new_tokens) * $2/1M = $17e-6
    backend = make_backend(
        server,
        max_concurrency=1,
        max_usd_budget=50e-6,
        usd_per_1m_prompt_tokens=1.0,
        usd_per_1m_completion_tokens=2.0,
    )
    with pytest.raises(BudgetExceeded) as stop:
        backend.generate(["a", "b", "c"], PARAMS)
    assert [c is not None for c in stop.value.completions] == [True, True, False]
    assert backend.usd_spent == pytest.approx(40e-6)
    assert server.requests == 2


def test_null_content_gives_empty_text(server: FakeOpenAIServer) -> None:
    server.null_content = True
    [completion] = make_backend(server).generate(["q"], PARAMS)
    assert completion.text == ""


# --- generate_cached ------------------------------------------------------------------------------


def test_rerun_is_served_from_cache_without_requests(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    cache = ResponseCache(tmp_path)
    prompts = ["q0", "q1", "q2", "q1"]  # the duplicate is sent once
    first = generate_cached(make_backend(server), cache, prompts, PARAMS, chunk_size=2)
    assert server.requests == 3
    assert first.cache_hits == 0 and not first.stopped_by_budget
    assert first.prompt_tokens == 3 * PROMPT_TOKENS
    assert first.completion_tokens == 3 * COMPLETION_TOKENS
    assert [c.text for c in first.completions] == [f"answer to {p}" for p in prompts]

    second = generate_cached(make_backend(server), cache, prompts, PARAMS, chunk_size=2)
    assert server.requests == 3
    assert second.cache_hits == 4
    assert second.prompt_tokens == second.completion_tokens == 0
    assert all(c.cached for c in second.completions)
    assert [c.text for c in second.completions] == [c.text for c in first.completions]


def test_budget_stop_keeps_completed_results_and_resumes(
    server: FakeOpenAIServer, tmp_path: Path
) -> None:
    # worst case per request: 1 estimated prompt token + 8 max_new_tokens = 9; actual: 15.
    # 0+9, 15+9, 30+9 fit in 50; 45+9 does not -> 3 completions, the third in the second chunk.
    cache = ResponseCache(tmp_path)
    prompts = [f"q{i}" for i in range(6)]
    backend = make_backend(server, max_concurrency=1, max_tokens_budget=50)
    report = generate_cached(backend, cache, prompts, PARAMS, chunk_size=2)
    assert report.stopped_by_budget
    assert [c is not None for c in report.completions] == [True] * 3 + [False] * 3
    assert server.requests == 3
    assert backend.tokens_used == 45 <= backend.max_tokens_budget  # type: ignore[operator]
    assert len(list(tmp_path.glob("*.json"))) == 3

    resumed = generate_cached(make_backend(server), cache, prompts, PARAMS, chunk_size=2)
    assert not resumed.stopped_by_budget
    assert resumed.cache_hits == 3
    assert server.requests == 6
    assert [c.text for c in resumed.completions] == [f"answer to {p}" for p in prompts]


def test_api_key_is_sent_but_never_stored(server: FakeOpenAIServer, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    generate_cached(make_backend(server), ResponseCache(cache_dir), ["q0", "q1"], PARAMS)
    assert server.authorizations == [f"Bearer {FAKE_KEY}"] * 2
    files = list(cache_dir.rglob("*"))
    assert files
    for path in files:
        assert FAKE_KEY not in path.name
        assert FAKE_KEY.encode() not in path.read_bytes()


# --- LocalGGUFBackend with the real gemma-3-270m ------------------------------------------------


FEW_SHOT = (
    "Passage: The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.\n"
    "Question: When was the Eiffel Tower completed?\n\n"
    "Passage: {passage}\n"
    "Question:"
)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> LocalGGUFBackend:
    path = ensure_local_gguf(tmp_path_factory.mktemp("gguf"))
    assert ensure_local_gguf(path.parent) == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    return LocalGGUFBackend(path, batch_size=2)


@pytest.mark.slow
def test_local_gemma_generates_a_batch_reproducibly(
    gemma: LocalGGUFBackend, tmp_path: Path
) -> None:
    prompts = [
        FEW_SHOT.format(passage="Python lists are mutable sequences holding items of any type."),
        FEW_SHOT.format(passage="Cells need energy."),
    ]
    params = GenerationParams(max_new_tokens=16)
    cache = ResponseCache(tmp_path)
    report = generate_cached(gemma, cache, prompts, params)
    done = [c for c in report.completions if c is not None]
    assert len(done) == 2
    for completion in done:
        assert completion.text.strip()
        assert "\n" not in completion.text.strip()  # generation ends after the first line
        assert completion.prompt_tokens > 0
        assert 0 < completion.completion_tokens <= 16
    # padding is not counted: the longer passage has more prompt tokens
    assert done[0].prompt_tokens > done[1].prompt_tokens

    again = gemma.generate(prompts, params)
    assert [c.text for c in again] == [c.text for c in done]
    assert generate_cached(gemma, cache, prompts, params).cache_hits == 2


@pytest.mark.slow
def test_prefix_cache_and_decode_rounds_keep_the_greedy_tokens(
    gemma: LocalGGUFBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared few-shot prefix computed once, suffixes of different lengths padded after it, and
    rows decoded a few tokens at a time, finished ones replaced by the next prompt: the same tokens
    and counts as one plain left-padded pass."""
    passages = ["Cells need energy.", "Python lists are mutable sequences holding items of any type.",
                "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War in Europe."]
    prompts = [FEW_SHOT.format(passage=p) for p in passages]
    greedy = GenerationParams(temperature=0.0, max_new_tokens=8)
    one_pass = LocalGGUFBackend(gemma.gguf_path, batch_size=3, prefix_cache=False).generate(
        prompts, greedy)
    assert max(c.completion_tokens for c in one_pass) > 3
    monkeypatch.setattr(local_gguf, "ROUND_TOKENS", 3)
    cached = LocalGGUFBackend(gemma.gguf_path, batch_size=2)
    assert cached.generate(prompts, greedy) == one_pass
    uncached = LocalGGUFBackend(gemma.gguf_path, batch_size=2, prefix_cache=False)
    assert uncached.generate(prompts, greedy) == one_pass
    shared = cached._prefix
    assert shared is not None and len(shared.ids) >= local_gguf.MIN_SHARED_PREFIX_TOKENS
    # a later call whose prompts extend the kept prefix reuses it, single prompts included
    assert cached.generate(prompts[1:2], greedy) == one_pass[1:2]
    assert cached._prefix is shared


def test_sampler_draws_from_the_top_k_top_p_distribution() -> None:
    """The top-50 sampler keeps exactly the probabilities transformers' warpers would sample from."""
    import torch
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    scores = torch.randn(4, 1000) * 3
    scores[1, :990] = -float("inf")  # fewer finite tokens than top_k
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)])
    expected = warpers(None, scores.clone()).softmax(-1)
    sampler = local_gguf._TopKTopPSampler(temperature=0.7, top_p=0.9)
    candidates, probs = sampler.distribution(scores)
    got = torch.zeros_like(expected).scatter_(-1, candidates, probs / probs.sum(-1, keepdim=True))
    assert torch.allclose(got, expected, atol=1e-6)
    drawn = sampler(None, scores).argmax(-1)
    assert bool((expected.gather(-1, drawn[:, None]) > 0).all())


@pytest.mark.parametrize("base_url, remote", [
    (None, True), ("https://api.openai.com/v1", True), ("http://10.0.0.5:8000/v1", True),
    ("http://localhost:11434/v1", False), ("http://127.0.0.1:8080/v1", False), ("http://[::1]:8000/v1", False),
])
def test_only_a_server_on_this_machine_keeps_documents_local(base_url, remote):
    """The domain's remote opt-in applies where prompts leave the machine; a loopback server
    (Ollama, llama.cpp, vLLM on this host) needs neither the opt-in nor a key."""
    resource = LLMResource(backend="openai", base_url=base_url)
    assert resource.is_remote is remote
    assert resource.documents_go_to == (base_url or "https://api.openai.com/v1" if remote else None)
    assert resource.follows_instructions and not LLMResource().is_remote
    if not remote:
        assert isinstance(resource.backend_factory(Path("."))(), OpenAIBackend)


def test_the_backend_must_be_registered():
    with pytest.raises(ValueError, match="unknown LLM backend 'llamacpp'; known: local, openai"):
        LLMResource(backend="llamacpp")
