"""What each asset publishes, in one place: the asset names, the files inside a published version,
and a typed handle per asset (`CorpusArtifact`, `PairsArtifact`, `RungArtifact`, ...) with its
readers. Assets receive their upstream assets as these handles (`ins=`, through the
`PublishedArtifacts` input manager); `search`, `promotion`, `export`, the CLI and `benchmarks/` open
them with `latest`. A handle is one published version, never a staging folder, and names the version
it reads (what `publish` records as upstream). Writers stay with the asset that writes (inside
`ArtifactStore.publish`), with the file names from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.corpus import SAMPLE_COLUMN
from encoder_pipeline.lib.encoders import document_texts
from encoder_pipeline.lib.heldout import EvalSplit

# Assets, in graph order (the three encoder rungs are named in defs/training).
CLEAN_CORPUS = "clean_corpus"
EVAL_SET = "eval_set"
HEURISTIC_PAIRS = "heuristic_pairs"
SYNTHETIC_QUERIES = "synthetic_queries"
MINED_NEGATIVES = "mined_negatives"
INDEX_SWEEP = "index_sweep"
EMBEDDING_INDEX = "embedding_index"  # the candidate: what serving_index promotes once the report allows it
EVAL_REPORT = "eval_report"
SERVING_INDEX = "serving_index"  # its versions are the promotions; LATEST is what users search
RUNGS = ("encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives")  # the ladder, in order

# Files inside a published version.
CORPUS_FILE = "corpus.parquet"  # clean_corpus: every unit, `in_sample` marks the training sample
EVAL_FILE = "eval_set.json"  # eval_set: lib.heldout.EvalSplit
PAIRS_FILE = "pairs.parquet"  # heuristic_pairs
SYNTHETIC_FILE = "synthetic.parquet"  # synthetic_queries, filtered (what training reads)
UNFILTERED_FILE = "synthetic_unfiltered.parquet"  # synthetic_queries before the round trip (leak-filtered)
GENERATION_FILE = "generation.json"  # synthetic_queries: prompts, tokens, where text was sent
MINED_FILE = "mined.parquet"  # mined_negatives
MODEL_DIR = "model"  # an encoder rung's sentence-transformers folder
TRAINING_FILE = "training.json"  # an encoder rung's training result (dev nDCG@10, steps, ...)
SWEEP_FILE = "sweep.json"  # index_sweep: rung, model_path, revision, points, chosen, rule
CHOICE_FILE = "choice.json"  # embedding_index / serving_index: rung, model_path, precision, dims, ...
REPORT_FILE = "report.json"  # eval_report
PROMOTION_FILE = "promotion.json"  # serving_index: what was promoted, forced or not, and why


class StaleArtifact(MissingArtifact):
    """A published version in a format this code no longer reads: materialize that asset again."""


@dataclass(frozen=True)
class Artifact:
    """One published version of one domain's asset."""

    store: ArtifactStore
    domain: str
    asset: str
    version: str

    @property
    def path(self) -> Path:
        return self.store.asset_dir(self.domain, self.asset) / self.version

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / "manifest.json").read_text())

    def _json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


class CorpusArtifact(Artifact):
    """clean_corpus: every cleaned unit (what the served index holds) and the training sample."""

    def units(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / CORPUS_FILE)

    def sample(self) -> pd.DataFrame:
        """The units of the training sample (`in_sample`; a version written before the sample
        existed is whole): what training data, the ladder and the index sweep are built on."""
        units = self.units()
        if SAMPLE_COLUMN not in units.columns:
            return units
        return units[units[SAMPLE_COLUMN]].reset_index(drop=True)

    @property
    def fingerprint(self) -> str:
        return self.manifest()["corpus_fingerprint"]


class EvalSetArtifact(Artifact):
    def split(self) -> EvalSplit:
        """The eval set, the dev slice and the held-out documents."""
        payload = self._json(EVAL_FILE)
        if "eval" not in payload:
            raise StaleArtifact(f"domain '{self.domain}': its eval_set was written by an older version (no "
                                "dev slice, no evidence label): materialize eval_set again")
        return EvalSplit.from_dict(payload)


class PairsArtifact(Artifact):
    def rows(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / PAIRS_FILE)


class SyntheticArtifact(Artifact):
    def rows(self) -> pd.DataFrame:
        """The filtered synthetic queries: what training reads."""
        return pd.read_parquet(self.path / SYNTHETIC_FILE)

    def unfiltered(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / UNFILTERED_FILE)

    def generation(self) -> dict:
        return self._json(GENERATION_FILE)


class MinedArtifact(Artifact):
    def rows(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / MINED_FILE)


class RungArtifact(Artifact):
    """An encoder rung: its sentence-transformers folder and its training result."""

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_DIR

    def training(self) -> dict:
        return self._json(TRAINING_FILE)


class SweepArtifact(Artifact):
    def sweep(self) -> dict:
        return self._json(SWEEP_FILE)


class IndexArtifact(Artifact):
    """embedding_index (the candidate) or serving_index (a promotion): the same index layout."""

    def choice(self) -> dict:
        return self._json(CHOICE_FILE)


class ReportArtifact(Artifact):
    def report(self) -> dict:
        return self._json(REPORT_FILE)


HANDLES: dict[str, type[Artifact]] = {
    CLEAN_CORPUS: CorpusArtifact, EVAL_SET: EvalSetArtifact, HEURISTIC_PAIRS: PairsArtifact,
    SYNTHETIC_QUERIES: SyntheticArtifact, MINED_NEGATIVES: MinedArtifact,
    **dict.fromkeys(RUNGS, RungArtifact), INDEX_SWEEP: SweepArtifact, EMBEDDING_INDEX: IndexArtifact,
    EVAL_REPORT: ReportArtifact, SERVING_INDEX: IndexArtifact,
}


def handle(store: ArtifactStore, domain: str, asset: str, version: str) -> Artifact:
    """The typed handle of one version of `asset`."""
    return HANDLES.get(asset, Artifact)(store, domain, asset, version)


def latest(store: ArtifactStore, domain: str, asset: str) -> Artifact:
    """The typed handle of `asset`'s latest published version (MissingArtifact when none)."""
    return handle(store, domain, asset, store.latest_version(domain, asset))


def read_corpus_units(store: ArtifactStore, domain: str) -> pd.DataFrame:
    """Every cleaned unit of the corpus: what the served index holds."""
    return latest(store, domain, CLEAN_CORPUS).units()


def read_sample_units(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return latest(store, domain, CLEAN_CORPUS).sample()


def corpus_texts(units: pd.DataFrame) -> list[str]:
    return document_texts(units["title"], units["text"])


def read_eval_split(store: ArtifactStore, domain: str) -> EvalSplit:
    return latest(store, domain, EVAL_SET).split()


def write_eval_split(path: Path, split: EvalSplit) -> None:
    path.write_text(json.dumps(split.to_dict()))


def read_pairs(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return latest(store, domain, HEURISTIC_PAIRS).rows()


def held_out_before(store: ArtifactStore, domain: str, asset: str) -> set[str] | None:
    """The documents the eval set held out when `asset`'s training data was built: read through the
    versions it recorded (a rung -> heuristic_pairs -> eval_set); None when that chain is not on disk."""
    manifest = store.manifest(domain, asset)
    version = manifest["upstream"].get(EVAL_SET)
    if version is None:
        pairs = manifest["upstream"].get(HEURISTIC_PAIRS)
        pairs_manifest = store.asset_dir(domain, HEURISTIC_PAIRS) / str(pairs) / "manifest.json"
        if pairs is None or not pairs_manifest.exists():
            return None
        version = json.loads(pairs_manifest.read_text())["upstream"].get(EVAL_SET)
    path = store.asset_dir(domain, EVAL_SET) / str(version) / EVAL_FILE
    if version is None or not path.exists():
        return None
    return set(json.loads(path.read_text()).get("held_out_doc_ids", []))


def stale_rungs(store: ArtifactStore, domain: str, rungs: list[str], held_out: set[str]) -> dict[str, str]:
    """Rungs trained before some of today's eval documents were held out (a judged document added
    since): their training data may hold those documents, so their eval figures may flatter them
    until they are retrained."""
    stale = {}
    for rung in rungs:
        before = held_out_before(store, domain, rung)
        if before is not None and held_out - before:
            stale[rung] = (f"trained before {len(held_out - before)} of the eval set's documents were held "
                           "out: retrain it (materialize it again) before trusting its figure")
    return stale


def rung_model_path(store: ArtifactStore, domain: str, rung: str) -> Path:
    return latest(store, domain, rung).model_path


def read_report(store: ArtifactStore, domain: str) -> dict:
    """The latest eval_report's report.json."""
    return latest(store, domain, EVAL_REPORT).report()
