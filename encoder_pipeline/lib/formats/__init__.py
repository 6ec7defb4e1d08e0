"""Corpus formats as a registry, one module per format; importing this package registers them all
(the order is detection's: a BEIR folder before any folder of files)."""

from encoder_pipeline.lib.formats import beir, csv, files, jsonl, parquet, python_stdlib, sqlite  # noqa: F401
from encoder_pipeline.lib.formats.base import (
    CORPUS_COLUMNS,
    REGISTRY,
    CorpusError,
    CorpusFormat,
    Fields,
    Skipped,
    detect,
    get,
)

__all__ = ["CORPUS_COLUMNS", "REGISTRY", "CorpusError", "CorpusFormat", "Fields", "Skipped", "detect", "get"]
