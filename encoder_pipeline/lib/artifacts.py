"""Versioned, atomically published artifacts: `<root>/<domain>/<asset>/<version>/`.

A stage writes into a hidden staging folder and publishes it with one `rename`, then moves the
asset's `LATEST` pointer (also by rename). A downstream stage only ever reads a published version,
so a run killed halfway leaves nothing half-written where anyone looks. Each version carries a
`manifest.json`: library versions, seed, config hash, corpus fingerprint, upstream versions.
`history.jsonl` beside LATEST records every publish and every pointer move in order (folder mtimes
do not survive a copy or a restore, so they cannot tell which version came first).

Work folders (staging, scratch) are named after their owner process (`.<kind>-<host>-<pid>-...`):
a run killed with SIGKILL cannot clean up, so the next publish on the same machine deletes the
folders whose owner is gone (`remove_abandoned`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

TRACKED_LIBRARIES = (
    "dagster",
    "daft",
    "sentence-transformers",
    "transformers",
    "torch",
    "faiss-cpu",
    "bm25s",
    "pytrec-eval-terrier",
)


HISTORY_FILE = "history.jsonl"
LATEST_FILE = "LATEST"
# Work folders carry their owner's host (hashed: a hostname may hold dashes) and pid.
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


class MissingArtifact(FileNotFoundError):
    """An upstream artifact that has not been materialized for this domain."""


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_hash(config: Any) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8"
    ) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
    os.replace(handle.name, path)


def work_dir(parent: Path, kind: str) -> Path:
    """A new hidden folder `parent/.<kind>-<host>-<pid>-<random>` for this process's work."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{kind}-{HOST_TAG}-{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_abandoned(parent: Path) -> list[Path]:
    """Delete the work folders under `parent` (see `work_dir`) whose owner process on this machine
    has exited; those of live processes and of other machines stay. Returns what was deleted."""
    removed = []
    for folder in parent.glob(".*-*-*-*") if parent.is_dir() else ():
        _, host, pid = folder.name.split("-")[:3]
        if host == HOST_TAG and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)  # ignore: a concurrent sweep got there first
            removed.append(folder)
    return removed


def remove_torn_arrays(folder: Path) -> list[Path]:
    """Delete the `.npy` files under `folder` that do not load whole. sentence-transformers'
    `mine_hard_negatives` writes its cache in place, so a run killed mid-write leaves a truncated
    file that would fail every later run. Returns what was deleted."""
    removed = []
    for path in folder.glob("*.npy") if folder.is_dir() else ():
        try:
            np.load(path, mmap_mode="r")  # maps, reads only the header
        except ValueError:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass
class Manifest:
    domain: str
    asset: str
    version: str
    seed: int
    config: dict[str, Any]
    corpus_fingerprint: str = ""
    upstream: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "asset": self.asset,
            "version": self.version,
            "seed": self.seed,
            "config": self.config,
            "config_hash": config_hash(self.config),
            "corpus_fingerprint": self.corpus_fingerprint,
            "upstream": self.upstream,
            "libraries": library_versions(),
        }


# What the running asset has read: (domain, asset) -> the version it resolved, first read wins.
# `start_reading` opens a ledger per asset; publishing records the versions read, not those latest
# by then (another run may publish in between).
_reads: contextvars.ContextVar[dict[tuple[str, str], str] | None] = contextvars.ContextVar(
    "artifact_reads", default=None)


def start_reading() -> dict[tuple[str, str], str]:
    """A fresh ledger of the versions this context resolves through `latest_version` from now on."""
    ledger: dict[tuple[str, str], str] = {}
    _reads.set(ledger)
    return ledger


def versions_read() -> dict[tuple[str, str], str]:
    return dict(_reads.get() or {})


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def asset_dir(self, domain: str, asset: str) -> Path:
        return self.root / domain / asset

    def domain_dir(self, domain: str) -> Path:
        return self.root / domain

    def latest_version(self, domain: str, asset: str, lineage: bool = True) -> str:
        """The version `asset`'s LATEST points to; recorded in the running asset's ledger (its
        upstream, see `start_reading`) unless `lineage` is False: read, not built from."""
        pointer = self.asset_dir(domain, asset) / LATEST_FILE
        if not pointer.exists():
            raise MissingArtifact(
                f"'{asset}' has not been materialized for domain '{domain}' "
                f"(nothing at {pointer}); materialize it first"
            )
        version = pointer.read_text().strip()
        ledger = _reads.get()
        if ledger is not None and lineage:
            ledger.setdefault((domain, asset), version)
        return version

    def latest(self, domain: str, asset: str) -> Path:
        return self.asset_dir(domain, asset) / self.latest_version(domain, asset)

    def manifest(self, domain: str, asset: str) -> dict[str, Any]:
        return json.loads((self.latest(domain, asset) / "manifest.json").read_text())

    def history(self, domain: str, asset: str) -> list[dict[str, Any]]:
        """Every publish and pointer move of the asset, oldest first."""
        path = self.asset_dir(domain, asset) / HISTORY_FILE
        if not path.exists():
            return []
        events = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line torn by a crash mid-append
                events.append(json.loads(line))
        return events

    def versions(self, domain: str, asset: str) -> list[str]:
        """Published versions still on disk, oldest first. Versions published before the history
        file existed come first, ordered by their manifest's mtime."""
        asset_dir = self.asset_dir(domain, asset)
        if not asset_dir.is_dir():
            return []
        on_disk = {p.name for p in asset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        recorded = list(dict.fromkeys(e["version"] for e in reversed(self.history(domain, asset))
                                      if e.get("event") == "publish" and e["version"] in on_disk))
        recorded.reverse()  # each version at its last publish

        def mtime(version: str) -> float:
            manifest = asset_dir / version / "manifest.json"
            return manifest.stat().st_mtime if manifest.exists() else 0.0

        legacy = sorted(on_disk - set(recorded), key=mtime)
        return legacy + recorded

    def set_latest(self, domain: str, asset: str, version: str, reason: str) -> None:
        """Point LATEST at an existing published version (a rollback or a re-promotion)."""
        if not (self.asset_dir(domain, asset) / version).is_dir():
            raise MissingArtifact(f"'{asset}' has no version '{version}' for domain '{domain}'")
        previous = self.latest_version(domain, asset)
        self._record(domain, asset, {"event": "set_latest", "version": version, "from": previous,
                                     "reason": reason})
        self._point_latest(domain, asset, version)

    def _record(self, domain: str, asset: str, event: dict[str, Any]) -> None:
        # One O_APPEND write per line: concurrent appends never interleave and a crash loses at
        # most the line being written, which `history` skips.
        line = json.dumps({**event, "at": time.time()}, sort_keys=True) + "\n"
        fd = os.open(self.asset_dir(domain, asset) / HISTORY_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _point_latest(self, domain: str, asset: str, version: str) -> None:
        asset_dir = self.asset_dir(domain, asset)
        pointer_tmp = asset_dir / f".{LATEST_FILE}.{version}.{os.getpid()}"
        pointer_tmp.write_text(version)
        os.replace(pointer_tmp, asset_dir / LATEST_FILE)

    @contextlib.contextmanager
    def scratch(self, domain: str) -> Iterator[Path]:
        """A private work folder in the domain's folder (the same filesystem as the staging
        folders, so a file made here can be renamed into one), deleted afterwards."""
        remove_abandoned(self.domain_dir(domain))
        folder = work_dir(self.domain_dir(domain), "scratch")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def publish(self, manifest: Manifest) -> Iterator[Path]:
        """Yield a staging folder; on success rename it into place and move LATEST to it."""
        asset_dir = self.asset_dir(manifest.domain, manifest.asset)
        remove_abandoned(asset_dir)
        staging, replaced = work_dir(asset_dir, "staging"), None
        try:
            yield staging
            write_json_atomic(staging / "manifest.json", manifest.to_dict())
            final = asset_dir / manifest.version
            if final.exists():  # the same version again (a retried step): move the old one aside
                replaced = work_dir(asset_dir, "replaced")
                os.replace(final, replaced)  # a folder may replace an empty one
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        self._record(manifest.domain, manifest.asset, {"event": "publish", "version": manifest.version})
        self._point_latest(manifest.domain, manifest.asset, manifest.version)
