"""Shared fixtures: real data from ../shared, the packaged base model, a throwaway artifact root."""

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (`-n 2`, pyproject's addopts) each worker gets its share of the cores: two
# workers each running torch on every core would fight over them.
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // int(workers))))

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = PROJECT_ROOT.parent / "shared" / "corpora"
os.environ.setdefault("ENCODER_PIPELINE_CORPUS_ROOT", str(SHARED_CORPORA))
# Every test that reads the sample corpora skips the same way when they are absent (CI has them).
SHARED_MISSING = f"the sample corpora are not at {SHARED_CORPORA} (../shared/corpora beside the repository)"
requires_shared_corpora = pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason=SHARED_MISSING)


TINY_BUILD_FIXTURES = {"tiny_code_run", "tiny_code_served"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup`, a test goes to the worker that already holds what it
    shares: every test of the session's tiny `code` build to one worker (it is built once), every test
    of a module with a module-scoped fixture (a Ray cluster, a cut corpus) to one. Others spread."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if TINY_BUILD_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("tiny_code_build"))
        elif fixtures and any(definition.scope == "module" for definitions in fixtures.name2fixturedefs.values()
                              for definition in definitions):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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


@pytest.fixture(scope="session")
def stand_in_llm():
    """The `llm` resource for runs that test the graph, not the LLM's output: an OpenAI-compatible
    server on 127.0.0.1 (fake_llm.py, real HTTP) that answers each prompt with words of its passage,
    in milliseconds where the local model takes a second or more per prompt. The local model's
    own output runs in test_lib_llm.py, the tiny `code` run and test_any_corpus.py's manual."""
    from fake_llm import FakeOpenAIServer, passage_words_query, serving

    from encoder_pipeline.resources import LLMResource

    server = FakeOpenAIServer()
    server.respond = passage_words_query
    with serving(server):
        yield LLMResource(backend="openai", base_url=server.base_url, model="stand-in")


@pytest.fixture
def artifact_root(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(root))
    return root


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


# The tiny `code` build's corpus: these packages of the standard library (~640 functions) instead
# of all of it (~13,600): the served index and the report embed every unit, twice (`email` left out
# for suite time: docs/results.md, "The test suite on an AVX2-only host").
TINY_CODE_PACKAGES = ["http", "logging", "json", "csv", "shutil", "textwrap", "calendar"]


def tiny_code_spec() -> str:
    """The built-in `code` spec with its corpus cut to TINY_CODE_PACKAGES (cleaning all of the
    standard library takes ~1 min on 2 cores)."""
    spec = (PROJECT_ROOT / "data" / "domains" / "code.toml").read_text()
    return spec.replace("[corpus]\n", f"[corpus]\ninclude = {TINY_CODE_PACKAGES}\n")


@pytest.fixture(scope="session")
def tiny_code_run(tmp_path_factory, tiny_dagster_home):
    """The whole graph for the `code` partition, tiny profile, real components, in a throwaway
    artifact root and a persistent instance in `tiny_dagster_home` (so the UI test can show its
    materializations): built once per session and shared by the graph, report, serving and UI tests.
    The spec is the built-in one with its corpus cut to TINY_CODE_PACKAGES."""
    import dagster as dg

    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import domain_partitions
    from encoder_pipeline.lib.artifacts import ArtifactStore
    from encoder_pipeline.resources import (
        PUBLISHED,
        ArtifactStoreResource,
        LLMResource,
        PipelineSettings,
        published_artifacts,
    )

    root = tmp_path_factory.mktemp("artifacts")
    domains = tmp_path_factory.mktemp("domains")
    (domains / "code.toml").write_text(tiny_code_spec())
    instance = dg.DagsterInstance.from_config(str(tiny_dagster_home))
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENCODER_PIPELINE_DOMAINS", str(domains))
        result = dg.materialize(
            # train_encoder_job's assets: domain_health follows runs (its sensor, in the UI test)
            [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)
             and dg.AssetKey("domain_health") not in a.keys],
            instance=instance,
            partition_key="code",
            resources={
                PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(root)),
                "settings": PipelineSettings(profile="tiny"),
                "llm": LLMResource(),
            },
            raise_on_error=False,  # a refused candidate fails eval_report's blocking check: see tiny_code_served
        )
    return result, ArtifactStore(root)


def graph_assets() -> list:
    """Every asset of the code location. A run of some of them passes these with `selection=`: the
    others, not run, hand the selected ones their published versions (`ins=`)."""
    import dagster as dg

    from encoder_pipeline.definitions import defs

    return [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`encoder-pipeline ARGV` in this process: (exit code, stdout, stderr)."""
    from encoder_pipeline import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def refusal_parts(store, domain: str) -> list[str]:
    """What the sentence refusing to serve a refused candidate must say: the candidate (version,
    rung, precision@dims), the report's reason, and the command that serves it anyway."""
    from encoder_pipeline.lib.layout import read_report

    version = store.latest_version(domain, "embedding_index")
    choice = json.loads((store.latest(domain, "embedding_index") / "choice.json").read_text())
    return [f"embedding_index {version} ({choice['rung']}, {choice['precision']}@{choice['dims']})",
            read_report(store, domain)["promotion"]["reason"],
            f"`encoder-pipeline promote --domain {domain} --force`"]


@dataclass(frozen=True)
class TinyServed:
    result: object  # tiny_code_run's ExecuteInProcessResult
    store: object  # its ArtifactStore
    forced: bool  # the run's safe_to_promote failed and `promote --force` served its candidate
    metadata: dict  # serving_index's materialization metadata (the run's, or the forced promotion's)


@pytest.fixture(scope="session")
def tiny_code_served(tiny_code_run, tiny_dagster_home, tmp_path_factory) -> TinyServed:
    """tiny_code_run with its candidate served. At this scale the candidate may be promoted or
    legitimately refused, and which can differ between CPUs (bf16 query encoding on AVX-512 hosts,
    fp32 on AVX2), so either is checked. Refused: `search`, `export` and `Searcher` refuse with a
    sentence naming it, `promote` exits 3, and `promote --force` serves it on the record
    (promotion.json and the instance the UI reads)."""
    import dagster as dg

    from encoder_pipeline.lib.promotion import read_promotion
    from encoder_pipeline.lib.search import NothingServed, Searcher

    result, store = tiny_code_run
    [promotion] = [c for c in result.get_asset_check_evaluations() if c.check_name == "safe_to_promote"]
    if not promotion.passed:
        sentence = refusal_parts(store, "code")
        with pytest.raises(NothingServed) as refused:
            Searcher.for_domain("code", store)
        assert all(part in str(refused.value) for part in sentence), str(refused.value)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("ENCODER_PIPELINE_HOME", str(store.root))
            patch.setenv("DAGSTER_HOME", str(tiny_dagster_home))
            patch.chdir(Path.cwd())  # the CLI moves to the project root; this moves back
            for argv in (["search", "--domain", "code", "parse a date"],
                         ["export", "--domain", "code", "--out", str(tmp_path_factory.mktemp("export"))]):
                code, _, err = run_cli(argv)
                assert code == 2 and all(part in err for part in sentence), err
            assert run_cli(["promote", "--domain", "code"])[0] == 3
            code, out, err = run_cli(["promote", "--domain", "code", "--force"])
            assert code == 0 and "FORCED" in out, out + err
        record = read_promotion(store, "code", store.latest_version("code", "serving_index"))
        assert record["forced"] is True and record["reason"] == sentence[1]
    instance = dg.DagsterInstance.from_config(str(tiny_dagster_home))
    [latest] = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("serving_index"), asset_partitions=["code"]), limit=1).records
    metadata = latest.asset_materialization.metadata
    assert metadata["forced"].value is not promotion.passed
    return TinyServed(result, store, not promotion.passed, metadata)
