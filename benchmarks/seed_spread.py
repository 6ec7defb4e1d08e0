"""Repeat training over several seeds on one domain's published training data, and print mean and
standard deviation of nDCG@10 on the eval set per variant, against the off-the-shelf model.

    python benchmarks/seed_spread.py --domain code --seeds 0 1 2                  # the ladder
    python benchmarks/seed_spread.py --domain web_qa --ablation synthetic --materialize
    python benchmarks/seed_spread.py --domain biomedical --fine-tuned-weights 1.0 0.5   # WiSE-FT
    python benchmarks/seed_spread.py --domain biomedical --teacher all-mpnet-base-v2 \
        --variants encoder_hard_negatives                 # re-mine with another teacher, top rung only

Ablations:
- `ladder`: the three rungs (heuristic -> + synthetic -> + hard negatives), as the pipeline trains them.
- `synthetic`: heuristic only; + unfiltered synthetic queries (every parsed query, seed positive);
  + synthetic after relabeling and the round-trip filter.

`--teacher` first re-materializes `mined_negatives` with that mining teacher (a new version in the
artifact root, which later runs read as the latest). `--variants` keeps only the named variants.

`--fine-tuned-weights` evaluates each trained model at several WiSE-FT weights
(`interpolate_with_base`; 1.0 is the plain fine-tune) without training it again.

`--precision fp32` trains in fp32 even where the CPU computes bf16 natively (the default, `bf16`,
trains in bf16 mixed precision there), to compare the two on the same data and seeds.

The data stages are fixed (seed 0) so the spread measured is training's alone; `--materialize` first
builds the data stages the ablation needs (through Dagster, into the artifact root) when missing.
"""

import argparse
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd

from encoder_pipeline.definitions import defs
from encoder_pipeline.defs.shared import embeddings_cache
from encoder_pipeline.defs.training.assets import RUNGS, dev_set, training_rows
from encoder_pipeline.domains import domain_partitions, load_domain
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore, MissingArtifact
from encoder_pipeline.lib.index import truncate
from encoder_pipeline.lib.layout import (
    SYNTHETIC_QUERIES,
    corpus_texts,
    latest,
    read_eval_split,
    read_pairs,
    read_sample_units,
)
from encoder_pipeline.lib.metrics import dense_run, evaluate
from encoder_pipeline.lib.teacher import TeacherEmbedder
from encoder_pipeline.lib.train import TrainingConfig, interpolate_with_base, train_encoder
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.profiles import get_profile
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)

RESULTS = Path(__file__).parent / "results"
RowsFn = Callable[[ArtifactStore, str], pd.DataFrame]


def _unfiltered(store: ArtifactStore, domain: str) -> pd.DataFrame:
    synthetic = latest(store, domain, SYNTHETIC_QUERIES).unfiltered()
    return pd.concat([read_pairs(store, domain), synthetic], ignore_index=True)


def _filtered(store: ArtifactStore, domain: str) -> pd.DataFrame:
    return pd.concat([read_pairs(store, domain), latest(store, domain, SYNTHETIC_QUERIES).rows()],
                     ignore_index=True)


ABLATIONS: dict[str, tuple[list[str], list[tuple[str, RowsFn]]]] = {
    "ladder": (["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives"],
               [(name, functools.partial(training_rows, rung=name)) for name in RUNGS]),
    "synthetic": (["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries"], [
        ("heuristic only", lambda store, domain: read_pairs(store, domain)),
        ("+ unfiltered synthetic", _unfiltered),
        ("+ relabeled, round-trip filtered synthetic", _filtered),
    ]),
}


def materialize(domain: str, assets: list[str], profile: str, teacher: str = "") -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [domain])
    graph = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]  # the others provide their versions
    settings = PipelineSettings(profile=profile, teacher_model=teacher)
    result = dg.materialize(graph, selection=assets, instance=instance, partition_key=domain, resources={
        PUBLISHED: published_artifacts,
        "artifacts": ArtifactStoreResource(), "settings": settings, "llm": LLMResource()})
    assert result.success


def ndcg(model: str, store: ArtifactStore, domain: str, dims: int | None = None) -> float:
    """Eval-set nDCG@10 on the training sample (the ladder's haystack, as the report compares rungs),
    optionally with embeddings truncated to their first `dims` (Matryoshka)."""
    units = read_sample_units(store, domain)
    split = read_eval_split(store, domain)
    qids = list(split.queries)
    encoder = encoders.EncoderHandle(model)
    corpus = cached_embeddings(encoder, corpus_texts(units), embeddings_cache(store, domain))
    queries = encoder.encode([split.queries[q] for q in qids])
    width = dims or corpus.shape[1]
    corpus, queries = truncate(corpus, width), truncate(queries, width)
    return evaluate(dense_run(queries, corpus, qids, list(units["parent_id"])), split.qrels)[0]["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="code")
    parser.add_argument("--ablation", choices=sorted(ABLATIONS), default="ladder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--materialize", action="store_true")
    parser.add_argument("--teacher", help="re-mine hard negatives with this teacher before training")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all)")
    parser.add_argument("--distill-weight", type=float,
                        help="default: the domain spec's training.distill_weight, else the recipe's")
    parser.add_argument("--fine-tuned-weights", type=float, nargs="+",
                        help="default: the domain spec's training.fine_tuned_weight, else 1")
    parser.add_argument("--epochs", type=float, help="default: the profile's; the best epoch on dev is kept")
    parser.add_argument("--learning-rate", type=float, help="default: the recipe's")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="training precision: bf16 mixed precision where native (the pipeline's), or fp32")
    args = parser.parse_args()
    store = ArtifactStoreResource().store()
    needed, variants = ABLATIONS[args.ablation]
    if args.materialize:
        try:
            for asset in needed:
                store.latest_version(args.domain, asset)
        except MissingArtifact:
            materialize(args.domain, needed, args.profile)
    if args.teacher:
        materialize(args.domain, ["mined_negatives"], args.profile, args.teacher)
    if args.variants:
        unknown = set(args.variants) - {variant for variant, _ in variants}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {[v for v, _ in variants]}")
        variants = [(variant, rows_fn) for variant, rows_fn in variants if variant in args.variants]
    sizes = get_profile(args.profile)
    base = ndcg(encoders.DEFAULT_BASE_MODEL, store, args.domain)
    spec = load_domain(args.domain)
    # Unset in the spec, the pipeline chooses the share on the dev slice; here each share is scored.
    weights = args.fine_tuned_weights or [1.0 if spec.training.fine_tuned_weight is None
                                          else spec.training.fine_tuned_weight]
    distill_weight = next(w for w in (args.distill_weight, spec.training.distill_weight,
                                      TrainingConfig.distill_weight) if w is not None)
    # The teacher that mined is the one distilled, as in the pipeline's rungs.
    teacher = store.manifest(args.domain, "mined_negatives")["config"]["teacher"]
    embedder = TeacherEmbedder(encoders.EncoderHandle(teacher), embeddings_cache(store, args.domain))

    def label(variant: str, weight: float) -> str:
        return variant if len(weights) == 1 else f"{variant}, fine-tuned weight {weight:g}"

    names = [label(variant, weight) for variant, _ in variants for weight in weights]
    scores: dict[str, list[float]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    dev_history: dict[str, list[list[dict]]] = {name: [] for name in names}  # per seed: dev nDCG@10 by epoch
    rows_used: dict[str, int] = {}
    for seed in args.seeds:
        for variant, rows_fn in variants:
            rows = rows_fn(store, args.domain)
            with tempfile.TemporaryDirectory() as work:
                started = time.perf_counter()
                config = TrainingConfig(epochs=args.epochs or sizes.epochs, min_batch_size=sizes.batch_size,
                                        seed=seed, fine_tuned_weight=1.0, distill_weight=distill_weight,
                                        bf16=args.precision == "bf16", teacher=encoders.model_fingerprint(teacher),
                                        **({"learning_rate": args.learning_rate} if args.learning_rate else {}))
                result = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, work, config,
                                       dev_set(store, args.domain, 0, sizes.dev_distractors), teacher=embedder)
                took = time.perf_counter() - started
                trained = encoders.load_encoder(str(Path(work) / "model"), fresh=True)
                fine_tuned = {key: tensor.clone() for key, tensor in trained.state_dict().items()}
                for weight in weights:
                    name = label(variant, weight)
                    model = Path(work) / f"model-{weight:g}"
                    trained.load_state_dict(fine_tuned)  # the interpolation works in place
                    interpolate_with_base(trained, encoders.load_encoder(encoders.DEFAULT_BASE_MODEL), weight)
                    trained.save_pretrained(str(model))
                    rows_used[name] = len(rows)
                    seconds[name].append(took)
                    dev_history[name].append(result.dev_history)
                    scores[name].append(ndcg(str(model), store, args.domain))
                    print(f"seed {seed} {name}: nDCG@10 {scores[name][-1]:.4f} ({took:.0f} s; dev by epoch "
                          f"{result.dev_history}, best step {result.best_step})", flush=True)
    print(f"\n{args.domain}, {args.ablation}, seeds {args.seeds}\n")
    print("| system | rows | nDCG@10 mean | std | vs off-the-shelf | train s |\n|---|---|---|---|---|---|")
    print(f"| off-the-shelf | - | {base:.4f} | 0 | - | - |")
    summary = {"domain": args.domain, "ablation": args.ablation, "seeds": args.seeds,
               "teacher": teacher, "precision": args.precision,
               "distill_weight": distill_weight, "epochs": args.epochs or sizes.epochs,
               "learning_rate": args.learning_rate or TrainingConfig.learning_rate,
               "off_the_shelf": base, "variants": {}}
    for name, values in scores.items():
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        spread = f"{(mean - base) / std:.1f} std" if std else "one seed: no spread"
        print(f"| {name} | {rows_used[name]} | {mean:.4f} | {std:.4f} | {mean - base:+.4f} ({spread}) "
              f"| {statistics.mean(seconds[name]):.0f} |")
        summary["variants"][name] = {"rows": rows_used[name], "scores": values, "mean": mean, "std": std,
                                     "margin": mean - base, "margin_exceeds_2_std": mean - base > 2 * std,
                                     "dev_history": dev_history[name]}
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"_teacher-{Path(args.teacher).name}" if args.teacher else "") + \
        (f"_distill-{distill_weight:g}" if distill_weight else "") + \
        ("_fp32" if args.precision == "fp32" else "") + \
        (f"_epochs-{args.epochs:g}" if args.epochs else "") + \
        (f"_lr-{args.learning_rate:g}" if args.learning_rate else "") + \
        ("".join(f"_{variant}" for variant, _ in variants) if args.variants else "")
    out = RESULTS / f"seed_spread_{args.domain}_{args.ablation}{suffix}.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
