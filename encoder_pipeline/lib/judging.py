"""Building a domain's own judged set: queries, pooled candidates, and an append-only judgment log
with a BEIR view that runs read (`lib.sources.read_judged`).

**Pooling** (TREC-style depth-k): for each query, the union of every system's top `depth` documents
(BM25, the off-the-shelf model, the teacher, every trained rung), deduplicated, in an order drawn
from (query, seed, document) alone, so neither the order nor the position of a candidate says
which system found it or at what rank.

**The log** (`<folder>/judgments.jsonl`): one JSON object per judgment (query_id, query, doc_id,
relevance 0/1, time), appended and fsync'd at once; the latest label of a (query, document) pair
wins, so a mistake is corrected by judging again. A line torn by a kill mid-write is skipped when
read, and the next append starts a fresh line after it. After each append the BEIR view
(`queries.jsonl`, `qrels/<split>.tsv`) is rewritten from the whole log, each file by a rename, all
under an exclusive lock on `<folder>/.judgments.lock`: two pages on one domain never tear a file.
Qrels keep the 0 labels (a judged non-relevant document is information: pool coverage counts it).

Query ids are a hash of the normalized text (`lib.leakage.normalize`), so the same query typed
twice, or read from a file and from the log, is one query.

    systems, skipped = domain_systems(store, "code", units, base=EncoderHandle(...), teacher=...,
                                      rungs=RUNGS, cache_dir=...)
    session = JudgingSession(folder, read_query_file("queries.txt"), Pooler(systems), units)
    session.judge(session.state()["query"]["id"], doc_id, 1)
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.encoders import EncoderHandle, ModelError, resolve_model_path
from encoder_pipeline.lib.layout import (
    HEURISTIC_PAIRS,
    MINED_NEGATIVES,
    SYNTHETIC_QUERIES,
    corpus_texts,
    latest,
    read_eval_split,
    rung_model_path,
)
from encoder_pipeline.lib.leakage import normalize
from encoder_pipeline.lib.metrics import BM25Index, Run, dense_run
from encoder_pipeline.lib.packaged_models import PackageMissing
from encoder_pipeline.lib.vector_cache import Progress, cached_embeddings

LOG_FILE = "judgments.jsonl"
LOCK_FILE = ".judgments.lock"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
SPLIT = "dev"
JUDGED_DIR = "judged"  # the default folder, under the domain's artifact folder (gc leaves it alone)
DEFAULT_DEPTH = 10
DEFAULT_TARGET = 200  # queries: "a couple of hundred hand-checked examples"
UNITS_PER_DOCUMENT = 4  # units retrieved per pooled document: chunks of one document count once
PREFETCH = 16  # queries pooled together (one encoder batch per system)
BASELINE, TEACHER = "off_the_shelf", "teacher"  # the report's names for these systems
UNUSABLE_MODEL = (ModelError, PackageMissing)  # a dense system left out, with why


class JudgingError(ValueError):
    """Input the judging page cannot use; the message names the file, line or field."""


def query_id(text: str) -> str:
    """A stable id for a query: the same normalized text, the same id."""
    return "h-" + hashlib.sha1(normalize(text).encode()).hexdigest()[:16]


def blind_order(query: str, doc_ids: Iterable[str], seed: int = 0) -> list[str]:
    """The documents, deduplicated, in an order drawn from (query, seed, document) only."""
    return sorted(set(doc_ids), key=lambda doc: hashlib.sha1(f"{seed}:{query}:{doc}".encode()).hexdigest())


def pool(query: str, rankings: Mapping[str, Sequence[str]], depth: int = DEFAULT_DEPTH,
         seed: int = 0) -> list[str]:
    """TREC depth-k pooling: the union of each system's top `depth` (system -> document ids, best
    first), deduplicated, blind-ordered (`blind_order`)."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    return blind_order(query, [doc for ranking in rankings.values() for doc in ranking[:depth]], seed)


# ---- the judgment log and its BEIR view ------------------------------------------------------


@dataclass(frozen=True)
class Judgment:
    query_id: str
    query: str
    doc_id: str
    relevance: int
    time: str

    def line(self) -> bytes:
        return (json.dumps(self.__dict__, ensure_ascii=False, sort_keys=True) + "\n").encode()


def _parse(line: bytes) -> Judgment | None:
    try:
        record = json.loads(line)
        judgment = Judgment(**{key: record[key] for key in Judgment.__dataclass_fields__})
    except (ValueError, TypeError, KeyError):
        return None
    valid = (all(isinstance(getattr(judgment, key), str) for key in ("query_id", "query", "doc_id"))
             and type(judgment.relevance) is int and judgment.relevance in (0, 1))
    return judgment if valid else None


def read_judgments(folder: str | Path) -> list[Judgment]:
    """Every judgment in the log, in order; lines that do not parse (a line torn by a kill
    mid-write) are skipped."""
    path = Path(folder) / LOG_FILE
    if not path.exists():
        return []
    return [j for j in map(_parse, path.read_bytes().splitlines()) if j is not None]


def judged_set_summary(folder: str | Path) -> dict | None:
    """How much a judging log holds: queries, judgments (latest per pair), relevant ones, and when it
    last grew (the last judgment's time); None when the folder has no log (a judged set made elsewhere)."""
    judgments = read_judgments(folder)
    if not judgments:
        return None
    labels = latest_labels(judgments)
    return {"queries": len({qid for qid, _ in labels}), "judgments": len(labels),
            "relevant": sum(labels.values()), "last_grew": judgments[-1].time}


def latest_labels(judgments: Sequence[Judgment]) -> dict[tuple[str, str], int]:
    """(query id, document id) -> relevance; the latest judgment of a pair wins."""
    return {(j.query_id, j.doc_id): j.relevance for j in judgments}


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The folder's writer lock (fcntl.flock: per open file, so threads and processes alike)."""
    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def write_beir_view(folder: str | Path, judgments: Sequence[Judgment], split: str = SPLIT) -> None:
    """`queries.jsonl` and `qrels/<split>.tsv` from the log (latest labels), each replaced by a
    rename; queries first, so a reader between the two renames finds every qrels query."""
    folder = Path(folder)
    texts = {}
    for judgment in judgments:
        texts.setdefault(judgment.query_id, judgment.query)
    queries = "".join(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n"
                      for qid, text in texts.items())
    rows = "".join(f"{qid}\t{doc}\t{relevance}\n" for (qid, doc), relevance in latest_labels(judgments).items())
    _write_atomic(folder / QUERIES_FILE, queries)
    _write_atomic(folder / QRELS_DIR / f"{split}.tsv", "query-id\tcorpus-id\tscore\n" + rows)


def append_judgment(folder: str | Path, query: str, doc_id: str, relevance: int,
                    split: str = SPLIT) -> Judgment:
    """Append one judgment to the log (fsync'd before returning) and rewrite the BEIR view, under
    the folder's lock."""
    if type(relevance) is not int or relevance not in (0, 1):
        raise JudgingError(f"relevance must be 0 or 1, not {relevance!r}")
    if not query.strip() or not doc_id:
        raise JudgingError("a judgment needs a query and a document id")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    judgment = Judgment(query_id(query), query, doc_id, relevance,
                        datetime.now(UTC).isoformat(timespec="milliseconds"))
    with _locked(folder):
        fd = os.open(folder / LOG_FILE, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a kill mid-write: end that line
            os.write(fd, (b"\n" if torn else b"") + judgment.line())
            os.fsync(fd)
        finally:
            os.close(fd)
        write_beir_view(folder, read_judgments(folder), split)
    return judgment


# ---- where queries come from ------------------------------------------------------------------


def read_query_file(path: str | Path) -> list[str]:
    """A user's real queries: one per line, or JSONL with a `text` or `query` field (a `.jsonl`
    file, or one whose first line is a JSON object). Blank lines are skipped; queries that normalize
    alike are one. Raises JudgingError naming the file and line of a malformed entry."""
    path = Path(path)
    try:
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as error:
        raise JudgingError(f"{path}: cannot read the queries file ({error.strerror})") from error
    lines = raw.splitlines()
    first = next((line.strip() for line in lines if line.strip()), b"")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or first.startswith(b"{")
    queries: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise JudgingError(f"{path}:{number}: not UTF-8 text ({error.reason})") from error
        if not text:
            continue
        if jsonl:
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise JudgingError(f"{path}:{number}: not a JSON object ({error.msg}); a JSONL queries "
                                   "file holds one object per line with a `text` or `query` field") from error
            value = record.get("text", record.get("query")) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise JudgingError(f"{path}:{number}: no `text` or `query` field holding the query")
            text = value.strip()
        queries.setdefault(query_id(text), text)
    if not queries:
        raise JudgingError(f"{path}: no queries in the file")
    return list(queries.values())


def training_queries(store: ArtifactStore, domain: str) -> set[str]:
    """The queries (normalized by `lib.leakage.normalize`) of the domain's published training rows:
    structural pairs, synthetic queries, mined rows. A judged set must be unseen, so these are never
    offered for judging."""
    trained: set[str] = set()
    for asset in (HEURISTIC_PAIRS, SYNTHETIC_QUERIES, MINED_NEGATIVES):
        try:
            trained.update(map(normalize, latest(store, domain, asset).rows()["query"]))
        except MissingArtifact:
            continue
    return trained


def eval_queries(store: ArtifactStore, domain: str) -> list[str]:
    """The domain's held-out eval queries (eval_set's eval side; never the dev slice, which steers
    training, nor any training query)."""
    return list(read_eval_split(store, domain).eval.queries.values())


def default_folder(store: ArtifactStore, domain: str) -> Path:
    return store.domain_dir(domain) / JUDGED_DIR


# ---- the spec's [judged] table ------------------------------------------------------------------

_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _table_headers(lines: Sequence[str]) -> list[tuple[int, str]]:
    """(line number, table name) of each table header outside multi-line strings."""
    headers, open_quote = [], None
    for number, line in enumerate(lines):
        if open_quote is None and (match := _TABLE_HEADER.match(line)):
            headers.append((number, match.group(1).strip()))
        position = 0
        while True:
            found = [(line.find(q, position), q) for q in (['"""', "'''"] if open_quote is None else [open_quote])]
            found = [(at, q) for at, q in found if at >= 0]
            if not found:
                break
            at, quote = min(found)
            open_quote = None if open_quote else quote
            position = at + 3
    return headers


def point_spec_at(spec_file: str | Path, folder: str | Path, split: str = SPLIT) -> str | None:
    """Make the spec's `[judged]` table `path = "<folder>"`, `split = "<split>"`: the table is
    replaced, or appended when there is none; every other line stays as it was. Written by a rename,
    after checking that the file parses to the same spec but for `judged`. Returns the path the spec
    pointed at before (None: no [judged])."""
    spec_file, folder = Path(spec_file), Path(folder).resolve()
    text = spec_file.read_text(encoding="utf-8")
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise JudgingError(f"{spec_file}: not valid TOML: {error}") from error
    table = ["[judged]", f"path = {json.dumps(str(folder), ensure_ascii=False)}",
             f"split = {json.dumps(split)}"]
    lines = text.splitlines()
    headers = _table_headers(lines)
    start = next((number for number, name in headers if name == "judged"), None)
    if start is None:
        lines += ([""] if lines and lines[-1].strip() else []) + table
    else:
        end = next((number for number, _ in headers if number > start), len(lines))
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1  # blank lines and comments before the next table belong to it
        lines[start:end] = table
    new_text = "\n".join(lines) + "\n"
    expected = {**before, "judged": {"path": str(folder), "split": split}}
    try:
        rewritten = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError:
        rewritten = None
    if rewritten != expected:
        raise JudgingError(f"{spec_file}: could not rewrite its [judged] table in place; set it by hand:\n"
                           + "\n".join(table))
    if new_text != text:
        with tempfile.NamedTemporaryFile("w", dir=spec_file.parent, prefix=f".{spec_file.name}.",
                                         delete=False, encoding="utf-8") as handle:
            handle.write(new_text)
        os.replace(handle.name, spec_file)
    return (before.get("judged") or {}).get("path")


# ---- the systems that are pooled -----------------------------------------------------------------

Ranker = Callable[[dict[str, str], int], Run]  # (queries by id, units to retrieve) -> document-level run


@dataclass
class RankingSystem:
    """One pooled system: `rank` answers a batch of queries over the corpus's units; `prepare`
    does the one-off work (embedding the corpus) and reports its progress."""

    name: str
    rank: Ranker
    prepare: Callable[[Progress | None], None] = lambda progress: None
    model: str = ""  # the model folder or name of a dense system


class _Lexical:
    """BM25 over the corpus's units, indexed once by `prepare` (not per batch of queries)."""

    def __init__(self, units: pd.DataFrame):
        self.texts, self.parents = corpus_texts(units), list(units["parent_id"])
        self.index: BM25Index | None = None

    def prepare(self, progress: Progress | None = None) -> None:
        if self.index is None:
            self.index = BM25Index(self.texts, self.parents)

    def rank(self, queries: dict[str, str], k: int) -> Run:
        self.prepare()
        return self.index.run(queries, k)


def bm25_system(units: pd.DataFrame) -> RankingSystem:
    lexical = _Lexical(units)
    return RankingSystem("bm25", lexical.rank, lexical.prepare)


class _Dense:
    """Exact search over the corpus embedded by one model (through the shared embedding cache)."""

    def __init__(self, encoder: EncoderHandle, units: pd.DataFrame, cache_dir: Path):
        self.encoder, self.cache_dir = encoder, cache_dir
        self.texts, self.parents = corpus_texts(units), list(units["parent_id"])
        self.vectors = None

    def prepare(self, progress: Progress | None = None) -> None:
        if self.vectors is None:
            self.vectors = cached_embeddings(self.encoder, self.texts, self.cache_dir, progress)

    def rank(self, queries: dict[str, str], k: int) -> Run:
        self.prepare()
        qids = list(queries)
        return dense_run(self.encoder.encode([queries[q] for q in qids]), self.vectors, qids, self.parents, k)


def dense_system(name: str, encoder: EncoderHandle, units: pd.DataFrame, cache_dir: str | Path) -> RankingSystem:
    dense = _Dense(encoder, units, Path(cache_dir))
    return RankingSystem(name, dense.rank, dense.prepare, encoder.model)


def domain_systems(store: ArtifactStore, domain: str, units: pd.DataFrame, *, base: EncoderHandle,
                   teacher: str, rungs: Sequence[str], cache_dir: str | Path
                   ) -> tuple[list[RankingSystem], dict[str, str]]:
    """BM25, the off-the-shelf model (`base`), the teacher and every rung whose model is published
    (each run as `base` is), over the corpus's units; and the systems left out, with why."""
    def dense(name: str, model: str) -> RankingSystem:
        return dense_system(name, base.at(model), units, cache_dir)

    systems, skipped = [bm25_system(units), dense(BASELINE, base.model)], {}
    try:
        same = not teacher or resolve_model_path(teacher) == resolve_model_path(base.model)
    except UNUSABLE_MODEL as error:
        skipped[TEACHER] = str(error)
    else:
        if same:
            skipped[TEACHER] = "it is the off-the-shelf model"
        else:
            systems.append(dense(TEACHER, teacher))
    for rung in rungs:
        try:
            path = rung_model_path(store, domain, rung)
        except MissingArtifact:
            skipped[rung] = "not materialized"
            continue
        if path.is_dir():
            systems.append(dense(rung, str(path)))
        else:
            skipped[rung] = f"its model folder is gone ({path})"
    return systems, skipped


class Pooler:
    """Each query's pool over `systems`, computed on demand a batch at a time and kept in memory.
    A dense system whose model does not load is left out, with why, in `skipped`."""

    def __init__(self, systems: Sequence[RankingSystem], depth: int = DEFAULT_DEPTH, seed: int = 0,
                 skipped: Mapping[str, str] | None = None):
        if depth < 1:
            raise JudgingError("depth must be at least 1")
        self.systems, self.depth, self.seed = list(systems), depth, seed
        self.skipped = dict(skipped or {})
        self._ready: set[str] = set()
        self._pools: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def prepare(self, say: Callable[[str], None] | None = None,
                progress: Callable[[str], Progress] | None = None) -> None:
        """Embed the corpus for every system not yet ready (`say`: one line per system;
        `progress(name)`: a progress callback for it)."""
        for system in list(self.systems):
            if system.name in self._ready:
                continue
            if say and system.model:
                say(f"embedding the corpus with {system.name} ({system.model})")
            try:
                system.prepare(progress(system.name) if progress else None)
            except UNUSABLE_MODEL as error:
                self.systems.remove(system)
                self.skipped[system.name] = str(error)
                continue
            self._ready.add(system.name)

    def pools(self, queries: Mapping[str, str]) -> dict[str, list[str]]:
        """query id -> its pooled document ids, for `queries` (id -> text)."""
        with self._lock:
            missing = {qid: text for qid, text in queries.items() if qid not in self._pools}
            if missing:
                self.prepare()
                runs = [system.rank(missing, self.depth * UNITS_PER_DOCUMENT) for system in self.systems]
                for qid in missing:
                    rankings = {system.name: [doc for doc, _ in sorted(run.get(qid, {}).items(),
                                                                        key=lambda kv: (-kv[1], kv[0]))]
                                for system, run in zip(self.systems, runs, strict=True)}
                    self._pools[qid] = pool(qid, rankings, self.depth, self.seed)
            return {qid: self._pools[qid] for qid in queries}


# ---- a judging session: what the page shows and records ---------------------------------------

DISPLAY_CHARS = 6000  # of a document's text sent to the page


def documents(units: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Document id -> (title, text): a chunked document's units joined in order (chunks end at a
    word: `lib.corpus.chunk_words`)."""
    grouped = units.groupby("parent_id", sort=False).agg(title=("title", "first"), text=("text", " ".join))
    return {str(doc): (row.title or "", row.text) for doc, row in grouped.iterrows()}


class JudgingSession:
    """One domain's judging: the queries in order (those in the log first, as first judged, then the
    source queries not yet judged, then any typed in), their candidates with the labels the log holds,
    and the position to resume at. `on_first_judgment` runs once, after the first judgment this
    folder receives (the CLI points the spec's [judged] at the folder then)."""

    def __init__(self, folder: str | Path, queries: Sequence[str], pooler: Pooler, units: pd.DataFrame,
                 target: int = DEFAULT_TARGET, split: str = SPLIT,
                 on_first_judgment: Callable[[], None] | None = None, trained: AbstractSet[str] = frozenset()):
        if target < 1:
            raise JudgingError("target must be at least 1")
        self.folder, self.pooler, self.target, self.split = Path(folder), pooler, target, split
        self.on_first_judgment = on_first_judgment
        self.trained = trained  # `training_queries`: source queries among them are left out, typed ones refused
        self.left_out = [text for text in queries if normalize(text) in trained]
        self.documents = documents(units)
        self.texts: dict[str, str] = {}
        self.order: list[str] = []
        self._lock = threading.RLock()
        judgments = read_judgments(self.folder)
        for judgment in judgments:
            self._add(judgment.query_id, judgment.query, len(self.order))
        for text in queries:
            if normalize(text) not in trained:
                self._add(query_id(text), text, len(self.order))
        self.position = self._resume_position(judgments)

    def _add(self, qid: str, text: str, at: int) -> int:
        if qid not in self.texts:
            self.texts[qid] = text
            self.order.insert(at, qid)
        return self.order.index(qid)

    def _resume_position(self, judgments: Sequence[Judgment]) -> int:
        """The last judged query while some of its candidates are unjudged, else the first query
        never judged."""
        labels = latest_labels(judgments)
        if judgments:
            last = judgments[-1].query_id
            if any((last, doc) not in labels for doc in self.pooler.pools({last: self.texts[last]})[last]):
                return self.order.index(last)
        judged = {qid for qid, _ in labels}
        return next((i for i, qid in enumerate(self.order) if qid not in judged), max(len(self.order) - 1, 0))

    def add_query(self, text: str) -> int:
        """A query typed into the page, placed after the current one (a known one: where it is);
        it becomes the current query. Returns its position."""
        text = text.strip()
        if not text:
            raise JudgingError("an empty query")
        if normalize(text) in self.trained:
            raise JudgingError("training used this query (a structural pair or a synthetic query): the "
                               "encoders have seen it, so judging it would flatter them; type another")
        with self._lock:
            at = min(self.position + 1, len(self.order))
            self.position = self._add(query_id(text), text, at)
            return self.position

    def state(self, position: int | None = None) -> dict:
        """What the page shows at `position` (None: the current one, which it becomes): the query,
        its candidates (blind order, with title, text and the log's label), the progress, the systems."""
        with self._lock:
            if position is not None:
                self.position = min(max(position, 0), max(len(self.order) - 1, 0))
            labels = latest_labels(read_judgments(self.folder))  # another page may have judged meanwhile
            state = {"position": self.position, "queries": len(self.order), "target": self.target,
                     "judged_queries": len({qid for qid, _ in labels}), "query": None, "candidates": [],
                     "systems": [s.name for s in self.pooler.systems], "skipped": self.pooler.skipped}
            if not self.order:
                return state
            qid = self.order[self.position]
            window = self.order[self.position:self.position + PREFETCH]
            pooled = self.pooler.pools({q: self.texts[q] for q in window})[qid]
            judged = [doc for q, doc in labels if q == qid]
            candidates = []
            for doc in blind_order(qid, pooled + judged, self.pooler.seed):
                title, text = self.documents.get(doc, ("", "(this document is no longer in the corpus)"))
                candidates.append({"doc_id": doc, "title": title, "text": text[:DISPLAY_CHARS],
                                   "cut": len(text) > DISPLAY_CHARS, "label": labels.get((qid, doc))})
            return {**state, "query": {"id": qid, "text": self.texts[qid]}, "candidates": candidates}

    def judge(self, qid: str, doc_id: str, relevance: int) -> dict:
        """Record a judgment (appended to the log, the BEIR view rewritten); returns the progress."""
        with self._lock:
            if qid not in self.texts:
                raise JudgingError(f"unknown query id {qid!r}")
            first = not (self.folder / LOG_FILE).exists()
            append_judgment(self.folder, self.texts[qid], doc_id, relevance, self.split)
            if first and self.on_first_judgment:
                self.on_first_judgment()
            labels = latest_labels(read_judgments(self.folder))
            return {"judged_queries": len({q for q, _ in labels}), "target": self.target}
