"""What each asset publishes, in one place: the asset names, the files inside a published version,
and the readers that every consumer uses (the assets downstream, `search`, `promotion`, `export`, the
CLI and `benchmarks/`). A reader loads the latest published version (`ArtifactStore.latest`), never
a staging folder. Writers stay with the asset that writes (inside `ArtifactStore.publish`), with the
file names from here.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def read_corpus_units(store: ArtifactStore, domain: str) -> pd.DataFrame:
    """Every cleaned unit of the corpus: what the served index holds."""
    return pd.read_parquet(store.latest(domain, CLEAN_CORPUS) / CORPUS_FILE)


def read_sample_units(store: ArtifactStore, domain: str) -> pd.DataFrame:
    """The units of the training sample (clean_corpus's `in_sample`; a version written before the
    sample existed is whole): what training data, the ladder and the index sweep are built on."""
    units = read_corpus_units(store, domain)
    if SAMPLE_COLUMN not in units.columns:
        return units
    return units[units[SAMPLE_COLUMN]].reset_index(drop=True)


def corpus_texts(units: pd.DataFrame) -> list[str]:
    return document_texts(units["title"], units["text"])


def read_eval_split(store: ArtifactStore, domain: str) -> EvalSplit:
    """The eval set, the dev slice and the held-out documents."""
    payload = json.loads((store.latest(domain, EVAL_SET) / EVAL_FILE).read_text())
    if "eval" not in payload:
        raise StaleArtifact(f"domain '{domain}': its eval_set was written by an older version (no dev "
                            "slice, no evidence label): materialize eval_set again")
    return EvalSplit.from_dict(payload)


def write_eval_split(path: Path, split: EvalSplit) -> None:
    path.write_text(json.dumps(split.to_dict()))


def read_pairs(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, HEURISTIC_PAIRS) / PAIRS_FILE)


def read_synthetic(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, SYNTHETIC_QUERIES) / SYNTHETIC_FILE)


def read_mined(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.read_parquet(store.latest(domain, MINED_NEGATIVES) / MINED_FILE)


def read_training_result(store: ArtifactStore, domain: str, rung: str) -> dict:
    return json.loads((store.latest(domain, rung) / TRAINING_FILE).read_text())


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
    return store.latest(domain, rung) / MODEL_DIR


def read_sweep(store: ArtifactStore, domain: str) -> dict:
    return json.loads((store.latest(domain, INDEX_SWEEP) / SWEEP_FILE).read_text())


def read_index_choice(store: ArtifactStore, domain: str) -> dict:
    """The candidate index's choice.json."""
    return json.loads((store.latest(domain, EMBEDDING_INDEX) / CHOICE_FILE).read_text())


def read_report(store: ArtifactStore, domain: str) -> dict:
    """The latest eval_report's report.json."""
    return json.loads((store.latest(domain, EVAL_REPORT) / REPORT_FILE).read_text())
