"""How much nDCG@10 a trained encoder keeps when its embeddings are truncated, per GOR weight.

    python benchmarks/matryoshka_retention.py --domain code --gor 0 0.1

Trains the heuristic rung's data (published by the main job) once per GOR weight, with the default
Matryoshka loss, and reports eval-set nDCG@10 at full, 1/2 and 1/4 dimensions, and the retention at
1/4 (the issue's goal: >= 95%). The off-the-shelf model truncated the same way is the baseline.
"""

import argparse
import tempfile
from pathlib import Path

from seed_spread import ndcg

from encoder_pipeline.defs.training.assets import dev_set
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.layout import read_pairs
from encoder_pipeline.lib.train import TrainingConfig, train_encoder
from encoder_pipeline.profiles import get_profile
from encoder_pipeline.resources import ArtifactStoreResource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="code")
    parser.add_argument("--gor", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store = ArtifactStoreResource().store()
    full = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL).get_sentence_embedding_dimension()
    dims = [full, full // 2, full // 4]
    rows = [("off-the-shelf", encoders.DEFAULT_BASE_MODEL)]
    print("| model | " + " | ".join(f"nDCG@10 @{d}" for d in dims) + " | kept at 1/4 |")
    print("|---|" + "---|" * (len(dims) + 1))
    with tempfile.TemporaryDirectory() as work:
        for weight in args.gor:
            out = Path(work) / f"gor{weight}"
            train_encoder(encoders.DEFAULT_BASE_MODEL, read_pairs(store, args.domain), out,
                          TrainingConfig(gor_weight=weight, seed=args.seed),
                          dev_set(store, args.domain, 0, get_profile("default").dev_distractors))
            rows.append((f"heuristic rung, GOR {weight}", str(out / "model")))
        for label, model in rows:
            scores = [ndcg(model, store, args.domain, d) for d in dims]
            print(f"| {label} | " + " | ".join(f"{s:.4f}" for s in scores) + f" | {scores[-1] / scores[0]:.1%} |",
                  flush=True)


if __name__ == "__main__":
    main()
