"""Shared fixtures: real data from ../shared, the packaged base model, a throwaway artifact root."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = PROJECT_ROOT.parent / "shared" / "corpora"
os.environ.setdefault("ENCODER_PIPELINE_CORPUS_ROOT", str(SHARED_CORPORA))
# Every test that reads the sample corpora skips the same way when they are absent (CI has them).
SHARED_MISSING = f"the sample corpora are not at {SHARED_CORPORA} (../shared/corpora beside the repository)"
requires_shared_corpora = pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason=SHARED_MISSING)


def shared_corpus(relative: str) -> Path:
    """A folder of ../shared/corpora; the calling test skips with SHARED_MISSING when it is absent."""
    if not SHARED_CORPORA.is_dir():
        pytest.skip(SHARED_MISSING)
    return SHARED_CORPORA / relative


@pytest.fixture(scope="session")
def base_model():
    """The packaged MiniLM, loaded once per session (load_encoder caches the instance)."""
    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, load_encoder

    return load_encoder(DEFAULT_BASE_MODEL)


@pytest.fixture(scope="session")
def stdlib_units():
    """A small cleaned sample of the real `code` corpus (the running Python's standard library)."""
    from encoder_pipeline.lib.corpus import CleaningConfig, clean_corpus
    from encoder_pipeline.lib.sources import read_corpus

    units, _ = clean_corpus(read_corpus("python_stdlib", ""),
                            CleaningConfig(min_words=5, normalize_whitespace=False, max_documents=400))
    return units


@pytest.fixture
def artifact_root(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(root))
    return root


# At tiny scale (30 eval queries, ~10 training steps) a trained, compressed candidate is within noise
# of the off-the-shelf model, so the promotion gate's tolerance is widened for the graph's mechanics;
# test_lib_report covers the gate's rule and test_builtin_domains a blocked promotion.
TINY_RUN_CONFIG = {"ops": {"eval_report": {"config": {"promotion_tolerance": 0.2}}}}


@pytest.fixture(scope="session")
def tiny_dagster_home(tmp_path_factory) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is the project's, its storage folders moved into the home
    (the project keeps them under `data/`): a persistent instance a `dagster dev` can open."""
    import yaml

    home = tmp_path_factory.mktemp("dagster_home")

    def rebased(node):
        if not isinstance(node, dict):
            return node
        return {key: str(home / Path(value).relative_to("data")) if key == "base_dir" else rebased(value)
                for key, value in node.items()}

    config = rebased(yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text()))
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


@pytest.fixture(scope="session")
def tiny_code_run(tmp_path_factory, tiny_dagster_home):
    """The whole graph for the `code` partition, tiny profile, real components, in a throwaway
    artifact root and a persistent instance in `tiny_dagster_home` (so the UI test can show its
    materializations): built once per session and shared by the graph, report, serving and UI tests."""
    import dagster as dg

    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import domain_partitions
    from encoder_pipeline.lib.artifacts import ArtifactStore
    from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings

    root = tmp_path_factory.mktemp("artifacts")
    instance = dg.DagsterInstance.from_config(str(tiny_dagster_home))
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    result = dg.materialize(
        [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)],
        instance=instance,
        partition_key="code",
        run_config=TINY_RUN_CONFIG,
        resources={
            "artifacts": ArtifactStoreResource(root=str(root)),
            "settings": PipelineSettings(profile="tiny"),
            "llm": LLMResource(),
        },
    )
    return result, ArtifactStore(root)
