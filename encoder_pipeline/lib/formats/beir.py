"""A BEIR folder: `corpus.jsonl` with `_id`, `title` and `text` (its `queries.jsonl` and `qrels/`,
when present, are a judged set: `[judged]`)."""

import os
from pathlib import Path

import daft

from encoder_pipeline.lib.formats.base import CorpusFormat, Fields, Skipped, register, require_exists
from encoder_pipeline.lib.formats.jsonl import JSONL

CORPUS_FILE = "corpus.jsonl"


@register
class BEIR(CorpusFormat):
    key = "beir"
    uses_fields = False
    location_hint = ("a BEIR folder needs corpus.jsonl; set ENCODER_PIPELINE_CORPUS_ROOT or corpus.path "
                     "in the domain spec")

    @staticmethod
    def corpus_file(location: str) -> str:
        return location.rstrip("/") + "/" + CORPUS_FILE

    def read(self, location: str, fields: Fields, on_malformed: str = "fail",
             skipped: Skipped | None = None) -> daft.DataFrame:
        require_exists(self.corpus_file(location), self.location_hint)
        return JSONL().read(self.corpus_file(location), Fields(), on_malformed, skipped)

    def source_fields(self, location: str) -> list[str]:
        return JSONL().source_fields(self.corpus_file(location))

    def detects(self, location: str) -> bool:
        return "://" not in location and (Path(location) / CORPUS_FILE).is_file()

    def source_paths(self, location: str) -> list[str]:
        return [self.corpus_file(location)]

    def present(self, location: str) -> bool:
        return "://" in location or os.path.exists(self.corpus_file(location))
