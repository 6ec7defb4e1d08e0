"""What a step costs before it starts under the multiprocess executor (UI, schedule and sensor runs;
`encoder-pipeline materialize` runs its steps in one process): Python's `spawn`, where each step's
process imports the code location again, against the project's default, steps forked from a server
that imported it once per run (`forkserver`, executors.py).

    python benchmarks/step_start.py                       # the tiny `code` graph, each method twice
    python benchmarks/step_start.py --domain web_qa --rounds 1

Each run is the real CLI, `dagster job execute ... -j train_encoder_job` with the domain's partition
tag, on a persistent instance in a temporary DAGSTER_HOME and a fresh artifact root, at the `tiny`
profile (the step's own work is the same under both methods; only the start differs); the start
method comes from an executor config file (ENCODER_PIPELINE_EXECUTOR_CONFIG), the methods
alternate. The `code` corpus is cut to the suite's packages of the standard library.

Prints per run, from Dagster's events: the run's wall seconds, and summed over its steps the seconds
from the executor launching a step's process to the step's start (process start, imports, loading
the job, resources); then the ratio forkserver / spawn of each. Writes
benchmarks/results/step_start_<tag>.json (`--tag`, default the CPU's bf16 support).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.events import DagsterEventType
from stage_timings import device

from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.executors import CODE_LOCATION_MODULE, CONFIG_ENV, DEFAULT_MAX_CONCURRENT
from encoder_pipeline.lib.encoders import native_bf16

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"
CODE_PACKAGES = ["http", "logging", "json", "csv", "shutil", "textwrap", "calendar"]  # as the suite's
START_METHODS = {"spawn": {"spawn": {}},
                 "forkserver": {"forkserver": {"preload_modules": [CODE_LOCATION_MODULE]}}}


def dagster_home(folder: Path) -> Path:
    """A DAGSTER_HOME with the project's dagster.yaml, its storage moved into the home."""
    def rebased(node):
        if not isinstance(node, dict):
            return node
        return {key: str(folder / Path(value).relative_to("data")) if key == "base_dir" else rebased(value)
                for key, value in node.items()}

    folder.mkdir(parents=True)
    config = rebased(yaml.safe_load((ROOT / "dagster.yaml").read_text()))
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    return folder


def domains_folder(folder: Path, domain: str) -> Path:
    folder.mkdir(parents=True)
    spec = (ROOT / "data" / "domains" / f"{domain}.toml").read_text()
    if domain == "code":
        spec = spec.replace("[corpus]\n", f"[corpus]\ninclude = {CODE_PACKAGES}\n")
    (folder / f"{domain}.toml").write_text(spec)
    return folder


def step_start_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Per step: from the executor launching its process to the step's start."""
    launched, started = {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_WORKER_STARTING:
            launched[event.step_key] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_START:
            started[event.step_key] = entry.timestamp
    return {step: round(started[step] - launched[step], 2) for step in launched if step in started}


def run_once(work: Path, method: str, domain: str, env: dict[str, str]) -> dict:
    config = work / f"{method}.yaml"
    config.write_text(yaml.safe_dump({"max_concurrent": DEFAULT_MAX_CONCURRENT,
                                      "start_method": START_METHODS[method]}))
    artifacts = Path(tempfile.mkdtemp(dir=work, prefix=f"artifacts-{method}-"))
    command = [sys.executable, "-m", "dagster", "job", "execute", "-m", CODE_LOCATION_MODULE, "-a", "defs",
               "-j", "train_encoder_job", "--tags", json.dumps({"dagster/partition": domain})]
    started = time.perf_counter()
    finished = subprocess.run(command, env={**env, CONFIG_ENV: str(config), "ENCODER_PIPELINE_HOME": str(artifacts)},
                              capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{method} run failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        run = instance.get_runs(limit=1)[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        steps = step_start_seconds(instance, run.run_id)
    return {"method": method, "wall_s": round(wall, 1), "step_start_s": round(sum(steps.values()), 1),
            "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="step_start-") as folder:
        work = Path(folder)
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home(work / "dagster_home")),
               "ENCODER_PIPELINE_DOMAINS": str(domains_folder(work / "domains", args.domain)),
               "ENCODER_PIPELINE_CORPUS_ROOT": os.environ.get("ENCODER_PIPELINE_CORPUS_ROOT", str(SHARED_CORPORA)),
               "ENCODER_PIPELINE_PROFILE": "tiny"}
        env.pop("ENCODER_PIPELINE_EXECUTOR", None)
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            instance.add_dynamic_partitions(domain_partitions.name, [args.domain])
        runs = []
        for _ in range(args.rounds):
            for method in START_METHODS:
                runs.append(run_once(work, method, args.domain, env))
                print(f"{method:>10}: run {runs[-1]['wall_s']:7.1f} s, steps' start "
                      f"{runs[-1]['step_start_s']:6.1f} s over {len(runs[-1]['steps'])} steps", flush=True)

    def mean(method: str, key: str) -> float:
        values = [run[key] for run in runs if run["method"] == method]
        return sum(values) / len(values)

    ratios = {key: round(mean("forkserver", key) / mean("spawn", key), 3) for key in ("wall_s", "step_start_s")}
    print(f"forkserver / spawn: run {ratios['wall_s']:.2f}x, steps' start {ratios['step_start_s']:.2f}x")
    tag = args.tag or ("bf16" if native_bf16() else "no-bf16")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"step_start_{args.domain}_{tag}.json"
    out.write_text(json.dumps({"device": device(), "domain": args.domain, "profile": "tiny",
                               "load_average": os.getloadavg(), "runs": runs, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
