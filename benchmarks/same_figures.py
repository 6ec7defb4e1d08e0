"""Do two builds of a domain agree? Training rows and report metrics of two artifact roots, compared
within a tolerance: the check that a refactor changed no figure (same seed, same profile, before and
after the change).

    git worktree add /tmp/before <commit>
    (cd /tmp/before && python benchmarks/stage_timings.py --domain code --profile tiny --root /tmp/a)
    python benchmarks/stage_timings.py --domain code --profile tiny --root /tmp/b
    python benchmarks/same_figures.py /tmp/a /tmp/b --domain code

Compared: the eval split (queries and judgments, exactly); every training file (heuristic pairs,
synthetic queries, mined negatives: the same rows in the same order, text exactly, numbers within
`--tolerance`); and every number of report.json except wall-clock ones (latency, seconds, dollars
derived from them). Prints each difference; exits 1 when there is one.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.layout import (
    EVAL_FILE,
    EVAL_REPORT,
    EVAL_SET,
    HEURISTIC_PAIRS,
    MINED_FILE,
    MINED_NEGATIVES,
    PAIRS_FILE,
    REPORT_FILE,
    SYNTHETIC_FILE,
    SYNTHETIC_QUERIES,
)

TRAINING_FILES = {HEURISTIC_PAIRS: [PAIRS_FILE], SYNTHETIC_QUERIES: [SYNTHETIC_FILE], MINED_NEGATIVES: [MINED_FILE]}
# Wall-clock figures (and what is computed from them) differ run to run on any machine.
CLOCK_WORDS = ("_ms", "ms_per", "seconds", "usd", "latency", "version", "revision", "path", "model_path")


def _clocked(key: str) -> bool:
    return any(word in key for word in CLOCK_WORDS)


def compare_values(a, b, where: str, tolerance: float, out: list[str]) -> None:
    """Differences between two JSON values, numbers within `tolerance`, clock fields skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if _clocked(str(key)):
                continue
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'b' if key not in a else 'a'}")
            else:
                compare_values(a[key], b[key], f"{where}.{key}", tolerance, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            compare_values(x, y, f"{where}[{i}]", tolerance, out)
    elif isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        if a != b:
            out.append(f"{where}: {a!r} vs {b!r}")
    elif not (math.isclose(a, b, abs_tol=tolerance) or (math.isnan(a) and math.isnan(b))):
        out.append(f"{where}: {a} vs {b} (diff {b - a:+.2e})")


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, where: str, tolerance: float, out: list[str]) -> None:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        out.append(f"{where}: columns {list(a.columns)} x {len(a)} rows vs {list(b.columns)} x {len(b)} rows")
        return
    for column in a.columns:
        x, y = a[column], b[column]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            worst = float((x.astype(float) - y.astype(float)).abs().max()) if len(x) else 0.0
            if worst > tolerance:
                out.append(f"{where}.{column}: numbers differ by up to {worst:.2e}")
        elif not x.astype(str).equals(y.astype(str)):
            out.append(f"{where}.{column}: {int((x.astype(str) != y.astype(str)).sum())} rows differ")


def compare(root_a: Path, root_b: Path, domain: str, tolerance: float) -> list[str]:
    stores = ArtifactStore(root_a), ArtifactStore(root_b)
    out: list[str] = []
    splits = [json.loads((s.latest(domain, EVAL_SET) / EVAL_FILE).read_text()) for s in stores]
    compare_values(*splits, EVAL_SET, tolerance, out)
    for asset, files in TRAINING_FILES.items():
        for name in files:
            compare_frames(*(pd.read_parquet(s.latest(domain, asset) / name) for s in stores),
                           f"{asset}/{name}", tolerance, out)
    reports = [json.loads((s.latest(domain, EVAL_REPORT) / REPORT_FILE).read_text()) for s in stores]
    compare_values(*reports, EVAL_REPORT, tolerance, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root_a", type=Path)
    parser.add_argument("root_b", type=Path)
    parser.add_argument("--domain", default="code")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    differences = compare(args.root_a, args.root_b, args.domain, args.tolerance)
    for line in differences:
        print(line)
    print(f"{len(differences)} differences beyond {args.tolerance:g} ({args.root_a} vs {args.root_b}, "
          f"domain {args.domain})")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
