"""An OpenAI-compatible chat-completions server on 127.0.0.1 (real HTTP, the real openai client
talks to it) with scripted answers and failures: the LLM endpoint of the tests that are not about
the LLM's own output. The local model's real output is tested in test_lib_llm.py and in one run of
test_any_corpus.py and of the tiny `code` run."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def passage_words_query(prompt: str) -> str:
    """A stand-in generator: the longest distinct words of the prompt's last passage (never a copied
    span), so the query finds its document in a round trip; a judge's prompt gets candidate 1."""
    if "Which passage is most relevant" in prompt:
        return "1"
    passage = prompt.rsplit("Passage:", 1)[-1].split("\nQuery:")[0]
    words = list(dict.fromkeys(re.findall(r"[A-Za-z_][A-Za-z_]{3,}", passage)))
    return " ".join(sorted(words[:40], key=len, reverse=True)[:5]) or "what is this"
