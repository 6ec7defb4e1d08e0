"""Where things live. Every location can be moved with an environment variable.

- ENCODER_PIPELINE_HOME: the artifact root (default `<project>/data`), laid out as
  `<root>/<domain>/<asset>/<version>/`, with Dagster's own storage under `<root>/dagster/`.
- ENCODER_PIPELINE_DOMAINS: the folder of domain spec files (default `<project>/data/domains`).
- ENCODER_PIPELINE_CORPUS_ROOT: what relative corpus paths in specs are resolved against
  (default `<project>/data/corpora`); a relative spec path never leaves it (`confined`).
- ENCODER_PIPELINE_MODEL_CACHE: ready-to-load copies of packaged models, shared by every artifact
  root (default `$XDG_CACHE_HOME/encoder_pipeline`, else `~/.cache/encoder_pipeline`).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout holding pyproject.toml (editable install), else the working directory."""
    candidate = Path(__file__).resolve().parents[1]
    return candidate if (candidate / "pyproject.toml").exists() else Path.cwd()


def artifact_root() -> Path:
    return Path(os.environ.get("ENCODER_PIPELINE_HOME", project_root() / "data")).resolve()


def domains_dir() -> Path:
    return Path(os.environ.get("ENCODER_PIPELINE_DOMAINS", project_root() / "data" / "domains")).resolve()


def corpus_root() -> Path:
    return Path(
        os.environ.get("ENCODER_PIPELINE_CORPUS_ROOT", project_root() / "data" / "corpora")
    ).resolve()


def confined(root: Path, relative: str) -> Path:
    """`relative` under `root`, refused (ValueError) when its `..` parts lead out of `root`.

    Checked on the path as written, not through symlinks: a link the operator placed inside the root
    (a corpus mounted elsewhere) stays usable, while a spec file cannot climb out with `..`.
    """
    if os.path.isabs(relative):
        raise ValueError(f"{relative!r} is not a relative path")
    path = Path(os.path.normpath(root / relative))
    if path != root and root not in path.parents:
        raise ValueError(f"{relative!r} leads out of {root}")
    return path


def model_cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "encoder_pipeline"
    return Path(os.environ.get("ENCODER_PIPELINE_MODEL_CACHE", default)).resolve()


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME defaults to the project root so the shipped dagster.yaml applies."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_root())))
    (artifact_root() / "dagster").mkdir(parents=True, exist_ok=True)
    return home
