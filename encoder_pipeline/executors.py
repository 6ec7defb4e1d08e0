"""The Dagster executor that runs a run's steps, chosen by configuration, not code.

ENCODER_PIPELINE_EXECUTOR:
- `multiprocess` (default): each step in its own process on this machine, at most
  ENCODER_PIPELINE_MAX_CONCURRENT (default 2) at once: a training step fills a small machine. The
  step processes fork from a server that imported the code location once per run (`forkserver`,
  where the platform has it), instead of each importing torch, sentence-transformers and Daft again.
- `in_process`: every step in the run's process (debugging).
- `k8s`: dagster-k8s's `k8s_job_executor`, each step a Kubernetes Job (`pip install -e ".[scale]"`).
- `celery`: dagster-celery's `celery_executor`, steps queued to Celery workers.

ENCODER_PIPELINE_EXECUTOR_CONFIG names a YAML file with the executor's config (`deploy/k8s_executor.yaml`
and `deploy/celery_executor.yaml` are the documented starting points); it is checked against the
executor's schema when the code location loads, so a typo fails there, naming the file.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import dagster as dg
import yaml
from dagster._config import process_config

EXECUTOR_ENV = "ENCODER_PIPELINE_EXECUTOR"
CONFIG_ENV = "ENCODER_PIPELINE_EXECUTOR_CONFIG"
CONCURRENCY_ENV = "ENCODER_PIPELINE_MAX_CONCURRENT"
DEFAULT_MAX_CONCURRENT = 2
KINDS = ("multiprocess", "in_process", "k8s", "celery")
CODE_LOCATION_MODULE = "encoder_pipeline.definitions"


class ExecutorConfigError(ValueError):
    """An executor name or config file that does not fit the executor's schema."""


def _base_executor(kind: str) -> dg.ExecutorDefinition:
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    raise ExecutorConfigError(f"{EXECUTOR_ENV}={kind!r}: expected one of {', '.join(KINDS)}")


def validated_config(kind: str, config: dict, source: str) -> dict:
    """`config` checked against the `kind` executor's schema (errors name `source` and the field)."""
    checked = process_config(_base_executor(kind).config_schema.config_type, config)
    if not checked.success:
        problems = "; ".join(error.message for error in checked.errors)
        raise ExecutorConfigError(f"{source}: not a valid {kind} executor config: {problems}")
    return config


def load_config(path: str | Path, kind: str) -> dict:
    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise ExecutorConfigError(f"{path}: expected a mapping of executor settings")
    return validated_config(kind, config, str(path))


def _forked_steps() -> dict:
    """The multiprocess executor's start method: steps forked from a server that preloaded the code
    location (importing it takes 10-20 s on a 2-core host, paid once per run instead of per step:
    docs/results.md, "Step processes forked from a preloaded server"). The module is named here
    because Dagster 1.13 reads an omitted `preload_modules` as an empty list, not as its documented
    default (the job's module), and would preload nothing."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawn, Dagster's default
        return {}
    return {"start_method": {"forkserver": {"preload_modules": [CODE_LOCATION_MODULE]}}}


def executor_from_env(environ: dict[str, str] | None = None) -> dg.ExecutorDefinition:
    """The configured executor (see the module docstring)."""
    environ = os.environ if environ is None else environ
    kind = environ.get(EXECUTOR_ENV, "multiprocess")
    executor = _base_executor(kind)
    if environ.get(CONFIG_ENV):
        config = load_config(environ[CONFIG_ENV], kind)
    elif kind == "multiprocess":
        config = {"max_concurrent": int(environ.get(CONCURRENCY_ENV, DEFAULT_MAX_CONCURRENT)),
                  **_forked_steps()}
    else:
        config = {}
    return executor.configured(config, name=f"{executor.name}_configured") if config else executor
