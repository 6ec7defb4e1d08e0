"""The judging page of `encoder-pipeline judge`: one local page where a person labels the pooled
candidates of each query relevant or not (the logic is `lib.judging`; this is the domain wiring and
the web layer).

Served by uvicorn on 127.0.0.1 only, every route behind a random token in the URL (403 without it),
no external assets (it works air-gapped): plain HTML and a little JavaScript that posts JSON back.

    session = open_session(load_domain("code"), store, PipelineSettings(), queries_file="queries.txt")
    token = secrets.token_urlsafe(24)
    serve(create_app(session, token, "code"), bind(0))
"""

from __future__ import annotations

import contextlib
import html
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from encoder_pipeline.defs.shared import embeddings_cache
from encoder_pipeline.defs.training.assets import RUNGS
from encoder_pipeline.domains import DomainSpec
from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.judging import (
    DEFAULT_DEPTH,
    DEFAULT_TARGET,
    TEACHER,
    JudgingError,
    JudgingSession,
    Pooler,
    default_folder,
    domain_systems,
    eval_queries,
    point_spec_at,
    read_judgments,
    read_query_file,
    training_queries,
)
from encoder_pipeline.lib.layout import read_corpus_units
from encoder_pipeline.resources import PipelineSettings

HOST = "127.0.0.1"
SECURITY_HEADERS = [  # no framing, no caching, and the token never leaves in a Referer
    (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", (b"default-src 'none'; script-src 'unsafe-inline'; "
                                  b"style-src 'unsafe-inline'; connect-src 'self'")),
]


def open_session(spec: DomainSpec, store: ArtifactStore, settings: PipelineSettings, *,
                 queries_file: str | Path | None = None, folder: str | Path | None = None,
                 depth: int = DEFAULT_DEPTH, target: int = DEFAULT_TARGET,
                 say: Callable[[str], None] = print) -> JudgingSession:
    """A judging session over the domain's cleaned corpus: queries from `queries_file`, else the
    domain's held-out eval queries; pools of BM25, the off-the-shelf model, the teacher and every
    published rung (the corpus embedded now, one line each through `say`). The spec's [judged]
    points at the folder once it holds a judgment (a run would fail on an empty judged set)."""
    if depth < 1 or target < 1:
        raise JudgingError(f"depth ({depth}) and target ({target}) must be at least 1")
    try:
        units = read_corpus_units(store, spec.name)
    except MissingArtifact as error:
        raise JudgingError(f"domain '{spec.name}' has no clean corpus under {store.root}: run "
                           f"`encoder-pipeline materialize --domain {spec.name}` first") from error
    folder = Path(folder or default_folder(store, spec.name)).resolve()
    if queries_file:
        queries = read_query_file(queries_file)
        say(f"queries: {len(queries):,} from {queries_file}")
    else:
        try:
            queries = eval_queries(store, spec.name)
            say(f"queries: the domain's {len(queries):,} held-out eval queries (--queries FILE: your own)")
        except MissingArtifact:
            queries = []
            say("queries: none yet (no --queries file, no eval_set): type them into the page")
    teacher = settings.teacher(spec.training.teacher_model)  # what a run would train with now
    systems, skipped = domain_systems(
        store, spec.name, units, base=settings.encoder(spec.trust_remote_code), teacher=teacher.model,
        rungs=RUNGS, cache_dir=embeddings_cache(store, spec.name))
    if teacher.fallback:  # a packaged teacher that is not installed: say so rather than "the base model"
        skipped[TEACHER] = teacher.fallback
    pooler = Pooler(systems, depth, settings.seed, skipped)
    pooler.prepare(say, lambda name: _progress(name, say))
    say(f"pooled: {', '.join(s.name for s in pooler.systems)} (top {depth} each)" + (
        "; not pooled: " + "; ".join(f"{name} ({why})" for name, why in pooler.skipped.items())
        if pooler.skipped else ""))

    def point_spec() -> None:
        try:
            before = point_spec_at(spec.source_file, folder)
        except JudgingError as error:  # the judgments are saved all the same
            say(f"warning: {error}")
            return
        was = f" (was {before})" if before and Path(spec.resolve(before)) != folder else ""
        say(f"spec {spec.source_file}: [judged] path = {folder}{was}; runs evaluate on it from now on")

    if read_judgments(folder):
        point_spec()
        on_first = None
    else:
        say(f"spec {spec.source_file}: [judged] will point at {folder} from the first judgment on")
        on_first = point_spec
    session = JudgingSession(folder, queries, pooler, units, target, on_first_judgment=on_first,
                             trained=training_queries(store, spec.name))
    if session.left_out:
        say(f"queries: {len(session.left_out):,} left out, since training used them (a judged set must "
            f"be unseen), e.g. {session.left_out[0]!r}")
    return session


def _progress(name: str, say: Callable[[str], None]) -> Callable[[int, int], None]:
    return lambda done, total: say(f"  {name}: embedded {done:,} of {total:,} new units")


class TokenRequired:
    """ASGI middleware: every HTTP request carries `?token=<token>` or gets 403."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            response = PlainTextResponse("forbidden: open the URL that `encoder-pipeline judge` printed, "
                                         "token included", status_code=403)
            await response(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(session: JudgingSession, token: str, domain: str, relevance: str = "") -> Starlette:
    """The page and its JSON API (state, judge, query), all behind the token."""
    page = (PAGE.replace("__DOMAIN__", html.escape(domain))
            .replace("__RELEVANCE__", html.escape(relevance or "the document is what the query asks for"))
            .replace("__TOKEN__", json.dumps(token)))

    async def index(_: Request) -> HTMLResponse:
        return HTMLResponse(page)

    def state(request: Request) -> JSONResponse:
        position = request.query_params.get("position")
        if position is not None and not position.lstrip("-").isdigit():
            return JSONResponse({"error": "position must be a number"}, status_code=400)
        return JSONResponse(session.state(None if position is None else int(position)))

    async def judge(request: Request) -> JSONResponse:
        try:
            query_id, doc_id, relevance = await _fields(request, "query_id", "doc_id", "relevance")
            return JSONResponse(await run_in_threadpool(session.judge, str(query_id), str(doc_id), relevance))
        except JudgingError as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    async def query(request: Request) -> JSONResponse:
        try:
            (text,) = await _fields(request, "text")
            position = await run_in_threadpool(session.add_query, str(text))
        except JudgingError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(await run_in_threadpool(session.state, position))

    return Starlette(routes=[Route("/", index), Route("/api/state", state),
                             Route("/api/judge", judge, methods=["POST"]),
                             Route("/api/query", query, methods=["POST"])],
                     middleware=[Middleware(TokenRequired, token=token)])


async def _fields(request: Request, *names: str) -> list:
    """The named fields of a JSON object body; JudgingError when it is not one or lacks them."""
    try:
        body = await request.json()
    except ValueError as error:
        raise JudgingError(f"the body is not JSON ({error})") from error
    missing = [name for name in names if not isinstance(body, dict) or name not in body]
    if missing:
        raise JudgingError(f"the body lacks {', '.join(missing)}")
    return [body[name] for name in names]


def bind(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one); connections queue until served."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _server(app: Starlette) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve until Ctrl-C (uvicorn shuts down gracefully, then re-raises the signal: swallowed here)."""
    with contextlib.suppress(KeyboardInterrupt):
        _server(app).run(sockets=[sock])


@contextlib.contextmanager
def running(app: Starlette, port: int = 0, timeout_s: float = 30) -> Iterator[str]:
    """Serve in a background thread; yields the base URL (`http://127.0.0.1:PORT`)."""
    sock, server = bind(port), _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the judging page's server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>judge: __DOMAIN__</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d232b; background: #f6f7f9; }
  header, main, footer { max-width: 980px; margin: 0 auto; padding: 0 20px; }
  header { display: flex; justify-content: space-between; align-items: baseline; padding-top: 14px; }
  h1 { font-size: 19px; margin: 0; }
  #progress { font-weight: 600; }
  #progress-bar { height: 6px; background: #dfe3e8; border-radius: 3px; margin: 8px 0 14px; }
  #progress-fill { height: 6px; background: #2f7d4f; border-radius: 3px; width: 0; }
  #query-bar { background: #fff; border: 1px solid #d6dbe1; border-radius: 8px; padding: 12px 16px; }
  #position { color: #5b6673; font-size: 13px; }
  #query-text { display: block; font-size: 20px; font-weight: 600; margin: 2px 0 8px; }
  .nav button, #new-query button { margin-right: 6px; }
  #new-query { display: flex; gap: 8px; margin: 12px 0; }
  #query-input { flex: 1; font: inherit; padding: 6px 10px; border: 1px solid #b9c1ca; border-radius: 6px; }
  #relevance { color: #5b6673; margin: 0 0 10px; }
  #candidates { list-style: none; padding: 0; margin: 0; }
  .candidate { background: #fff; border: 2px solid #d6dbe1; border-radius: 8px; padding: 10px 14px;
               margin-bottom: 10px; }
  .candidate.focused { border-color: #2d6cdf; box-shadow: 0 0 0 3px #2d6cdf33; }
  .candidate[data-label="1"] { background: #eef8f1; }
  .candidate[data-label="0"] { background: #f7f0f0; }
  .candidate h3 { font-size: 15px; margin: 0 0 4px; }
  .doc-id { color: #7a8591; font-size: 12px; font-weight: normal; margin-left: 8px; }
  .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; max-height: 220px;
          overflow: auto; background: #fafbfc; border: 1px solid #eceff2; padding: 6px 8px; margin: 0; }
  .actions { margin-top: 8px; display: flex; gap: 8px; align-items: center; }
  .label { margin-left: auto; font-weight: 600; }
  .candidate[data-label="1"] .label { color: #2f7d4f; }
  .candidate[data-label="0"] .label { color: #a33a3a; }
  button { font: inherit; padding: 4px 10px; border-radius: 6px; border: 1px solid #b9c1ca; background: #fff;
           cursor: pointer; }
  button:hover { background: #eef1f4; }
  #message { color: #a33a3a; min-height: 1.4em; }
  footer { color: #5b6673; font-size: 13px; padding-bottom: 20px; }
  kbd { border: 1px solid #b9c1ca; border-radius: 3px; padding: 0 4px; background: #fff; font-size: 12px; }
</style>
</head>
<body>
<header>
  <h1>Judging <span id="domain">__DOMAIN__</span></h1>
  <div id="progress"></div>
</header>
<main>
  <div id="progress-bar"><div id="progress-fill"></div></div>
  <section id="query-bar">
    <span id="position"></span>
    <span id="query-text"></span>
    <div class="nav">
      <button id="previous" type="button">&#9664; previous query <kbd>p</kbd></button>
      <button id="next" type="button">next query <kbd>n</kbd> &#9654;</button>
    </div>
  </section>
  <form id="new-query">
    <input id="query-input" name="query" autocomplete="off"
           placeholder="Type a query of your own and press Enter (shortcut: /)">
    <button type="submit">Judge this query</button>
  </form>
  <p id="relevance">Relevant means: __RELEVANCE__</p>
  <ol id="candidates"></ol>
  <p id="empty" hidden>No system found a candidate for this query. Press <kbd>n</kbd> for the next one.</p>
  <p id="message" role="status"></p>
</main>
<footer>
  <p><kbd>j</kbd>/<kbd>k</kbd> move &middot; <kbd>1</kbd> relevant &middot; <kbd>0</kbd> not relevant &middot;
     <kbd>n</kbd> next query &middot; <kbd>p</kbd> previous &middot; <kbd>/</kbd> type a query.
     Every judgment is saved at once; the latest label of a document counts.</p>
  <p id="systems"></p>
</footer>
<script>
const TOKEN = __TOKEN__;
let state = null, focus = 0;
const $ = (id) => document.getElementById(id);

function api(path, body) {
  const url = path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  return fetch(url, options).then(async (response) => {
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  });
}
function show(error) { $("message").textContent = String(error.message || error); }
// One state request at a time, the latest wish last: keys pressed faster than the server answers
// neither skip a step nor leave the server's current query behind the one shown.
let inFlight = false, queued = null, target = null;
function load(position) {
  queued = {position: position};
  if (!inFlight) sendQueued();
}
function sendQueued() {
  const position = queued.position;
  queued = null;
  inFlight = true;
  api("api/state" + (position === undefined ? "" : "?position=" + position)).then((next) => {
    inFlight = false;
    if (queued) sendQueued(); else render(next);
  }).catch((error) => { inFlight = false; target = null; show(error); });
}
// Judgments are posted in the order they are made, so a quick correction is the latest label.
let saving = Promise.resolve();
function labelText(label) {
  return label === 1 ? "relevant" : label === 0 ? "not relevant" : label === "saving" ? "saving..." : "not judged";
}
function firstUnjudged(from) {
  const candidates = state.candidates;
  for (let i = 0; i < candidates.length; i++) {
    const index = (from + i) % candidates.length;
    if (candidates[index].label === null) return index;
  }
  return Math.min(from, candidates.length - 1);
}
function paintProgress() {
  $("progress").textContent = state.judged_queries + " of " + state.target + " queries judged";
  $("progress-fill").style.width = Math.min(100, 100 * state.judged_queries / state.target) + "%";
}
function paint() {
  paintProgress();
  document.querySelectorAll(".candidate").forEach((item, index) => {
    const label = state.candidates[index].label;
    item.dataset.label = label === null ? "" : String(label);
    item.querySelector(".label").textContent = labelText(label);
    item.classList.toggle("focused", index === focus);
  });
  const focused = document.querySelector(".candidate.focused");
  if (focused) focused.scrollIntoView({block: "nearest"});
}
function render(next) {
  const sameQuery = state && state.query && next.query && state.query.id === next.query.id;
  state = next;
  target = null;
  $("message").textContent = "";
  $("position").textContent = state.query ? "Query " + (state.position + 1) + " of " + state.queries : "";
  $("query-text").textContent = state.query ? state.query.text : "No queries yet: type one below.";
  const list = $("candidates");
  list.replaceChildren();
  state.candidates.forEach((candidate, index) => {
    const item = document.createElement("li");
    item.className = "candidate";
    item.dataset.doc = candidate.doc_id;
    const title = document.createElement("h3");
    title.textContent = candidate.title || "(untitled)";
    const id = document.createElement("span");
    id.className = "doc-id";
    id.textContent = candidate.doc_id;
    title.append(id);
    const text = document.createElement("pre");
    text.className = "text";
    text.textContent = candidate.text + (candidate.cut ? "\\n[...]" : "");
    const actions = document.createElement("div");
    actions.className = "actions";
    for (const [relevance, name] of [[1, "Relevant"], [0, "Not relevant"]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = relevance ? "relevant" : "not-relevant";
      button.innerHTML = name + " <kbd>" + relevance + "</kbd>";
      button.addEventListener("click", () => { focus = index; judge(relevance); });
      actions.append(button);
    }
    const label = document.createElement("span");
    label.className = "label";
    actions.append(label);
    item.append(title, text, actions);
    item.addEventListener("click", () => { focus = index; paint(); });
    list.append(item);
  });
  $("empty").hidden = !state.query || state.candidates.length > 0;
  const skipped = Object.entries(state.skipped).map(([name, why]) => name + " (" + why + ")");
  $("systems").textContent = "Candidates pooled from " + state.systems.join(", ") +
    (skipped.length ? "; not pooled: " + skipped.join("; ") : "") + ". Which system found what is not shown.";
  if (!sameQuery) focus = state.candidates.length ? firstUnjudged(0) : 0;
  paint();
}
function judge(relevance) {
  const candidate = state.candidates[focus];
  if (!candidate || !state.query) return;
  const queryId = state.query.id;
  candidate.label = "saving";
  focus = firstUnjudged(focus);
  paint();
  const body = {query_id: queryId, doc_id: candidate.doc_id, relevance: relevance};
  saving = saving.then(() => api("api/judge", body)).then((progress) => {
    candidate.label = relevance;
    state.judged_queries = progress.judged_queries;
    if (state.query.id === queryId) paint(); else paintProgress();
  }).catch((error) => { show(error); load(); });
}
function move(step) {
  if (state && state.candidates.length) {
    focus = Math.max(0, Math.min(state.candidates.length - 1, focus + step));
    paint();
  }
}
function go(step) {
  if (!state || !state.query) return;
  const to = (target === null ? state.position : target) + step;
  if (to >= 0 && to < state.queries) {
    target = to;
    load(to);
  }
}
document.addEventListener("keydown", (event) => {
  if (event.target === $("query-input")) {
    if (event.key === "Escape") $("query-input").blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const actions = {"j": () => move(1), "k": () => move(-1), "1": () => judge(1), "0": () => judge(0),
                   "n": () => go(1), "p": () => go(-1), "/": () => $("query-input").focus()};
  if (actions[event.key]) {
    event.preventDefault();
    actions[event.key]();
  }
});
$("next").addEventListener("click", () => go(1));
$("previous").addEventListener("click", () => go(-1));
$("new-query").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query-input").value.trim();
  if (!text) return;
  api("api/query", {text: text}).then((next) => {
    $("query-input").value = "";
    $("query-input").blur();
    state = null;
    render(next);
  }).catch(show);
});
load();
</script>
</body>
</html>
"""
