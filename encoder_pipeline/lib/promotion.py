"""What a domain serves, and what it keeps: roll back, re-promote, and collect old artifacts.

`serving_index` versions are the promoted versions, in publish order (`ArtifactStore.versions`). Each
one's `promotion.json` records `previous`, the version served when it was promoted:

- `rollback` serves that previous version again; repeated, it walks further back.
- `promote` serves an earlier promoted version again (undoing a rollback, say). Promoting a new
  candidate is the `serving_index` asset's job, behind the report's blocking `safe_to_promote` check;
  its `force` config serves a refused candidate anyway, and its promotion.json then says `forced`.
- `garbage_collect` deletes the versions of every asset of the domain that none of these needs: the
  last N promoted versions, the version served now and its rollback target, and what any asset's
  LATEST points to, each with everything it was built from (manifest `upstream`, followed
  transitively) and the encoder folder its `choice.json` names (which `search` and `export` load).

    store = ArtifactStore("data")
    rollback(store, "code")                            # -> ("3f2a9c1d", "77e01b2a")
    garbage_collect(store, "code", keep_promoted=3)    # -> GcResult(deleted=[...], ...)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from encoder_pipeline.lib.artifacts import (
    LATEST_FILE,
    ArtifactStore,
    remove_abandoned,
    work_dir,
)
from encoder_pipeline.lib.layout import CHOICE_FILE, PROMOTION_FILE, SERVING_INDEX
from encoder_pipeline.lib.search import NothingServed, served_index


class PromotionError(ValueError):
    """A rollback or promotion that cannot be done (nothing earlier, unknown version)."""


def promoted_versions(store: ArtifactStore, domain: str) -> list[str]:
    """The domain's `serving_index` versions still on disk, oldest first."""
    return store.versions(domain, SERVING_INDEX)


def read_promotion(store: ArtifactStore, domain: str, version: str) -> dict:
    """One promotion's record: the candidate, its report's verdict and reason, `forced` (served over
    the report's refusal; absent in promotions made before the flag existed), `previous`."""
    return json.loads((store.asset_dir(domain, SERVING_INDEX) / version / PROMOTION_FILE).read_text())


def rollback_target(store: ArtifactStore, domain: str) -> str:
    """The version that was served when the one served now was promoted (NothingServed when nothing is)."""
    current = served_index(domain, store).version
    previous = read_promotion(store, domain, current).get("previous")
    if not previous:
        raise PromotionError(f"{domain}: serving_index {current} was the first promotion; there is "
                             f"nothing earlier to roll back to")
    if previous["version"] not in promoted_versions(store, domain):
        raise PromotionError(f"{domain}: the version served before {current}, {previous['version']}, "
                             f"is no longer on disk")
    return previous["version"]


def rollback(store: ArtifactStore, domain: str) -> tuple[str, str]:
    """Serve the previously promoted version again; returns (from, to)."""
    current, target = served_index(domain, store).version, rollback_target(store, domain)
    store.set_latest(domain, SERVING_INDEX, target, reason="rollback")
    return current, target


def promote(store: ArtifactStore, domain: str, version: str) -> tuple[str, str]:
    """Serve an earlier promoted version again; returns (from, to) (NothingServed when nothing is)."""
    current, known = served_index(domain, store).version, promoted_versions(store, domain)
    if version not in known:
        raise PromotionError(f"{domain}: '{version}' is not a promoted version; promoted (oldest "
                             f"first): {', '.join(known)}")
    if version != current:
        store.set_latest(domain, SERVING_INDEX, version, reason="promote")
    return current, version


@dataclass(frozen=True)
class GcResult:
    deleted: list[tuple[str, str]]  # (asset, version), deleted or, in a dry run, to delete
    kept: int  # versions kept, over every asset
    freed_bytes: int


def _asset_names(store: ArtifactStore, domain: str) -> list[str]:
    """Versioned assets of the domain (the `_embeddings` / `_llm_cache` caches have no LATEST)."""
    root = store.domain_dir(domain)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / LATEST_FILE).exists())


def _references(store: ArtifactStore, domain: str, asset: str, version: str) -> set[tuple[str, str]]:
    """What one version was built from and needs to be used: its manifest's upstream versions and
    the encoder folder (`<root>/<domain>/<asset>/<version>/model`) its choice.json points to."""
    folder = store.asset_dir(domain, asset) / version
    manifest = folder / "manifest.json"
    needed = set(json.loads(manifest.read_text()).get("upstream", {}).items()) if manifest.exists() else set()
    choice = folder / CHOICE_FILE
    if choice.exists():
        model = Path(json.loads(choice.read_text())["model_path"]).parts
        if len(model) >= 4 and model[-4] == domain:
            needed.add((model[-3], model[-2]))
    return needed


def needed_versions(store: ArtifactStore, domain: str, keep_promoted: int) -> set[tuple[str, str]]:
    """Every (asset, version) that garbage collection keeps."""
    if keep_promoted < 1:
        raise ValueError(f"keep_promoted must be at least 1, not {keep_promoted}")
    roots = {(asset, store.latest_version(domain, asset)) for asset in _asset_names(store, domain)}
    roots |= {(SERVING_INDEX, v) for v in promoted_versions(store, domain)[-keep_promoted:]}
    try:
        roots.add((SERVING_INDEX, rollback_target(store, domain)))
    except (NothingServed, PromotionError):  # nothing promoted, or nothing earlier: no rollback to keep
        pass
    needed, todo = set(), list(roots)
    while todo:
        item = todo.pop()
        if item in needed or not (store.asset_dir(domain, item[0]) / item[1]).is_dir():
            continue
        needed.add(item)
        todo.extend(_references(store, domain, *item))
    return needed


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def garbage_collect(store: ArtifactStore, domain: str, keep_promoted: int,
                    dry_run: bool = False) -> GcResult:
    """Delete the domain's versions that `needed_versions` does not list (see the module doc)."""
    needed = needed_versions(store, domain, keep_promoted)
    deleted, freed = [], 0
    for asset in _asset_names(store, domain):
        if not dry_run:  # what killed runs left: staging folders, half-deleted versions
            remove_abandoned(store.asset_dir(domain, asset))
        for version in store.versions(domain, asset):
            if (asset, version) in needed:
                continue
            folder = store.asset_dir(domain, asset) / version
            freed += _size(folder)
            deleted.append((asset, version))
            if not dry_run:
                # Renamed out of sight first, so a reader never finds a half-deleted version.
                doomed = work_dir(folder.parent, "deleting")
                os.replace(folder, doomed)  # a folder may replace an empty one
                shutil.rmtree(doomed)
    return GcResult(deleted=deleted, kept=len(needed), freed_bytes=freed)
