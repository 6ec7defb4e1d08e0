"""Domain specs: one TOML file per domain under `data/domains/`, and the `domain` partitions.

A domain differs from another by its spec file only: where its corpus lives, what a retrievable unit
is, what a query looks like, which structural pairs it has, and the targets committed before
building. Every field is validated (unknown keys are errors) so a typo fails at load time with the
file and the field in the message, not halfway through a run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dagster as dg
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from encoder_pipeline.lib.extractors import REGISTRY as EXTRACTORS
from encoder_pipeline.lib.extractors.base import MIN_QUERY_WORDS
from encoder_pipeline.lib.formats import REGISTRY as FORMATS
from encoder_pipeline.paths import confined, corpus_root, domains_dir

domain_partitions = dg.DynamicPartitionsDefinition(name="domain")

DOMAIN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
AUTO = "auto"


class SpecError(ValueError):
    """A domain spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusSource(_Strict):
    format: str = Field(description=f"One of the registered formats (lib/formats/): {', '.join(FORMATS)}.")
    path: str = Field(
        "",
        description="BEIR folder, file glob, (files) a folder of .txt/.md/.html documents, or "
        "(sqlite) file.db#table, relative to $ENCODER_PIPELINE_CORPUS_ROOT unless absolute or a URI "
        "(s3://, gs://, az://, http(s)://). Unused for python_stdlib.",
    )
    id_field: str = "_id"
    title_field: str = "title"
    text_field: str = "text"
    exclude: list[str] = Field(
        default_factory=list, description="python_stdlib: package folders left out of the corpus."
    )
    include: list[str] = Field(
        default_factory=list, description="python_stdlib: only these top-level packages or modules "
        "(empty: the whole standard library but `exclude`)."
    )
    license: str = Field(
        "", description="The corpus's licence or terms of use, repeated in the exported model card."
    )
    on_malformed: Literal["fail", "skip"] = Field(
        "fail", description="A JSONL line that is not a UTF-8 JSON object (or lacks the id the other "
        "lines have), or a `files` document that is not UTF-8: `fail` names it and stops; `skip` "
        "leaves it out and counts it in clean_corpus's metadata.",
    )

    @pydantic.field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r}; known: {', '.join(FORMATS)}")
        return value

    @pydantic.model_validator(mode="after")
    def _fits_the_format(self) -> CorpusSource:
        """Combinations that cannot work fail at load, not minutes into a run."""
        corpus_format = FORMATS[self.format]
        if corpus_format.uses_location and not self.path:
            raise ValueError(f"format {self.format!r} needs corpus.path")
        if not corpus_format.uses_location and self.path:
            raise ValueError(f"format {self.format!r} reads no path; remove corpus.path")
        if (self.exclude or self.include) and not corpus_format.selects_packages:
            raise ValueError(f"corpus.exclude and corpus.include select packages; format {self.format!r} "
                             "has none")
        return self


class UnitSpec(_Strict):
    name: str = Field(description="What one retrievable unit is, in words (shown in the report).")
    max_words: int = Field(
        0, ge=0, description="Split longer documents into chunks of this many words (0: never)."
    )
    min_words: int = Field(3, ge=0, description="Drop units whose title+text has fewer words.")
    normalize_whitespace: bool = Field(
        True, description="Collapse runs of whitespace (off for code, where layout is content)."
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=list, description="Regexes; a unit whose whole text matches one is dropped."
    )


class DedupeSpec(_Strict):
    num_hashes: int = Field(64, ge=8)
    ngram_size: int = Field(5, ge=1)
    bands: int = Field(16, ge=1, description="LSH bands; num_hashes must divide evenly.")
    jaccard_threshold: float = Field(0.8, gt=0, le=1)


class FewShotExample(_Strict):
    passage: str
    query: str


class QuerySpec(_Strict):
    form: str = Field(description="What a user's query looks like.")
    relevance: str = Field(description="When a unit is relevant to a query.")
    hard_negative: str = Field(description="What a unit that looks relevant but is not looks like.")
    pair_extractor: list[str] = Field(
        default_factory=lambda: [AUTO], description="Training-pair extractors (lib/extractors): "
        f"one or several of {', '.join(sorted(EXTRACTORS))}, or \"{AUTO}\" (chosen from a sample "
        "of the corpus when a run starts, as `encoder-pipeline domain add` does). A string is one.")
    examples: list[FewShotExample] = Field(
        default_factory=list, description="Few-shot examples for the synthetic-query prompt (the local "
        "LLM is a base model: without examples it writes whatever continues the text best)."
    )
    min_words: int = Field(
        MIN_QUERY_WORDS, ge=1, description="Queries (structural and synthetic) with fewer words are dropped as "
        "fragments; lower it where a query is a name (a gene, a term, a product)."
    )

    @pydantic.field_validator("pair_extractor", mode="before")
    @classmethod
    def _extractors(cls, value: str | list[str]) -> list[str]:
        keys = [value] if isinstance(value, str) else list(value)
        unknown = [key for key in keys if key not in EXTRACTORS and key != AUTO]
        if unknown or not keys:
            raise ValueError(f"unknown extractor(s) {unknown}; choose from {sorted(EXTRACTORS)} or "
                             f"\"{AUTO}\"")
        if AUTO in keys and len(keys) > 1:
            raise ValueError(f"\"{AUTO}\" chooses the extractors itself: give it alone")
        return keys


class JudgedSet(_Strict):
    path: str = Field(description="BEIR folder with queries.jsonl and qrels/<split>.tsv.")
    split: str = "dev"


class Targets(_Strict):
    ndcg_at_10: float = Field(ge=0, le=1)
    p95_latency_ms: float = Field(gt=0)
    index_mb: float = Field(gt=0)
    usd_per_1k_queries: float = Field(gt=0)


class DriftSpec(_Strict):
    """When `corpus_drift_sensor` asks for a retrain rather than an incremental index refresh;
    every figure is measured against the corpus snapshot the served encoder was trained on."""

    retrain_changed_fraction: float = Field(
        0.10, gt=0, le=1, description="Retrain when documents added + changed + removed since "
        "training reach this share of the training corpus.")
    retrain_new_token_share: float = Field(
        0.02, gt=0, le=1, description="Retrain when this share of the corpus's tokens are terms the "
        "training corpus never had (vocabulary shift).")
    canary_recall_drop: float = Field(
        0.05, gt=0, le=1, description="Retrain when the served encoder's eval Recall@10 over the new "
        "corpus falls this much below its Recall@10 over the indexed one (the canary).")
    min_hours_between_retrains: float = Field(
        24.0, ge=0, description="Never request a retrain sooner than this after the last one.")


class TrainingSpec(_Strict):
    fine_tuned_weight: float | None = Field(
        None, ge=0, le=1, description="WiSE-FT: each rung's weights become this share of the fine-tuned "
        "ones plus the rest of the base model's. Unset: chosen per rung on the dev slice among 1, 0.75, "
        "0.5, 0.25 and 0 (the base model, when no merge beats it beyond noise; the `tiny` test profile "
        "tries 1, 0.5 and 0); set it to override.")
    teacher_model: str = Field(
        "", description="Override of the teacher (it mines hard negatives, and its scores of each "
        "batch are distilled into every rung); empty: the profile's (all-mpnet-base-v2 by default). "
        "The run's `settings.teacher_model` overrides both.")
    distill_weight: float | None = Field(
        None, ge=0, description="Override of the weight of distilling the teacher's scores of each "
        "query's in-batch candidates (KL at the InfoNCE scale); unset: the recipe's 0.25; 0: off.")


class DomainSpec(_Strict):
    name: str
    description: str = ""
    corpus: CorpusSource
    unit: UnitSpec
    queries: QuerySpec
    dedupe: DedupeSpec = DedupeSpec()
    judged: JudgedSet | None = None
    targets: Targets
    drift: DriftSpec = DriftSpec()
    training: TrainingSpec = TrainingSpec()
    extra_models: list[str] = Field(
        default_factory=list,
        description="More baselines for the report: sentence-transformers folders (or hub names), "
        "evaluated on the eval set like the off-the-shelf model.",
    )
    remote_llm_allowed: bool = Field(
        False, description="Opt in to sending document text to an LLM endpoint off this machine "
        "(a server on a loopback address counts as this machine)."
    )
    trust_remote_code: bool = Field(
        False, description="Opt in to running the Python code shipped inside model folders (a config's "
        "`auto_map`): the base model, the teacher, `extra_models` and the checkpoints trained from them. "
        "Set it only for models whose code you trust.",
    )
    source_file: str = Field("", exclude=True)

    @pydantic.field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not DOMAIN_NAME.match(value):
            raise ValueError("must be lower-case letters, digits and '_', starting with a letter")
        return value

    def resolve(self, location: str) -> str:
        """A spec path made absolute: URIs and absolute paths as given (the user wrote them out),
        relative ones under the corpus root, which their `..` parts may not leave."""
        if "://" in location or os.path.isabs(location):
            return location
        try:
            return str(confined(corpus_root(), location))
        except ValueError as error:
            raise SpecError(f"{self.source_file or self.name}: {error} (the corpus root, "
                            "$ENCODER_PIPELINE_CORPUS_ROOT)") from error

    def corpus_location(self) -> str:
        """Where the corpus is read from ("" for a built-in corpus, which has no path)."""
        return self.resolve(self.corpus.path) if self.corpus.path else ""

    def judged_location(self) -> str | None:
        return self.resolve(self.judged.path) if self.judged else None


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def load_spec(path: str | Path) -> DomainSpec:
    """Parse and validate one spec file; every error names the file and the field."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise SpecError(f"{path}: no such spec file") from error
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML: {error}") from error
    try:
        spec = DomainSpec.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"field '{_field_path(e['loc'])}': "
            + ("unknown field" if e["type"] == "extra_forbidden" else e["msg"])
            for e in error.errors()
        )
        raise SpecError(f"{path}: {problems}") from error
    if spec.name != path.stem:
        raise SpecError(f"{path}: field 'name' is '{spec.name}' but the file is named '{path.stem}'")
    for field, location in (("corpus.path", spec.corpus.path),
                            ("judged.path", spec.judged.path if spec.judged else "")):
        if location and "://" not in location and not os.path.isabs(location):
            try:
                confined(corpus_root(), location)
            except ValueError as error:
                raise SpecError(f"{path}: field '{field}': {error} (the corpus root, "
                                "$ENCODER_PIPELINE_CORPUS_ROOT)") from error
    if spec.dedupe.num_hashes % spec.dedupe.bands:
        raise SpecError(f"{path}: field 'dedupe.bands' must divide 'dedupe.num_hashes'")
    for pattern in spec.unit.boilerplate_patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise SpecError(
                f"{path}: field 'unit.boilerplate_patterns': bad regex {pattern!r}: {error}"
            ) from error
    return spec.model_copy(update={"source_file": str(path)})


def spec_files(directory: Path | None = None) -> list[Path]:
    return sorted((directory or domains_dir()).glob("*.toml"))


def domain_names(directory: Path | None = None) -> list[str]:
    """Names of every spec file present, valid or not (an invalid one fails when it runs)."""
    return [path.stem for path in spec_files(directory) if DOMAIN_NAME.match(path.stem)]


@dataclass(frozen=True)
class PartitionSync:
    """What the `domain` partitions need so that they match the spec files: `add` (valid specs
    without a partition), `remove` (partitions whose spec file is gone; their artifacts stay on disk
    until `gc`), and `invalid` (spec files that do not load, by name: never registered)."""

    add: list[str]
    remove: list[str]
    invalid: dict[str, str]


def partition_sync(existing: Iterable[str], directory: Path | None = None) -> PartitionSync:
    names, invalid = domain_names(directory), {}
    for name in names:
        try:
            load_domain(name, directory)
        except SpecError as error:
            invalid[name] = str(error)
    existing = set(existing)
    return PartitionSync([n for n in names if n not in existing and n not in invalid],
                         sorted(existing - set(names)), invalid)


def load_domain(name: str, directory: Path | None = None) -> DomainSpec:
    directory = directory or domains_dir()
    if not DOMAIN_NAME.match(name):  # a partition key or --domain becomes a file name: no "../"
        raise SpecError(f"domain name {name!r}: use lowercase letters, digits and _, "
                        "starting with a letter")
    path = directory / f"{name}.toml"
    if not path.exists():
        known = ", ".join(domain_names(directory)) or "none"
        raise SpecError(f"{path}: no spec for domain '{name}' (known domains: {known})")
    return load_spec(path)


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def new_spec_text(name: str, corpus_format: str, corpus_path: str, *, id_field: str = "_id",
                  title_field: str = "title", text_field: str = "text", judged: str | None = None,
                  description: str = "", extractors: list[str] | None = None,
                  extractor_notes: list[str] = (), code: bool = False, on_malformed: str = "fail") -> str:
    """A spec for a user's corpus with generic defaults: paragraphs of up to 200 words (whole
    functions for code, layout kept), questions as queries, the extractors `domain add` found usable
    (each one's finding as a comment), placeholder targets to commit to (edit them before building).
    No few-shot examples are needed: built-in ones and the corpus's own structure stand in."""
    unit = (["name = \"a function or code snippet\"", "max_words = 0", "min_words = 5",
             "normalize_whitespace = false  # code: layout is content"] if code else
            ["name = \"a passage of a document (up to 200 words)\"", "max_words = 200", "min_words = 5",
             "normalize_whitespace = true"])
    queries = (["form = \"a short description of what the code does\"",
                "relevance = \"the code does what the query describes\"",
                "hard_negative = \"code with similar names or tokens that does something else\""] if code else
               ["form = \"a question a user asks in plain words\"",
                "relevance = \"the passage answers the question\"",
                "hard_negative = \"a passage on the same topic that does not answer the question\""])
    lines = [
        f"# Written by `encoder-pipeline domain add {name}`. Review the query columns and commit to",
        "# the targets before building: the report judges the trained encoder against them.",
        f"name = {_toml_string(name)}",
        f"description = {_toml_string(description or f'Retrieval over the {name} corpus.')}",
        "",
        "[corpus]",
        f"format = {_toml_string(corpus_format)}",
        f"path = {_toml_string(corpus_path)}",
    ]
    if FORMATS[corpus_format].uses_fields:
        lines += [f"id_field = {_toml_string(id_field)}", f"title_field = {_toml_string(title_field)}",
                  f"text_field = {_toml_string(text_field)}"]
    if on_malformed != "fail":
        lines.append(f"on_malformed = {_toml_string(on_malformed)}  # malformed entries are left out, counted")
    lines += [
        'license = ""  # the corpus\'s licence or terms: the exported model card repeats it',
        "",
        "[unit]", *unit,
        "",
        "[queries]", *queries,
        "# What each extractor found on a sample of the corpus:",
        *(f"#   {note}" for note in extractor_notes),
        f"pair_extractor = {json.dumps(extractors or [AUTO])}",
        "# Optional: two or three few-shot examples in your corpus's style win over the built-in ones.",
        "# [[queries.examples]]",
        '# passage = "a passage as your corpus has them"',
        '# query = "the question a user would ask of it"',
    ]
    if judged:
        lines += ["", "[judged]", f"path = {_toml_string(judged)}", 'split = "dev"']
    lines += [
        "",
        "[targets]",
        "ndcg_at_10 = 0.5",
        "p95_latency_ms = 15.0",
        "index_mb = 50.0",
        "usd_per_1k_queries = 0.001",
        "",
    ]
    return "\n".join(lines)


def add_domain(name: str, spec_text: str, directory: Path | None = None, overwrite: bool = False,
               check: Callable[[DomainSpec], None] | None = None) -> DomainSpec:
    """Validate `spec_text` as domain `name` and publish it as `<directory>/<name>.toml` (atomic
    rename); nothing is written when validation or `check(spec)` fails (`domain add` reads the
    corpus there as the run will), or the domain exists and `overwrite` is off."""
    directory = directory or domains_dir()
    if not DOMAIN_NAME.match(name):
        raise SpecError(f"domain name {name!r}: use lowercase letters, digits and _, starting with a letter")
    target = directory / f"{name}.toml"
    if target.exists() and not overwrite:
        raise SpecError(f"domain {name!r} already exists at {target} (pass --force to replace it)")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".staging-") as staging_dir:
        staging = Path(staging_dir) / target.name  # the file name must match the domain name
        staging.write_text(spec_text, encoding="utf-8")
        spec = load_spec(staging)
        if check is not None:
            check(spec)
        os.replace(staging, target)
    return spec.model_copy(update={"source_file": str(target)})
