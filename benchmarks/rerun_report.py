"""Run the index sweep, the index and the report again on a finished build, with today's code.

For a change that touches only those stages (the rule that picks the served configuration, the
report): the trained rungs, the eval set and the caches of the build are reused, so a domain takes
minutes instead of the whole job. The build's own report stays in its history; the new one becomes
the latest. For a build of `benchmarks/any_corpus.py`, point ENCODER_PIPELINE_DOMAINS at its
`<work>/domains` first.

    python benchmarks/stage_timings.py --domain web_qa --seed 1 --root /tmp/st/web_qa-s1 --tag lexdev
    python benchmarks/rerun_report.py --domain web_qa --seed 1 --root /tmp/st/web_qa-s1 --tag rechosen

Writes `benchmarks/results/rerun_report_<domain>_<profile>_<tag>[_seed<seed>].json`: the served
configuration and the report's headline before and after (`stage_timings.headline`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import dagster as dg

from encoder_pipeline.lib.artifacts import ArtifactStore

STAGES = ("index_sweep", "embedding_index", "eval_report")


def chosen(store: ArtifactStore, domain: str) -> dict:
    """The sweep's choice: which rung, configuration, and why."""
    sweep = json.loads((store.latest(domain, "index_sweep") / "sweep.json").read_text())
    return {"rung": sweep["rung"], "name": sweep["chosen"]["name"], "bytes": sweep["chosen"]["bytes"],
            "reason": sweep["reason"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", required=True)
    parser.add_argument("--root", required=True, help="the finished build's artifact root")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--seed", type=int, default=0, help="the build's seed")
    parser.add_argument("--tag", default="rerun", help="suffix of the result file")
    args = parser.parse_args()
    if not (Path(args.root) / args.domain / "eval_report").exists():
        parser.error(f"{args.root} holds no finished {args.domain} build (no eval_report)")
    # A subset run takes the code location's own resources (Dagster refuses others for a subset),
    # so the root goes in the way users set it, before the definitions load (stage_timings loads them).
    os.environ["ENCODER_PIPELINE_HOME"] = args.root
    from stage_timings import RESULTS, device, headline

    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import domain_partitions

    store = ArtifactStore(args.root)
    before = {"served": chosen(store, args.domain), "report": headline(store, args.domain)}

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [args.domain])
    result = defs.resolve_job_def("train_encoder_job").execute_in_process(
        instance=instance, partition_key=args.domain, asset_selection=[dg.AssetKey(s) for s in STAGES],
        run_config={"resources": {"settings": {"config": {"profile": args.profile, "seed": args.seed}}}},
        raise_on_error=False)
    built = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    if "eval_report" not in built:
        raise SystemExit(f"the rerun failed before the report (built: {sorted(built)})")
    after = {"served": chosen(store, args.domain), "report": headline(store, args.domain)}
    for name, figures in (("before", before), ("after", after)):
        report = figures["report"]
        print(f"{name}: {figures['served']['rung']} {figures['served']['name']}: served nDCG@10 "
              f"{report['served']['ndcg@10']:.4f} vs off-the-shelf {report['off_the_shelf']['ndcg@10']:.4f} "
              f"(p = {report['served_vs_off_the_shelf']['p']:.4f})\n  {figures['served']['reason']}")
    suffix = f"_{args.tag}" + (f"_seed{args.seed}" if args.seed else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"rerun_report_{args.domain}_{args.profile}{suffix}.json").write_text(json.dumps(
        {"device": device(), "seed": args.seed, "before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
