"""clean_corpus on a generated corpus larger than it is sensible to hold in memory.

Writes a JSONL corpus of N documents (Zipf-distributed words, ~90 words each, 1% exact and 2%
near-duplicates planted), then in separate processes, so each peak RSS is its own:
  - baseline: load the corpus into pandas (what any in-memory cleaning needs before it starts);
  - clean_corpus_to_parquet (the asset's path): normalize, chunk, filter, exact + MinHash dedupe.
Prints wall time, documents/s, peak RSS (process tree), and peak RSS as a fraction of the in-memory baseline.

    python benchmarks/clean_corpus_scale.py --documents 100000 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

WORDS_PER_DOC = 90
VOCABULARY = 50_000


def generate(path: Path, documents: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(VOCABULARY)])
    block = 10_000
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, documents, block):
            count = min(block, documents - start)
            words = vocabulary[np.minimum(rng.zipf(1.3, size=(count, WORDS_PER_DOC)) - 1, VOCABULARY - 1)]
            texts = [" ".join(row) for row in words]
            for offset in range(count):
                i = start + offset
                text, title = texts[offset], f"Title {i}"
                if i % 100 == 1:  # exact duplicate of the previous document, under a new id
                    text, title = texts[offset - 1], f"Title {i - 1}"
                elif i % 50 == 3:  # near duplicate: the previous document with its last word changed
                    text = texts[offset - 1].rsplit(" ", 1)[0] + " changed"
                out.write(json.dumps({"_id": f"doc{i}", "title": title, "text": text}))
                out.write("\n")


class TreePeak:
    """Peak RSS of this process plus its children (Daft may run Python UDFs in worker processes,
    which ru_maxrss of this process alone would miss), sampled every 50 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self) -> "TreePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(self.peak, own) / 1e6


def run_baseline(path: str) -> dict:
    import pandas as pd

    start = time.perf_counter()
    with TreePeak() as peak:
        frame = pd.read_json(path, lines=True)
    return {"rows": len(frame), "seconds": time.perf_counter() - start, "peak_mb": peak.mb}


def run_clean(path: str) -> dict:
    from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus_to_parquet
    from encoder_pipeline.lib.sources import read_corpus

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, TreePeak() as peak:
        report = clean_corpus_to_parquet(read_corpus("jsonl", path), CleaningConfig(max_words=300),
                                         Path(scratch) / "units.parquet")
    return {"rows": report.counts["kept"], "seconds": time.perf_counter() - start,
            "peak_mb": peak.mb, "counts": report.counts}


def in_subprocess(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path = args.child
        print(json.dumps(run_baseline(path) if mode == "baseline" else run_clean(path)))
        return

    print("| documents | corpus MB | pandas load: s / peak MB | clean_corpus: s / docs/s / peak MB "
          "| clean peak / pandas peak | dropped exact / near |")
    print("|---:|---:|---|---|---:|---|")
    for documents in args.documents:
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "corpus.jsonl"
            generate(path, documents)
            size_mb = path.stat().st_size / 1e6
            baseline = in_subprocess("baseline", path)
            clean = in_subprocess("clean", path)
        counts = clean["counts"]
        print(f"| {documents:,} | {size_mb:,.0f} | {baseline['seconds']:.1f} / {baseline['peak_mb']:,.0f} "
              f"| {clean['seconds']:.1f} / {documents / clean['seconds']:,.0f} / {clean['peak_mb']:,.0f} "
              f"| {clean['peak_mb'] / baseline['peak_mb']:.2f} "
              f"| {counts['exact_duplicates']:,} / {counts['near_duplicates']:,} |",
              flush=True)


if __name__ == "__main__":
    main()
