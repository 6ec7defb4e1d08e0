"""What a rung spends around its training steps: one `train_encoder` call at the default profile's
sizes, this tree's `lib/train.py` against a baseline revision's, alternating, same inputs, in one run.

    python benchmarks/rung_passes.py [--baseline 9abf0e5] [--rounds 2]

Inputs: `--rows` docstring -> function pairs of the python_stdlib corpus to train on (one epoch,
batch 32), a dev slice of `--dev-queries` other pairs' docstrings against their functions plus
`--distractors` more functions (the default profile: 100 queries, 1,000 distractors), the default
merge search (shares 1, 0.75, 0.5, 0.25, 0) and the variance ordering. Each call runs as a rung's
step does in a build (its own process: no base-model embeddings kept from an earlier call); this
tree's reads the base model's dev embeddings through an embedding cache that already holds the dev
corpus and not the queries, as the rung's step finds it after the training-data stages.

Prints each call's wall seconds and the texts it passed through a model (`SentenceTransformer.encode`,
the cache's misses included), one pass of the
dev slice through the base model (the unit), and the ratio of this tree's time to the baseline's.
Writes benchmarks/results/rung_passes_<tag>.json (`--tag`, default the CPU's bf16 support).
"""

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from stage_timings import device

from encoder_pipeline.lib import train
from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, EncoderHandle, native_bf16
from encoder_pipeline.lib.extractors import ExtractorConfig
from encoder_pipeline.lib.pairs import extract_training_pairs
from encoder_pipeline.lib.sources import read_corpus
from encoder_pipeline.lib.vector_cache import cached_embeddings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def baseline_module(revision: str, folder: Path):
    """`lib/train.py` as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:encoder_pipeline/lib/train.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = folder / "train_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def count_encoded_texts(counter: list[int]) -> None:
    """Count every text any sentence-transformers model encodes (`SentenceTransformer.encode`: what
    `lib.encoders.encode`, the embedding cache and sentence-transformers' own evaluators call)."""
    real = SentenceTransformer.encode

    def encode(self, *args, **kwargs):
        sentences = args[0] if args else kwargs["inputs"]  # encode_query passes them by name
        counter[0] += 1 if isinstance(sentences, str) else len(sentences)
        return real(self, *args, **kwargs)

    SentenceTransformer.encode = encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="9abf0e5", help="the revision whose lib/train.py is the baseline")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--dev-queries", type=int, default=100)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    units, _ = clean_corpus(read_corpus("python_stdlib", ""),
                            CleaningConfig(min_words=5, normalize_whitespace=False, max_documents=8000))
    pairs = extract_training_pairs(units, ["docstring"], ExtractorConfig()).pairs
    needed = args.rows + args.dev_queries + args.distractors
    if len(pairs) < needed:
        raise SystemExit(f"python_stdlib gave {len(pairs)} pairs; these sizes need {needed}")
    rows = pairs.iloc[:args.rows]
    dev_pairs = pairs.iloc[args.rows:args.rows + args.dev_queries]
    others = pairs.iloc[args.rows + args.dev_queries:needed]
    queries = {f"q{i}": q for i, q in enumerate(dev_pairs["query"])}
    corpus = {**dict(zip(dev_pairs["doc_id"], dev_pairs["positive"], strict=True)),
              **dict(zip(others["doc_id"], others["positive"], strict=True))}
    relevant = {f"q{i}": {d} for i, d in enumerate(dev_pairs["doc_id"])}
    cpu = device()
    print(f"{cpu}, {torch.get_num_threads()} threads; {len(rows)} rows, {len(queries)} dev queries, "
          f"{len(corpus)} dev corpus texts", flush=True)

    with tempfile.TemporaryDirectory(prefix="rung-passes-") as scratch:
        baseline = baseline_module(args.baseline, Path(scratch))
        base = EncoderHandle(DEFAULT_BASE_MODEL)
        started = time.perf_counter()
        cached_embeddings(base, list(corpus.values()), Path(scratch) / "cache")  # what the rung finds cached
        one_pass = time.perf_counter() - started
        print(f"one pass of the dev corpus through the base model: {one_pass:.1f} s", flush=True)
        arms = {"baseline": baseline, "this tree": train}
        texts = [0]
        count_encoded_texts(texts)
        calls: list[dict] = []
        for round_ in range(args.rounds):
            for name in (list(arms) if round_ % 2 else list(arms)[::-1]):
                module = arms[name]
                texts[0] = 0
                getattr(module, "_base_scores", {}).clear()  # a rung's step starts with none kept
                getattr(module, "_base_embeddings", {}).clear()
                dev = module.DevSet(queries, corpus, relevant)
                config = module.TrainingConfig(batch_size=32, epochs=1)
                started = time.perf_counter()
                extra = ({} if module is baseline else {"base_dev_embeddings": dev.embedded_by(
                    partial(cached_embeddings, base, cache_dir=Path(scratch) / "cache"))})
                result = module.train_encoder(DEFAULT_BASE_MODEL, rows, Path(scratch) / f"{name}-{round_}",
                                              config, dev, **extra)
                seconds = time.perf_counter() - started
                calls.append({"arm": name, "round": round_, "seconds": round(seconds, 1), "texts_encoded": texts[0],
                              "dev_ndcg_at_10": result.dev_ndcg_at_10, "fine_tuned_weight": result.fine_tuned_weight})
                print(f"round {round_} {name}: {seconds:.1f} s, {texts[0]} texts through a model, "
                      f"dev nDCG@10 {result.dev_ndcg_at_10} (share {result.fine_tuned_weight:g})", flush=True)
    mean = {name: sum(c["seconds"] for c in calls if c["arm"] == name) / args.rounds for name in arms}
    ratio = mean["this tree"] / mean["baseline"]
    print(f"mean: baseline {mean['baseline']:.1f} s, this tree {mean['this tree']:.1f} s, ratio {ratio:.2f}; "
          f"one dev pass {one_pass:.1f} s", flush=True)
    tag = args.tag or ("bf16" if native_bf16() else "avx2")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"rung_passes_{tag}.json").write_text(json.dumps({
        "cpu": cpu, "baseline": args.baseline, "rows": len(rows), "dev_queries": len(queries),
        "dev_corpus": len(corpus), "one_dev_pass_seconds": round(one_pass, 1), "calls": calls,
        "mean_seconds": {k: round(v, 1) for k, v in mean.items()}, "ratio": round(ratio, 3)}, indent=2))


if __name__ == "__main__":
    main()
