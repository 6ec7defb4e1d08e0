"""Training throughput and peak memory of the loss levers: MNRL at batch 32 against GradCache'd MNRL
at effective batch 32, 256 and 1024 (mini-batch 32), plus the ladder's default loss at batch 32
(Matryoshka 384/192/96/48 + GOR, uncached at that batch), in bf16 mixed precision where the CPU
computes bf16 natively (the default) and in fp32.

    python benchmarks/training_levers.py --pairs 2048

Each configuration trains one epoch of the same docstring -> function pairs (the `code` domain's
standard library, max_seq_length 128) in a fresh subprocess, because ru_maxrss is a per-process
high-water mark. Pairs/second counts training steps only (no evaluation, no checkpoint writes).
GradCache's peak should stay nearly flat as the batch grows: only one mini-batch of activations is
alive at a time, and the per-batch extra is the embeddings and their gradients (batch x columns x dim).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CONFIGS = {
    "mnrl_b32": {"batch_size": 32, "gradcache": False, "matryoshka_dims": (), "gor_weight": 0.0},
    "cached_b32": {"batch_size": 32, "gradcache": True, "matryoshka_dims": (), "gor_weight": 0.0},
    "cached_b256": {"batch_size": 256, "gradcache": True, "matryoshka_dims": (), "gor_weight": 0.0},
    "cached_b1024": {"batch_size": 1024, "gradcache": True, "matryoshka_dims": (), "gor_weight": 0.0},
    "default_loss_b32": {"batch_size": 32},  # TrainingConfig's defaults (bf16 where native)
    "default_loss_b32_fp32": {"batch_size": 32, "bf16": False},
}


def build_pairs(count: int, path: Path) -> int:
    from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
    from encoder_pipeline.lib.extractors import ExtractorConfig
    from encoder_pipeline.lib.pairs import extract_training_pairs
    from encoder_pipeline.lib.sources import read_corpus

    units, _ = clean_corpus(read_corpus("python_stdlib", ""),
                            CleaningConfig(min_words=5, normalize_whitespace=False,
                                           max_documents=max(400, 4 * count)))
    pairs = extract_training_pairs(units, ["docstring"], ExtractorConfig()).pairs
    pairs = pairs.drop_duplicates("query").drop_duplicates("positive").head(count)
    pairs[["query", "positive"]].to_parquet(path, index=False)
    return len(pairs)


def child(name: str, pairs_path: str, max_seq_length: int, threads: int) -> None:
    import pandas as pd
    import torch
    from transformers import TrainerCallback

    class PeakDuringSteps(TrainerCallback):
        """ru_maxrss after each step: the peak of training itself, before the epoch-end checkpoint
        write and the reload of the kept checkpoint, which can top it."""

        mb = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
    from encoder_pipeline.lib.train import TrainingConfig, train_encoder

    if threads:
        torch.set_num_threads(threads)
    rows = pd.read_parquet(pairs_path)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = TrainingConfig(**CONFIGS[name], max_seq_length=max_seq_length, epochs=1,
                            checkpoint_every_s=1e9)
    peak = PeakDuringSteps()
    with tempfile.TemporaryDirectory() as work:
        result = train_encoder(DEFAULT_BASE_MODEL, rows, work, config, callbacks=[peak])
    print(json.dumps({"config": name, "loss": result.loss, "pairs": result.training_rows,
                      "batch_size": result.batch_size, "steps": result.steps,
                      "pairs_per_second": result.pairs_per_second,
                      "train_seconds": result.train_seconds, "rss_before_training_mb": round(loaded_mb, 1),
                      "peak_rss_during_steps_mb": round(peak.mb, 1),
                      "peak_rss_mb": result.peak_memory_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2048, help="training pairs (>= 1024 for batch 1024)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "PAIRS_PARQUET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.max_seq_length, args.threads)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_path = Path(tmp) / "pairs.parquet"
        count = build_pairs(args.pairs, pairs_path)
        print(f"{count} docstring -> function pairs, max_seq_length {args.max_seq_length}", flush=True)
        for name in args.configs:
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, __file__, "--child", name, str(pairs_path),
                 "--max-seq-length", str(args.max_seq_length), "--threads", str(args.threads)],
                capture_output=True, text=True, check=False)
            if run.returncode != 0:
                sys.exit(f"{name} failed:\n{run.stderr[-4000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"{name}: {results[-1]['pairs_per_second']} pairs/s, "
                  f"peak during steps {results[-1]['peak_rss_during_steps_mb']} MB "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    print("\n| config | loss | batch | steps | pairs/s | x mnrl_b32 | peak RSS during steps MB "
          "| peak RSS MB | before training MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = next((r["pairs_per_second"] for r in results if r["config"] == "mnrl_b32"), None)
    for r in results:
        ratio = f"{r['pairs_per_second'] / reference:.2f}" if reference else "-"
        print(f"| {r['config']} | {r['loss']} | {r['batch_size']} | {r['steps']} | {r['pairs_per_second']} "
              f"| {ratio} | {r['peak_rss_during_steps_mb']} | {r['peak_rss_mb']} "
              f"| {r['rss_before_training_mb']} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"training_levers_{args.pairs}.json"
    out.write_text(json.dumps({"pairs": args.pairs, "max_seq_length": args.max_seq_length,
                               "threads": args.threads, "results": results}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
