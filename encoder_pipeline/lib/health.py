"""Every domain at a glance: one line per domain partition, from the latest status of each stage.

Dagster's asset graph marks an asset failed when any of its partitions failed, so with many domains
one broken corpus paints every node red and the healthy domains cannot be told from it (per-asset
health summaries are a Dagster+ feature). `domain_health` turns the per-partition statuses Dagster
keeps into one state per domain, worst first:

- failed: a stage's latest attempt failed (the first such stage is named);
- running: a stage is being materialized now;
- partly built: some stages are materialized, others never were;
- healthy: every stage through the report is materialized (`serving_index` is not required: the
  promotion gate may refuse a candidate, which the verdict and the served column say);
- never built: no stage was ever materialized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

FAILED, RUNNING, PARTLY_BUILT, HEALTHY, NEVER_BUILT = (
    "failed", "running", "partly built", "healthy", "never built")
STATES = (FAILED, RUNNING, PARTLY_BUILT, HEALTHY, NEVER_BUILT)  # worst first: the table's order
# Dagster's AssetPartitionStatus values; None (absent) is "never materialized".
MATERIALIZED_STATUS, FAILED_STATUS, IN_PROGRESS_STATUS = "MATERIALIZED", "FAILED", "IN_PROGRESS"


@dataclass(frozen=True)
class DomainHealth:
    domain: str
    state: str
    built: int  # required stages materialized
    stages: int  # required stages
    detail: str  # the failed or running stage, or what is missing
    verdict: str
    served: str


def domain_health(domain: str, statuses: Mapping[str, str | None], required: Sequence[str],
                  verdict: str = "", served: str = "") -> DomainHealth:
    """One domain's state from `statuses` (stage -> Dagster's partition status, in stage order;
    stages beyond `required` count only when they failed or run)."""
    def stages_with(status: str) -> list[str]:
        return [stage for stage, value in statuses.items() if value == status]

    built = [stage for stage in required if statuses.get(stage) == MATERIALIZED_STATUS]
    missing = [stage for stage in required if statuses.get(stage) is None]
    if stages_with(FAILED_STATUS):
        state, detail = FAILED, f"failed at {stages_with(FAILED_STATUS)[0]}"
    elif stages_with(IN_PROGRESS_STATUS):
        state, detail = RUNNING, f"running {stages_with(IN_PROGRESS_STATUS)[0]}"
    elif len(built) == len(required):
        state, detail = HEALTHY, ""
    elif not built:
        state, detail = NEVER_BUILT, ""
    else:
        state, detail = PARTLY_BUILT, f"missing {missing[0]}" + (f" and {len(missing) - 1} more"
                                                                   if len(missing) > 1 else "")
    return DomainHealth(domain, state, len(built), len(required), detail, verdict, served)


def health_table(rows: Sequence[DomainHealth]) -> pd.DataFrame:
    """The rows worst first (then by domain), as the UI shows them."""
    ordered = sorted(rows, key=lambda r: (STATES.index(r.state), r.domain))
    return pd.DataFrame({
        "domain": [r.domain for r in ordered],
        "state": [r.state for r in ordered],
        "stages built": [f"{r.built} of {r.stages}" for r in ordered],
        "detail": [r.detail for r in ordered],
        "verdict": [r.verdict for r in ordered],
        "served": [r.served for r in ordered],
    }, columns=["domain", "state", "stages built", "detail", "verdict", "served"])


def state_counts(rows: Sequence[DomainHealth]) -> dict[str, int]:
    """Domains per state, every state present (0 included), for plotting over time."""
    return {state: sum(r.state == state for r in rows) for state in STATES}
