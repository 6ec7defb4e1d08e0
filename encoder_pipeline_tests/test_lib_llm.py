"""Tests for lib/llm.py: a real local HTTP server plays the OpenAI endpoint; the real gemma runs."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from encoder_pipeline.lib import llm
from encoder_pipeline.lib.llm import (
    BudgetExceeded,
    Completion,
    GenerationParams,
    LocalGGUFBackend,
    OpenAIBackend,
    ResponseCache,
    ensure_local_gguf,
    generate_cached,
)

FAKE_KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
PROMPT_TOKENS = 10
COMPLETION_TOKENS = 5


class FakeOpenAIServer(ThreadingHTTPServer):
    """OpenAI chat-completions on 127.0.0.1 with scripted failures, counting every request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[int] = []  # status codes to answer first, one per request, then 200
        self.delay_s = 0.0
        self.null_content = False
        self.respond: Callable[[str], str] | None = None  # scripted answers, by prompt
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations: list[str] = []
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAIServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.authorizations.append(self.headers.get("Authorization", ""))
            status = server.script.pop(0) if server.script else 200
        try:
            time.sleep(server.delay_s)
            if self.path != "/v1/chat/completions":
                status = 404
            if status == 200:
                prompt = body["messages"][0]["content"]
                content = None if server.null_content else (
                    server.respond(prompt) if server.respond else f"answer to {prompt}")
                payload = {
                    "id": f"chatcmpl-{server.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": COMPLETION_TOKENS,
                        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                    },
                }
            else:
                payload = {"error": {"message": f"scripted {status}", "type": "server_error"}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("retry-after-ms", "10")  # keeps the client's backoff short
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow answer
        finally:
            with server.lock:
                server.in_flight -= 1


@contextlib.contextmanager
def serving(srv: FakeOpenAIServer) -> Iterator[FakeOpenAIServer]:
    """`srv` answering on a background thread for the duration of the block."""
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


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

    monkeypatch.setattr(llm.os, "replace", crash)
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
    monkeypatch.setattr(llm, "ROUND_TOKENS", 3)
    cached = LocalGGUFBackend(gemma.gguf_path, batch_size=2)
    assert cached.generate(prompts, greedy) == one_pass
    uncached = LocalGGUFBackend(gemma.gguf_path, batch_size=2, prefix_cache=False)
    assert uncached.generate(prompts, greedy) == one_pass
    shared = cached._prefix
    assert shared is not None and len(shared.ids) >= llm.MIN_SHARED_PREFIX_TOKENS
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
    sampler = llm._TopKTopPSampler(temperature=0.7, top_p=0.9)
    candidates, probs = sampler.distribution(scores)
    got = torch.zeros_like(expected).scatter_(-1, candidates, probs / probs.sum(-1, keepdim=True))
    assert torch.allclose(got, expected, atol=1e-6)
    drawn = sampler(None, scores).argmax(-1)
    assert bool((expected.gather(-1, drawn[:, None]) > 0).all())
