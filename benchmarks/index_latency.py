"""Search latency and size of flat fp32 vs int8 vs binary + int8 rescoring, at 10k and 100k documents.

    python benchmarks/index_latency.py [--sizes 10000 100000] [--queries 300]

Synthetic corpus: unit-normalized 384-d vectors drawn around 1,000 random cluster centres (real
embeddings are clustered, not uniform); queries are perturbed copies of random documents. Each index
is built by `lib.index.build_quantized` and written with `save_index` (so bytes are what a server
loads: index, rescoring vectors, id map), then timed as served: one query at a time, top-10, warm,
one thread (`lib.sweep.time_search`). Recall@10 against exact search and how often the query's
source document comes first say what the speed costs (the synthetic clusters make many near-ties,
a harsher test than real embeddings).
Writes benchmarks/results/index_latency.json and prints a markdown table with ratios vs flat.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from encoder_pipeline.lib.index import build_quantized, save_index, served_bytes, vector_bytes
from encoder_pipeline.lib.sweep import time_search

DIM = 384
CONFIGS = [("fp32", "flat fp32"), ("int8", "int8 (SQ8)"), ("binary+int8", "binary + int8 rescore")]
RESULTS = Path(__file__).resolve().parent / "results" / "index_latency.json"


def synthetic(n: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    docs = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    picks = rng.integers(0, n, queries)
    asks = docs[picks] + 0.04 * rng.normal(size=(queries, DIM)).astype(np.float32)
    asks /= np.linalg.norm(asks, axis=1, keepdims=True)
    return docs.astype(np.float32), asks.astype(np.float32), picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    for n in args.sizes:
        docs, queries, sources = synthetic(n, args.queries, args.seed)
        ids = [f"doc{i}" for i in range(n)]
        exact = None
        for precision, label in CONFIGS:
            started = time.perf_counter()
            index = build_quantized(docs, DIM, precision, ids, ids)
            build_seconds = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as folder:
                save_index(folder, index, ids, ids, [""] * n, "bench", precision, build_seconds)
                served, vectors = served_bytes(folder), vector_bytes(folder)
            times = np.asarray(time_search(index, queries, k=10))
            found = np.array([[r for r, _ in hits] for hits in index.search(queries, 10)])
            if exact is None:
                exact = found
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)]))
            source_first = float(np.mean(found[:, 0] == sources))
            rows.append({"documents": n, "index": label, "precision": precision,
                         "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                         "mean_ms": float(times.mean()), "vector_bytes": vectors, "served_bytes": served,
                         "build_seconds": build_seconds, "recall_at_10_vs_exact": recall,
                         "source_at_1": source_first})
            print(f"{n:>7} {label:<24} p95 {rows[-1]['p95_ms']:.3f} ms", flush=True)
    for row in rows:
        flat = next(r for r in rows if r["documents"] == row["documents"] and r["precision"] == "fp32")
        row["p95_vs_flat"] = row["p95_ms"] / flat["p95_ms"]
        row["bytes_vs_flat"] = row["served_bytes"] / flat["served_bytes"]
    header = ("| documents | index | p50 ms | p95 ms | p95 vs flat | vector MB | served MB | bytes vs flat "
              "| recall@10 vs exact | source doc @1 | build s |")
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['documents']:,} | {r['index']} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
                     f"{r['p95_vs_flat']:.2f}x | {r['vector_bytes'] / 1e6:.2f} | "
                     f"{r['served_bytes'] / 1e6:.2f} | {r['bytes_vs_flat']:.3f} | "
                     f"{r['recall_at_10_vs_exact']:.3f} | {r['source_at_1']:.3f} | "
                     f"{r['build_seconds']:.2f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "index_latency", "dim": DIM, "queries": args.queries, "k": 10,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "faiss": faiss.__version__, "threads": 1,
                    # p95 on a shared 2-core box is sensitive to whatever else runs; recorded here.
                    "load_average_1m_before": load_before, "load_average_1m_after": os.getloadavg()[0]},
        "rows": rows, "table": table,
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
