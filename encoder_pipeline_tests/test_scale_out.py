"""Scaling out: the data stages on Daft's Ray runner, and the executors chosen by configuration.

A local Ray cluster (2 CPUs, no dashboard, a 200 MB object store, on 127.0.0.1) runs `clean_corpus`
and the corpus embedding for a small `code` partition; Daft can set its runner once per process, so
that run happens in a subprocess. Its results must equal the native runner's, run here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml

from encoder_pipeline import executors
from encoder_pipeline.executors import CONFIG_ENV, EXECUTOR_ENV, ExecutorConfigError, executor_from_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOMAIN = "code"
EMBED_WORKERS = 2
pytestmark = pytest.mark.filterwarnings("ignore:Found version mismatch between:UserWarning")


def _materialize_and_embed(root: Path, ray_address: str) -> dict:
    """clean_corpus for DOMAIN (tiny profile) into `root`, then its units embedded (fp32, so the two
    runners' batching cannot move the numbers beyond float noise). Returns the runner used."""
    import daft

    from encoder_pipeline.defs.corpus.assets import clean_corpus
    from encoder_pipeline.domains import domain_partitions
    from encoder_pipeline.lib.artifacts import ArtifactStore
    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, EncoderHandle, document_texts
    from encoder_pipeline.lib.engines import embed_texts
    from encoder_pipeline.lib.layout import CORPUS_FILE
    from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [DOMAIN])
    settings = PipelineSettings(profile="tiny", ray_address=ray_address, ray_embed_workers=EMBED_WORKERS)
    result = dg.materialize([clean_corpus], instance=instance, partition_key=DOMAIN, resources={
        PUBLISHED: published_artifacts,
        "artifacts": ArtifactStoreResource(root=str(root)), "settings": settings, "llm": LLMResource()})
    assert result.success
    units = pd.read_parquet(ArtifactStore(root).latest(DOMAIN, "clean_corpus") / CORPUS_FILE)
    units = units[units["in_sample"]]  # the comparison needs no more than the training sample
    vectors = embed_texts(EncoderHandle(DEFAULT_BASE_MODEL, bf16=False), document_texts(units["title"], units["text"]))
    units.to_parquet(root / "units.parquet")
    np.save(root / "vectors.npy", vectors)
    return {"runner": daft.get_or_infer_runner_type()}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head for this module; shut down (all its processes) at teardown."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        # Bind to 127.0.0.1, not the LAN address (Ray reads the variable at import, hence both).
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        patch.setenv("RAY_AUTH_MODE", "disabled")  # loopback only; no token written to ~/.ray
        context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                           log_to_driver=False, configure_logging=False)
        try:
            yield context.address_info["gcs_address"]
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> tuple[Path, dict, Path]:
    """(Ray root, what the Ray run reported, native root): the native run goes on here meanwhile.
    Both read the `code` spec cut as the tiny build's (the subprocess runs this file, not pytest)."""
    from encoder_pipeline_tests.conftest import tiny_code_spec

    ray_root, native_root = tmp_path_factory.mktemp("on_ray"), tmp_path_factory.mktemp("native")
    domains = tmp_path_factory.mktemp("domains")
    (domains / f"{DOMAIN}.toml").write_text(tiny_code_spec())
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled",
           "ENCODER_PIPELINE_DOMAINS": str(domains)}
    with pytest.MonkeyPatch.context() as patch, subprocess.Popen(
            [sys.executable, __file__, str(ray_root), ray_cluster], env=env, stderr=subprocess.PIPE,
            text=True) as on_ray:
        patch.setenv("ENCODER_PIPELINE_DOMAINS", str(domains))
        native = _materialize_and_embed(native_root, ray_address="")
        _, stderr = on_ray.communicate(timeout=600)
    # Native although this process started a Ray cluster (Daft alone would infer Ray here, and
    # later Daft work in this process would reach for the cluster after it is shut down).
    assert native["runner"] == "native"
    assert on_ray.returncode == 0, f"clean_corpus on Ray failed:\n{stderr[-4000:]}"
    return ray_root, json.loads((ray_root / "run.json").read_text()), native_root


@pytest.mark.slow
def test_ray_cluster_is_local(ray_cluster):
    assert ray_cluster.startswith("127.0.0.1:"), ray_cluster


@pytest.mark.slow
def test_clean_corpus_on_ray_equals_native(runs):
    ray_root, run, native_run = runs
    assert run["runner"] == "ray"
    on_ray = pd.read_parquet(ray_root / "units.parquet").sort_values("doc_id").reset_index(drop=True)
    native = pd.read_parquet(native_run / "units.parquet").sort_values("doc_id").reset_index(drop=True)
    assert len(native) > 50
    pd.testing.assert_frame_equal(on_ray, native)


@pytest.mark.slow
def test_corpus_embedding_on_ray_equals_native(runs):
    ray_root, _, native_run = runs
    order = {name: pd.read_parquet(root / "units.parquet")["doc_id"].tolist()
             for name, root in (("ray", ray_root), ("native", native_run))}
    vectors = {name: dict(zip(order[name], np.load(root / "vectors.npy"), strict=True))
               for name, root in (("ray", ray_root), ("native", native_run))}
    ids = order["native"]
    on_ray = np.stack([vectors["ray"][i] for i in ids])
    native = np.stack([vectors["native"][i] for i in ids])
    assert on_ray.shape == (len(ids), 384)
    np.testing.assert_allclose(on_ray, native, atol=2e-5)


# Executors: the documented configs must be what each executor accepts.

@pytest.mark.parametrize("kind, path", [("k8s", "deploy/k8s_executor.yaml"),
                                        ("celery", "deploy/celery_executor.yaml")])
def test_documented_executor_configs_fit_their_schema(kind, path):
    executor = executor_from_env({EXECUTOR_ENV: kind, CONFIG_ENV: str(PROJECT_ROOT / path)})
    assert executor.name == {"k8s": "k8s", "celery": "celery"}[kind] + "_configured"
    # The implicit job of a Definitions built with it runs under it.
    defs = dg.Definitions(assets=[_probe], executor=executor)
    assert defs.resolve_implicit_global_asset_job_def().executor_def.name == executor.name


def test_training_steps_request_a_gpu_on_kubernetes():
    config = yaml.safe_load((PROJECT_ROOT / "deploy/k8s_executor.yaml").read_text())
    training = {spec.key.to_user_string() for spec in _training_assets()}
    assert training and training <= set(config["per_step_k8s_config"])
    for step in training:
        limits = config["per_step_k8s_config"][step]["container_config"]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, step


def test_a_mistyped_executor_config_is_refused_naming_the_file(tmp_path):
    broken = tmp_path / "k8s.yaml"
    config = yaml.safe_load((PROJECT_ROOT / "deploy/k8s_executor.yaml").read_text())
    config["max_concurent"] = config.pop("max_concurrent")
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(ExecutorConfigError, match=r"k8s\.yaml.*max_concurent"):
        executor_from_env({EXECUTOR_ENV: "k8s", CONFIG_ENV: str(broken)})
    with pytest.raises(ExecutorConfigError, match="ENCODER_PIPELINE_EXECUTOR='dask'"):
        executor_from_env({EXECUTOR_ENV: "dask"})


def built_executor(job: dg.JobDefinition):
    """The executor Dagster builds for a run of `job` with no executor config of its own."""
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.system_config.objects import ResolvedRunConfig

    config = ResolvedRunConfig.build(job, {}).execution.execution_engine_config
    return job.executor_def.executor_creation_fn(InitExecutorContext(
        job=InMemoryJob(job), executor_def=job.executor_def, executor_config=config,
        instance=dg.DagsterInstance.ephemeral()))


def cap_of(executor: dg.ExecutorDefinition) -> int:
    from dagster._core.executor.multiprocess import MultiprocessExecutor

    built = built_executor(dg.Definitions(assets=[_probe], executor=executor)
                           .resolve_implicit_global_asset_job_def())
    assert isinstance(built, MultiprocessExecutor)
    return built._max_concurrent  # what the executor limits its step processes to


CAP_OF_THE_PROJECT = """
from encoder_pipeline.definitions import defs
from encoder_pipeline_tests.test_scale_out import built_executor
print(built_executor(defs.resolve_job_def("train_encoder_job"))._max_concurrent)
"""


def test_default_executor_is_multiprocess_with_a_cap(monkeypatch):
    """README: `multiprocess` (default), at most ENCODER_PIPELINE_MAX_CONCURRENT (default 2) steps at
    once: read back from the executors Dagster builds, not from the config handed to them."""
    from encoder_pipeline.definitions import defs

    job = defs.resolve_job_def("train_encoder_job")
    assert job.executor_def.name == "multiprocess_configured"
    assert built_executor(job)._max_concurrent == int(os.environ.get(executors.CONCURRENCY_ENV,
                                                                     executors.DEFAULT_MAX_CONCURRENT))
    monkeypatch.delenv(executors.CONCURRENCY_ENV, raising=False)
    assert cap_of(executor_from_env()) == executors.DEFAULT_MAX_CONCURRENT == 2
    for cap in (1, 3):
        monkeypatch.setenv(executors.CONCURRENCY_ENV, str(cap))
        assert cap_of(executor_from_env()) == cap
    # The code location as `dagster dev` loads it with the variable set.
    env = {**os.environ, executors.CONCURRENCY_ENV: "3"}
    env.pop(EXECUTOR_ENV, None), env.pop(CONFIG_ENV, None)
    loaded = subprocess.run([sys.executable, "-c", CAP_OF_THE_PROJECT], env=env, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-1] == "3"
    # A config file's value is checked against the schema: a wrong type is refused, naming the file.
    with pytest.raises(ExecutorConfigError, match=r"executor\.yaml: not a valid multiprocess"):
        executors.validated_config("multiprocess", {"max_concurrent": "three"}, "executor.yaml")


@dg.asset
def _probe() -> None:
    """A stand-in asset for building a Definitions around an executor."""


def _where_the_step_ran() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={
        "pid": os.getpid(), "parent_pid": os.getppid(),
        # this module does not import the code location; only a preloading server can have
        "location_imported": executors.CODE_LOCATION_MODULE in sys.modules})


@dg.asset
def _first_step() -> dg.MaterializeResult:
    return _where_the_step_ran()


@dg.asset(deps=[_first_step])
def _second_step() -> dg.MaterializeResult:
    return _where_the_step_ran()


def two_steps_under_the_default_executor() -> dg.JobDefinition:
    """Each step process builds the job again with this function (`dg.build_reconstructable_job`)."""
    return dg.Definitions(assets=[_first_step, _second_step], jobs=[dg.define_asset_job("two_steps")],
                          executor=executor_from_env()).resolve_job_def("two_steps")


@pytest.mark.slow
def test_steps_fork_from_a_server_that_imported_the_code_location_once(monkeypatch):
    """README: each step in its own process, forked from a server that imported the code location
    once per run, so a step does not pay the import (10-20 s here) again. Spawned steps would be
    children of the run's process (here the test's) and import only what the job's module does."""
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    with dg.instance_for_test() as instance:
        # by its package path: pytest imported this file as a top-level module the steps cannot find
        job = dg.build_reconstructable_job("encoder_pipeline_tests.test_scale_out",
                                           two_steps_under_the_default_executor.__name__)
        result = dg.execute_job(job, instance)
        assert result.success
        steps = [{key: value.value for key, value in event.materialization.metadata.items()}
                 for event in result.get_asset_materialization_events()]
    assert len(steps) == 2 and all(step["location_imported"] for step in steps), steps
    assert len({step["pid"] for step in steps} | {os.getpid()}) == 3  # a process per step
    assert len({step["parent_pid"] for step in steps}) == 1  # one server forked both
    assert steps[0]["parent_pid"] != os.getpid()  # not the run's process: not spawned


def _training_assets():
    from encoder_pipeline.definitions import defs

    return [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)
            and a.group_names_by_key.get(a.key) == "training"]


if __name__ == "__main__":
    target, address = Path(sys.argv[1]), sys.argv[2]
    (target / "run.json").write_text(json.dumps(_materialize_and_embed(target, address)))
