"""Query encoding on the CPU: the default torch backend vs ONNX Runtime int8 (and fp32 ONNX), speed
and quality, in one run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/query_encoding.py [--model PATH]

Speed: one query at a time (batch of 1, as a server answers), one thread, warm (warm-up queries are
not timed), over distinct queries (the Gene Ontology synonyms, >= 200), each query encoded by every
backend in turn (the order rotates per query so drift and neighbours hit all alike); p50/p95/mean ms
and the speed-up over torch. `encode(model, [q], batch_size=1, bf16=False)` is the call the report's
latency uses.

Quality: the cosine between each backend's embedding and torch's for the same query, and nDCG@10 /
Recall@100 on the gene_ontology dev qrels (pytrec_eval via lib.metrics) against a corpus sample of
every judged document plus `--distractors` others. Documents are embedded by torch, as the index
is built; only the query encoder changes, as it would when serving with ONNX.

Writes benchmarks/results/query_encoding.json.
"""

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.metrics import dense_run, evaluate

GO = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "biomedical" / "gene_ontology"
BACKENDS = ("torch", "onnx", "onnx-int8")
RESULTS = Path(__file__).resolve().parent / "results" / "query_encoding.json"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines()[1:]:
        qid, doc, score = line.split("\t")
        qrels.setdefault(qid, {})[doc] = int(score)
    return qrels


def time_queries(models: dict, queries: list[str], warmup: int) -> dict[str, list[float]]:
    for query in queries[:warmup]:
        for model in models.values():
            encoders.encode(model, [query], batch_size=1, bf16=False)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i, query in enumerate(queries[warmup:]):
        for name in names[i % len(names):] + names[:i % len(names)]:
            started = time.perf_counter()
            encoders.encode(models[name], [query], batch_size=1, bf16=False)
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=encoders.DEFAULT_BASE_MODEL,
                        help="a sentence-transformers folder (default: the packaged MiniLM base model)")
    parser.add_argument("--corpus", default=str(GO), help="a BEIR folder with a dev qrels file")
    parser.add_argument("--queries", type=int, default=300, help="distinct timed queries")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--distractors", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    torch.set_num_threads(1)  # the ONNX sessions take their thread count from torch's at load
    load_before = os.getloadavg()
    folder = Path(args.corpus)
    query_rows = read_jsonl(folder / "queries.jsonl")
    qrels = read_qrels(folder / "qrels" / "dev.tsv")
    texts = list(dict.fromkeys(row["text"] for row in query_rows))
    if len(texts) < args.queries + args.warmup:
        raise SystemExit(f"only {len(texts)} distinct queries in {folder}")

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        models = {name: encoders.load_encoder(args.model, backend=name, onnx_cache=cache)
                  for name in BACKENDS}
        export_seconds = time.perf_counter() - started
        sizes = {name: m.onnx_file.stat().st_size / 1e6 for name, m in models.items() if name != "torch"}
        timed = texts[:args.warmup + args.queries]
        times = time_queries(models, timed, args.warmup)

        queries = {row["_id"]: row["text"] for row in query_rows if row["_id"] in qrels}
        qids = list(queries)
        judged = {doc for rels in qrels.values() for doc in rels}
        docs = read_jsonl(folder / "corpus.jsonl")
        others = [d for d in docs if d["_id"] not in judged]
        sample = [d for d in docs if d["_id"] in judged] + random.Random(args.seed).sample(
            others, min(args.distractors, len(others)))
        doc_ids = [d["_id"] for d in sample]
        corpus = encoders.encode(models["torch"], encoders.document_texts(
            [d.get("title", "") for d in sample], [d.get("text", "") for d in sample]), bf16=False)
        query_texts = [queries[q] for q in qids]
        vectors = {name: encoders.encode(m, query_texts, batch_size=64, bf16=False)
                   for name, m in models.items()}
        timed_vectors = {name: encoders.encode(m, timed, batch_size=1, bf16=False)
                         for name, m in models.items()}

    rows = {}
    for name in BACKENDS:
        t = np.asarray(times[name])
        cos = np.sum(timed_vectors[name] * timed_vectors["torch"], axis=1)
        metrics = evaluate(dense_run(vectors[name], corpus, qids, doc_ids, 100), qrels)[0]
        rows[name] = {
            "p50_ms": float(np.percentile(t, 50)), "p95_ms": float(np.percentile(t, 95)),
            "mean_ms": float(t.mean()), "queries": len(t),
            "cosine_to_torch_mean": float(cos.mean()), "cosine_to_torch_min": float(cos.min()),
            "ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"],
            "onnx_mb": sizes.get(name),
        }
    for name in BACKENDS:
        rows[name]["speedup_p50_vs_torch"] = rows["torch"]["p50_ms"] / rows[name]["p50_ms"]
        rows[name]["speedup_p95_vs_torch"] = rows["torch"]["p95_ms"] / rows[name]["p95_ms"]
    result = {
        "model": args.model, "corpus": str(folder), "eval_queries": len(qids),
        "corpus_sample": len(sample), "judged_docs": len(judged), "threads": 1,
        "warmup_queries": args.warmup, "export_and_quantize_seconds": export_seconds,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__, "cpus": os.cpu_count(),
        "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]], "backends": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"{args.model}: {len(timed) - args.warmup} distinct queries timed one at a time, 1 thread; "
          f"nDCG on {len(qids)} dev queries vs {len(sample)} docs")
    print("| backend | p50 ms | p95 ms | x torch (p50) | x torch (p95) | cosine to torch (mean / min) "
          "| nDCG@10 | Recall@100 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['speedup_p50_vs_torch']:.2f} | "
              f"{r['speedup_p95_vs_torch']:.2f} | {r['cosine_to_torch_mean']:.4f} / "
              f"{r['cosine_to_torch_min']:.4f} | {r['ndcg@10']:.4f} | {r['recall@100']:.4f} |")
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs; wrote {out}")


if __name__ == "__main__":
    main()
