"""Repeat the ladder's training over several seeds on one domain's published training data, and
print mean and standard deviation of nDCG@10 per rung against the off-the-shelf model.

Run the main job first (it publishes the corpus, eval set and training data), then:

    python benchmarks/seed_spread.py --domain code --seeds 0 1 2

The data stages are fixed (seed 0 of the main job) so the spread measured is training's alone. The
off-the-shelf model is deterministic; the margin must exceed twice the top rung's deviation.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from encoder_pipeline.defs.shared import corpus_texts, embeddings_cache, read_corpus_units, read_eval_split
from encoder_pipeline.defs.training.assets import LADDER, dev_set
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.metrics import dense_run, evaluate
from encoder_pipeline.lib.train import TrainingConfig, train_encoder
from encoder_pipeline.profiles import get_profile
from encoder_pipeline.resources import ArtifactStoreResource

RESULTS = Path(__file__).parent / "results"


def ndcg(model: str, store, domain: str) -> float:
    units = read_corpus_units(store, domain)
    split = read_eval_split(store, domain)
    qids = list(split.queries)
    corpus = encoders.cached_embeddings(model, corpus_texts(units), embeddings_cache(store, domain))
    queries = encoders.encode(encoders.load_encoder(model), [split.queries[q] for q in qids])
    return evaluate(dense_run(queries, corpus, qids, list(units["parent_id"])), split.qrels)[0]["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="code")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    store = ArtifactStoreResource().store()
    sizes = get_profile(args.profile)
    base = ndcg(encoders.DEFAULT_BASE_MODEL, store, args.domain)
    scores: dict[str, list[float]] = {name: [] for name, *_ in LADDER}
    seconds: dict[str, list[float]] = {name: [] for name, *_ in LADDER}
    for seed in args.seeds:
        for name, _, rows_fn, _ in LADDER:
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                train_encoder(encoders.DEFAULT_BASE_MODEL, rows_fn(store, args.domain), work,
                              TrainingConfig(epochs=sizes.epochs, min_batch_size=sizes.batch_size, seed=seed),
                              dev_set(store, args.domain, 0))
                seconds[name].append(time.perf_counter() - started)
                scores[name].append(ndcg(str(Path(work) / "model"), store, args.domain))
            print(f"seed {seed} {name}: nDCG@10 {scores[name][-1]:.4f} ({seconds[name][-1]:.0f} s)", flush=True)
    print(f"\n| system | nDCG@10 mean | std | vs off-the-shelf | train s |\n|---|---|---|---|---|")
    print(f"| off-the-shelf | {base:.4f} | 0 | - | - |")
    summary = {"domain": args.domain, "seeds": args.seeds, "off_the_shelf": base, "rungs": {}}
    for name, values in scores.items():
        mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {mean:.4f} | {std:.4f} | {mean - base:+.4f} ({(mean - base) / max(std, 1e-9):.1f} std) "
              f"| {statistics.mean(seconds[name]):.0f} |")
        summary["rungs"][name] = {"scores": values, "mean": mean, "std": std,
                                  "margin": mean - base, "margin_exceeds_2_std": mean - base > 2 * std}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"seed_spread_{args.domain}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
