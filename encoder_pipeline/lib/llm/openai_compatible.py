"""Any OpenAI-compatible chat-completions endpoint: OpenAI itself, or vLLM, llama.cpp server and
Ollama, on this machine or elsewhere."""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from encoder_pipeline.lib.llm.core import (
    BackendKind,
    BudgetExceeded,
    Completion,
    GenerationParams,
    LLMError,
    register_backend,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai client's own default
NO_KEY = "unused"  # servers on this machine (Ollama, llama.cpp) take no key; the client needs one

MAX_CHARS_PER_TOKEN = 16  # a completion longer than max_new_tokens of these ignored the limit


# openai's response models build their pydantic schemas on first use, and pydantic's lazy build is
# not thread-safe (model_rebuild deletes a model's schema before setting it again: a thread reading
# it then gets BaseModel's and fails with "BaseModel cannot be instantiated directly"). Requests
# run concurrently; only the parsing of their answers takes turns.
_PARSE_LOCK = threading.Lock()


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
    prompts_per_call = 8  # one chunk of requests between cache flushes (completions stream anyway)
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
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=params.seed,
            )
            with _PARSE_LOCK:
                response = raw.parse()
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


def on_this_machine(base_url: str | None) -> bool:
    """True when `base_url` names a loopback host (localhost, 127.0.0.0/8, ::1): prompts stay on
    this machine, unless that port forwards elsewhere (an SSH tunnel), which the URL cannot show."""
    host = urlparse(base_url or DEFAULT_BASE_URL).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _build(fields: dict, models_dir: str) -> OpenAIBackend:
    return OpenAIBackend(
        base_url=fields["base_url"], model=fields["model"], api_key=fields["api_key"] or NO_KEY,
        max_concurrency=fields["max_concurrency"], max_tokens_budget=fields["max_tokens_budget"],
        max_usd_budget=fields["max_usd_budget"],
        usd_per_1m_prompt_tokens=fields["usd_per_1m_prompt_tokens"],
        usd_per_1m_completion_tokens=fields["usd_per_1m_completion_tokens"],
    )


register_backend(BackendKind(
    key="openai",
    build=_build,
    documents_go_to=lambda fields: None if on_this_machine(fields["base_url"])
    else fields["base_url"] or DEFAULT_BASE_URL,
    model_label=lambda fields: fields["model"],
    follows_instructions=True,
))
