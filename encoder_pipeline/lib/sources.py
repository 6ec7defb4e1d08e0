"""Reading a corpus and a judged set. Corpus formats live in `lib/formats/` (one module each, by
key); every reader yields the same columns: `doc_id`, `title`, `text`, `anchor` (the structural query
a unit carries, e.g. a docstring summary)."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import daft

from encoder_pipeline.lib import formats
from encoder_pipeline.lib.formats import CorpusError, Fields, Skipped
from encoder_pipeline.lib.formats.base import is_remote
from encoder_pipeline.lib.formats.jsonl import parse_line

__all__ = ["CorpusError", "Skipped", "fingerprint_files", "read_corpus", "read_judged"]


def read_corpus(fmt: str, location: str, id_field: str = "_id", title_field: str = "title",
                text_field: str = "text", exclude: list[str] | None = None,
                on_malformed: str = "fail", skipped: Skipped | None = None, *,
                include: list[str] | None = None) -> daft.DataFrame:
    """A lazy Daft frame with the corpus columns, from any registered format.

    Malformed entries (a local JSONL line that is not a UTF-8 JSON object or lacks the id the other
    lines carry; a `files` document that is not UTF-8) raise CorpusError naming file and line, or
    with `on_malformed="skip"` are left out and counted in `skipped`.
    """
    fields = Fields(id_field, title_field, text_field, tuple(exclude or ()), tuple(include or ()))
    return formats.get(fmt).read(location, fields, on_malformed, skipped)


def read_judged(location: str, split: str = "dev") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """BEIR queries and qrels: ({query_id: text}, {query_id: {doc_id: grade}}), judged queries only.
    A query none of whose documents is relevant (every grade 0) is left out: it scores 0 for every
    system and tells none apart. Its zero grades stay for the kept queries' pool coverage."""
    queries_path = Path(location) / "queries.jsonl"
    qrels_path = Path(location) / "qrels" / f"{split}.tsv"
    for path in (queries_path, qrels_path):
        if not path.exists():
            raise CorpusError(f"judged set incomplete: {path} not found")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        for row in reader:
            try:
                qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(row["score"])
            except (KeyError, TypeError, ValueError) as error:
                raise CorpusError(f"{qrels_path}:{reader.line_num}: expected query-id, corpus-id and an "
                                  f"integer score separated by tabs ({error!r})") from error
    queries = {}
    with queries_path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                record, problem = parse_line(line)
                if record is None or "_id" not in record or not isinstance(record.get("text"), str):
                    raise CorpusError(f"{queries_path}:{number}: "
                                      f"{problem or 'a query needs _id and text'}")
                if str(record["_id"]) in qrels:
                    queries[str(record["_id"])] = record["text"]
    qrels = {qid: grades for qid, grades in qrels.items() if any(grade > 0 for grade in grades.values())}
    queries = {qid: text for qid, text in queries.items() if qid in qrels}
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise CorpusError(f"{qrels_path}: {len(missing)} judged queries missing from {queries_path}, "
                          f"e.g. {missing[:3]}")
    return queries, qrels


def fingerprint_files(fmt: str, location: str) -> str:
    """A cheap fingerprint of a corpus's source files (path, size, mtime) for change detection."""
    if is_remote(location):
        return hashlib.sha256(location.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for path in formats.get(fmt).source_paths(location):
        if os.path.exists(path):
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
