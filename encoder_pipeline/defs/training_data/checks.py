"""The blocking `no_eval_leakage` check of every training-data asset.

It runs after the asset has published, on what was published: it re-reads every training file of the
new version and the eval split and corpus that version was built from (its manifest's upstream), and
applies lib.leakage's definition through the audit's own code (`audit_rows`), not the filter the
asset used. A leak that the filter let through fails the check, and downstream training does not run.
"""

import json

import dagster as dg
import pandas as pd

from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.layout import CORPUS_FILE, EVAL_FILE
from encoder_pipeline.lib.leakage import EvalTexts, audit_rows

LEAKAGE_CHECK = "no_eval_leakage"


def leakage_check_spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        LEAKAGE_CHECK, asset=asset, blocking=True,
        description="No eval query and no eval document (by id, normalized text or near-duplicate, "
                    "lib/leakage.py) in any row of any published training file; audited on the "
                    "published files, independently of the filter that wrote them.")


def _eval_texts_as_published(store: ArtifactStore, domain: str, upstream: dict[str, str]) -> EvalTexts:
    """The held-out queries (eval and dev) and documents, read from the versions the training file
    was built from."""
    split = json.loads((store.asset_dir(domain, "eval_set") / upstream["eval_set"] / EVAL_FILE).read_text())
    units = pd.read_parquet(store.asset_dir(domain, "clean_corpus") / upstream["clean_corpus"] / CORPUS_FILE,
                            columns=["doc_id", "parent_id", "title", "text"])
    held_out = set(split["held_out_doc_ids"])
    held = units[units["parent_id"].isin(held_out)]
    forms = [f"{title}\n{text}" if title else text for title, text in zip(held["title"], held["text"],
                                                                          strict=True)]
    queries = [*split["eval"]["queries"].values(), *split["dev"]["queries"].values()]
    return EvalTexts.of(queries, [*forms, *held["text"]], {*held_out, *held["doc_id"]})


def leakage_check(store: ArtifactStore, domain: str, asset: str, files: list[str]) -> dg.AssetCheckResult:
    """Audit the latest published version of `asset`: every file in `files` that it holds."""
    version = store.latest(domain, asset)
    upstream = json.loads((version / "manifest.json").read_text())["upstream"]
    eval_texts = _eval_texts_as_published(store, domain, upstream)
    leaking, rows, examples = {}, {}, []
    for name in files:
        if not (version / name).exists():
            continue
        frame = pd.read_parquet(version / name)
        count, found = audit_rows(frame, eval_texts)
        leaking[name], rows[name] = count, len(frame)
        examples += [f"{name}: {e}" for e in found]
    return dg.AssetCheckResult(
        check_name=LEAKAGE_CHECK, asset_key=asset, passed=sum(leaking.values()) == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"leaking_rows": sum(leaking.values()), "rows": sum(rows.values()),
                  "files": dg.MetadataValue.md("\n".join(f"- `{n}`: {leaking[n]} of {rows[n]} rows leak"
                                                         for n in leaking) or "none"),
                  **({"examples": dg.MetadataValue.md("\n".join(f"- {e}" for e in examples[:10]))}
                     if examples else {})})
