"""Backfills (README, "Backfills"): `encoder-pipeline backfill` submits a backfill of
train_encoder_job, and the Dagster daemon launches its runs. A real `dagster-daemon` process runs
against a throwaway DAGSTER_HOME (the project's dagster.yaml with its storage moved into the home) and
loads the code location from the project's workspace.yaml. The run it launches for the `code`
partition (tiny profile) has to start; it is not waited for: the daemon and everything it started are
killed at the end."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from encoder_pipeline import cli
from encoder_pipeline_tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
LAUNCH_TIMEOUT_S = 100  # daemon start, code location load, first backfill tick, queue, run start


def project_instance_home(home: Path) -> Path:
    """`home` as a DAGSTER_HOME: the project's dagster.yaml (its queued run coordinator included),
    its storage folders moved from `data/` into `home` (as conftest's tiny_dagster_home)."""

    def rebased(node):
        if not isinstance(node, dict):
            return node
        return {key: str(home / Path(value).relative_to("data")) if key == "base_dir" else rebased(value)
                for key, value in node.items()}

    home.mkdir(parents=True, exist_ok=True)
    config = rebased(yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text()))
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


def test_the_daemon_launches_a_cli_backfills_run(tmp_path, monkeypatch, capsys):
    home = project_instance_home(tmp_path / "dagster_home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(tmp_path / "artifacts"))
    monkeypatch.delenv("ENCODER_PIPELINE_DOMAINS", raising=False)  # the project's specs: `code`
    monkeypatch.chdir(tmp_path)  # the CLI moves to the project root; this restores the directory
    assert cli.main(["backfill", "--domains", "code", "--profile", "tiny"]) == 0
    instance = dg.DagsterInstance.from_config(str(home))
    [backfill] = instance.get_backfills()
    assert backfill.backfill_id in capsys.readouterr().out
    backfill_runs = dg.RunsFilter(tags={"dagster/backfill": backfill.backfill_id})
    assert instance.get_runs(backfill_runs) == []  # nothing runs it until a daemon does

    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", "workspace.yaml"],
                                  cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  start_new_session=True)  # its own process group: killed whole below
    try:
        deadline, runs = time.monotonic() + LAUNCH_TIMEOUT_S, []
        while time.monotonic() < deadline and daemon.poll() is None:
            runs = instance.get_runs(backfill_runs)
            if runs and runs[0].status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS,
                                           dg.DagsterRunStatus.FAILURE):
                break
            if instance.get_backfill(backfill.backfill_id).status.value == "FAILED":
                break  # the daemon gave up on it: the asserts below show its log
            time.sleep(1)
        assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}):\n{log.read_text()[-3000:]}"
        assert runs, f"no run of the backfill within {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
        [run] = runs
        assert run.status == dg.DagsterRunStatus.STARTED, (run.status, log.read_text()[-3000:])
        assert run.job_name == "train_encoder_job" and run.tags["dagster/partition"] == "code"
        assert run.tags["encoder_pipeline/reason"] == "encoder-pipeline backfill"
        assert run.run_config["resources"]["settings"]["config"]["profile"] == "tiny"
        started = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_START).records
        assert len(started) == 1, "the run's own process started executing it"
    finally:
        os.killpg(daemon.pid, signal.SIGKILL)  # the daemon, its code server and the run it launched
        daemon.wait(timeout=30)
