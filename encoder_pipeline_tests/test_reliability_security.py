"""Security: the LLM key never lands anywhere the pipeline writes, documents leave the machine only
when the domain opts in, spec paths stay under the corpus root, no code path unpickles untrusted
files, and a model folder's own code never runs."""

import ast
import json
import logging
import re
import secrets
import shutil
import threading
from pathlib import Path

import dagster as dg
import pytest
import yaml
from fake_llm import FakeOpenAIServer
from spec_files import write_spec

from encoder_pipeline import definitions
from encoder_pipeline.defs.training.assets import RUNGS
from encoder_pipeline.domains import DomainSpec, SpecError, domain_partitions, load_domain, load_spec
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, load_encoder, resolve_model_path
from encoder_pipeline.lib.layout import SWEEP_FILE
from encoder_pipeline.lib.llm import GenerationParams, OpenAIBackend, openai_compatible
from encoder_pipeline.lib.search import Searcher
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import PROJECT_ROOT, shared_corpus

ASSETS = {a.key.to_user_string(): a for a in definitions.defs.assets if isinstance(a, dg.AssetsDefinition)}
UPSTREAM = ["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries"]


def answer(prompt: str) -> str:
    """A judge picks candidate 1; a generator asks about the first words of the passage it was shown."""
    if "Which passage is most relevant" in prompt:
        return "1"
    words = re.findall(r"[A-Za-z]+", prompt.rsplit("Passage: ", 1)[-1])[:5]
    return f"where is {' '.join(words)} explained"


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def secret_runs(tmp_path_factory):
    """Three real runs against an OpenAI-compatible server on 127.0.0.1, the key bound the way the
    project binds it (definitions.llm_resource: dg.EnvVar), on a persistent sqlite instance with
    compute logs: a full synthetic_queries build, a re-run the endpoint refuses (401), and a run of a
    domain that has not opted in to remote LLMs."""
    base = tmp_path_factory.mktemp("secret")
    key = f"sk-test-SECRET-{secrets.token_hex(12)}"
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"sqlite": {"base_dir": str(home / "storage")}},
        "local_artifact_storage": {"module": "dagster._core.storage.root", "class": "LocalArtifactStorage",
                                   "config": {"base_dir": str(home)}},
        "compute_logs": {"module": "dagster._core.storage.local_compute_log_manager",
                         "class": "LocalComputeLogManager", "config": {"base_dir": str(home / "logs")}},
        "telemetry": {"enabled": False},
    }))
    corpus = base / "corpus.jsonl"
    web_qa = (shared_corpus("web_qa/python_docs") / "corpus.jsonl").read_text().splitlines()
    corpus.write_text("".join(line + "\n" for line in web_qa[:60]))
    (base / "domains").mkdir()
    spec = write_spec(base / "domains", path=str(corpus))
    spec.write_text("remote_llm_allowed = true\n" + spec.read_text())

    server = FakeOpenAIServer()
    server.respond = answer
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    logs = LogRecords()
    root_logger = logging.getLogger()
    root_logger.addHandler(logs)
    # Everything at INFO, and the HTTP client's and the project's own debug lines too (DEBUG for
    # every logger would drown Daft's engine in its own tracing).
    verbose = {name: logging.getLogger(name) for name in ("openai", "httpx", "httpx2", "encoder_pipeline")}
    levels = {name: logger.level for name, logger in {"": root_logger, **verbose}.items()}
    root_logger.setLevel(logging.INFO)
    for logger in verbose.values():
        logger.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as env:
            # counted as remote although it listens on 127.0.0.1: the opt-in is under test
            env.setattr(openai_compatible, "on_this_machine", lambda base_url: False)
            env.setenv("ENCODER_PIPELINE_DOMAINS", str(base / "domains"))
            env.setenv("ENCODER_PIPELINE_LLM_BACKEND", "openai")
            env.setenv("ENCODER_PIPELINE_LLM_BASE_URL", server.base_url)
            env.setenv("ENCODER_PIPELINE_LLM_MODEL", "fake-model")
            env.setenv("ENCODER_PIPELINE_LLM_API_KEY", key)
            llm = definitions.llm_resource()
            instance = dg.DagsterInstance.from_config(str(home))
            instance.add_dynamic_partitions(domain_partitions.name, ["mine"])
            resources = {PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(base / "artifacts")),
                         "settings": PipelineSettings(profile="tiny"), "llm": llm}

            def run(assets):
                return dg.materialize(list(ASSETS.values()), selection=list(assets), instance=instance,
                                      partition_key="mine", resources=resources, raise_on_error=False)

            built = run(UPSTREAM)
            requests_built = server.requests
            shutil.rmtree(base / "artifacts" / "mine" / "_llm_cache")  # so the re-run asks again
            server.script = [401] * 100
            refused = run(["synthetic_queries"])
            requests_refused = server.requests - requests_built
            spec.write_text(spec.read_text().replace("remote_llm_allowed = true", ""))
            not_allowed = run(["synthetic_queries"])
            requests_not_allowed = server.requests - requests_built - requests_refused
            instance.dispose()
    finally:
        root_logger.removeHandler(logs)
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level)
        server.shutdown()
        server.server_close()
    return {"key": key, "base": base, "llm": llm, "server": server, "logs": logs.lines,
            "built": built, "refused": refused, "not_allowed": not_allowed,
            "requests": (requests_built, requests_refused, requests_not_allowed)}


def step_error(result, step: str) -> str:
    """A failed step's error as the UI shows it: the message and the chain of causes."""
    event = next(e for e in result.get_step_failure_events() if e.step_key == step)
    error, parts = event.step_failure_data.error, []
    while error is not None:
        parts.append(error.message)
        error = error.cause
    return "\n".join(parts)


@pytest.mark.slow
def test_key_is_used_but_never_written_or_logged(secret_runs):
    key, base, server = secret_runs["key"], secret_runs["base"], secret_runs["server"]
    built = secret_runs["built"]
    assert built.success
    assert isinstance(secret_runs["llm"].api_key, dg.EnvVar)  # bound by name, resolved at run time
    assert f"Bearer {key}" in server.authorizations  # the key really went to the endpoint
    written = [p for p in base.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in written), "the sqlite event log is among the files checked"
    assert any("_llm_cache" not in str(p) and "synthetic_queries" in str(p) for p in written)
    leaks = [str(p) for p in written if key.encode() in p.read_bytes()]
    assert leaks == []
    assert secret_runs["logs"] and not [line for line in secret_runs["logs"] if key in line]
    for result in (built, secret_runs["refused"], secret_runs["not_allowed"]):
        assert not [e for e in result.all_events if key in dg.serialize_value(e)]
        run = result.dagster_run
        assert key not in json.dumps(run.run_config, default=str) and key not in str(run.tags)


@pytest.mark.slow
def test_refused_key_fails_with_the_cause_and_stops_sending(secret_runs):
    refused = secret_runs["refused"]
    assert not refused.success
    error = step_error(refused, "synthetic_queries")
    assert f"the LLM endpoint {secret_runs['server'].base_url}/ refused the API key (HTTP 401)" in error
    assert "ENCODER_PIPELINE_LLM_API_KEY" in error and secret_runs["key"] not in error
    assert 1 <= secret_runs["requests"][1] <= secret_runs["llm"].max_concurrency


@pytest.mark.slow
def test_documents_stay_local_unless_the_domain_opts_in(secret_runs):
    not_allowed = secret_runs["not_allowed"]
    assert not not_allowed.success
    assert "remote_llm_allowed = true" in step_error(not_allowed, "synthetic_queries")
    assert secret_runs["requests"][2] == 0


def test_key_echoed_by_the_server_is_redacted():
    """Some proxies put the key they were sent into their error text: the explanation drops it."""
    key = f"sk-test-SECRET-{secrets.token_hex(12)}"
    server = FakeOpenAIServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        for status in (401, 400):
            backend = OpenAIBackend(server.base_url, "m", key, max_retries=0)
            server.script = [status]
            with pytest.raises(Exception) as raised:
                backend.generate(["q"], GenerationParams(max_new_tokens=4))
            real = raised.value
            echoed = type(real)(f"Incorrect API key provided: {key}", response=real.response, body=None)
            explained = str(backend.explain(echoed))
            assert key not in explained and server.base_url in explained and f"HTTP {status}" in explained
    finally:
        server.shutdown()
        server.server_close()


# --- spec paths ------------------------------------------------------------------------------------


def test_spec_paths_stay_under_the_corpus_root(tmp_path, monkeypatch):
    root = tmp_path / "corpora"
    monkeypatch.setenv("ENCODER_PIPELINE_CORPUS_ROOT", str(root))
    for field, text in (("corpus.path", 'path = "../../etc/*.jsonl"'),
                        ("corpus.path", 'path = "docs/../../outside/*.jsonl"')):
        spec = write_spec(tmp_path)
        spec.write_text(spec.read_text().replace('path = "docs/*.jsonl"', text))
        with pytest.raises(SpecError) as error:
            load_spec(spec)
        assert str(spec) in str(error.value) and f"field '{field}'" in str(error.value)
        assert f"leads out of {root}" in str(error.value)
    spec = write_spec(tmp_path, extra='[judged]\npath = "../judged"\n')
    with pytest.raises(SpecError, match=r"field 'judged\.path': '\.\./judged' leads out of"):
        load_spec(spec)

    inside = load_spec(write_spec(tmp_path, path="docs/old/../new/*.jsonl"))
    assert inside.corpus_location() == str(root / "docs" / "new" / "*.jsonl")
    for given in ("/data/elsewhere/*.jsonl", "s3://bucket/corpus/*.jsonl"):  # as the user wrote them
        assert load_spec(write_spec(tmp_path, path=given)).corpus_location() == given
    # a spec built in code, not loaded from a file, is confined the same way when resolved
    unchecked = inside.model_copy(update={"corpus": inside.corpus.model_copy(update={"path": "../x"})})
    assert isinstance(unchecked, DomainSpec)
    with pytest.raises(SpecError, match="leads out of"):
        unchecked.corpus_location()
    # a partition key or --domain is a file name under the domains folder: no way out of it either
    with pytest.raises(SpecError, match="domain name '../secret'"):
        load_domain("../secret", tmp_path)


# --- code paths ------------------------------------------------------------------------------------

UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                  ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
                  ("pandas", "read_pickle")}


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code hidden in a file: torch.load without weights_only=True, pickle-family
    loads, np.load(allow_pickle=True), and anything passed trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        keywords = {k.arg: k.value for k in node.keywords}

        def true(arg: str) -> bool:
            return isinstance(keywords.get(arg), ast.Constant) and keywords[arg].value is True

        if (owner, name) == ("torch", "load") and not true("weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif (owner, name) in UNSAFE_LOADERS or name == "read_pickle":
            found.append(f"line {node.lineno}: {owner}.{name}")
        elif name == "load" and owner in ("np", "numpy") and "allow_pickle" in keywords:
            if not (isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False):
                found.append(f"line {node.lineno}: np.load with allow_pickle")
        if true("trust_remote_code"):  # passing a caller's value on is fine: it defaults to False
            found.append(f"line {node.lineno}: trust_remote_code=True")
    return found


def test_no_code_path_unpickles_or_trusts_remote_code():
    assert unsafe_calls("import torch\ntorch.load(p)\ntorch.load(p, weights_only=True)") == [
        "line 2: torch.load without weights_only=True"]
    assert len(unsafe_calls("pickle.loads(b)\nnp.load(p, allow_pickle=True)\nnp.load(p)\n"
                            "pd.read_pickle(p)\nAutoModel.from_pretrained(p, trust_remote_code=True)")) == 4
    sources = sorted((PROJECT_ROOT / "encoder_pipeline").rglob("*.py"))
    assert len(sources) > 20
    found = {str(path.relative_to(PROJECT_ROOT)): unsafe_calls(path.read_text()) for path in sources}
    assert {path: calls for path, calls in found.items() if calls} == {}
    assert "trust_remote_code" not in PipelineSettings.model_fields  # no run-time switch for it


def custom_code_model(directory: Path) -> tuple[Path, Path]:
    """The packaged MiniLM in `directory/model` with a config that maps to custom code in the folder
    (`auto_map`); that code, when run, creates the returned marker file."""
    source = Path(resolve_model_path(DEFAULT_BASE_MODEL))
    folder = directory / "model"
    folder.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "custom_model.CustomModel", "AutoConfig": "custom_model.CustomConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = directory / "custom_code_ran"
    (folder / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig as CustomConfig, BertModel as CustomModel\n")
    return folder, marker


def test_a_model_folders_own_code_never_runs(tmp_path):
    """A model folder with custom code: loaded with the library's own class; the folder's module is
    never imported. (With trust_remote_code it would be: the control below shows the marker appears
    then.)"""
    folder, marker = custom_code_model(tmp_path)
    model = load_encoder(str(folder), fresh=True)
    assert model.encode(["a query"]).shape == (1, 384)
    assert not marker.exists()
    load_encoder(str(folder), fresh=True, trust_remote_code=True)
    assert marker.exists()


def hand_made_sweep(store: ArtifactStore, domain: str, model: Path) -> None:
    """What embedding_index reads from upstream, by hand (a real sweep needs the trained ladder):
    index_sweep choosing fp32 at full width for `model`, and a version of each rung."""
    for rung in RUNGS:
        with store.publish(Manifest(domain, rung, f"{rung}-v1", 0, {})):
            pass
    sweep = {"rung": RUNGS[0], "model_path": str(model), "revision": encoders.model_fingerprint(str(model)),
             "chosen": {"dims": 384, "precision": "fp32", "dev": {"ndcg@10": 0.5}},
             "dev_ndcg_at_10_by_rung": {}}
    with store.publish(Manifest(domain, "index_sweep", "sweep-v1", 0, {})) as staging:
        (staging / SWEEP_FILE).write_text(json.dumps(sweep))


def hand_made_report(store: ArtifactStore, domain: str) -> None:
    """An eval_report that judged the latest embedding_index safe to promote (serving_index's input)."""
    candidate = store.latest_version(domain, "embedding_index")
    report = {"verdict": "train", "promotion": {"safe": True, "reason": "hand-made"},
              "after": {"ndcg@10": 0.5, "p95_ms": 5.0, "index_mb": 0.1}}
    with store.publish(Manifest(domain, "eval_report", f"report-{candidate}", 0, {},
                                upstream={"embedding_index": candidate})) as staging:
        (staging / "report.json").write_text(json.dumps(report))


@pytest.mark.slow  # the data stages, index and promotion, twice, with a custom-code base model
def test_only_the_domain_spec_turns_on_a_model_folders_code(tmp_path, monkeypatch, stand_in_llm):
    """`trust_remote_code` is off unless the spec sets it; heuristic_pairs (which encodes with the
    base model) passes the spec's value on: the custom code base model runs its code only then.
    embedding_index records the spec's value in its choice.json, serving_index promotes it, and
    `search` (which has no spec) loads the served encoder with what was recorded."""
    folder, marker = custom_code_model(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(line + "\n" for line in (shared_corpus("web_qa/python_docs") / "corpus.jsonl")
                              .read_text().splitlines()[:40]))
    (tmp_path / "domains").mkdir()
    spec = write_spec(tmp_path / "domains", path=str(corpus))
    assert load_spec(spec).trust_remote_code is False
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["mine"])
    store = ArtifactStore(tmp_path / "artifacts")
    resources = {PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(store.root)),
                 "settings": PipelineSettings(profile="tiny", base_model=str(folder)),
                 "llm": stand_in_llm}  # the base model's code is under test, not the LLM's queries

    def run(assets):
        return dg.materialize(list(ASSETS.values()), selection=list(assets), instance=instance,
                              partition_key="mine",
                              resources=resources)

    def search_loads_with() -> list[bool]:
        """The trust_remote_code values `Searcher` passes to load_encoder for the served encoder."""
        passed, load = [], encoders.load_encoder
        with monkeypatch.context() as patch:
            patch.setattr(encoders, "load_encoder", lambda model, *args, **kwargs: (
                passed.append(kwargs.get("trust_remote_code", False)), load(model, *args, **kwargs))[1])
            searcher = Searcher.for_domain("mine", store)
        assert searcher.served.model_path == folder and searcher.search("what is it", k=3)
        return passed

    def index_and_promote() -> dict:
        """embedding_index, then serving_index over a hand-made report; the served choice.json."""
        assert run(["embedding_index"]).success
        hand_made_report(store, "mine")
        assert run(["serving_index"]).success
        return json.loads((store.latest("mine", "serving_index") / "choice.json").read_text())

    assert run(["clean_corpus", "eval_set", "heuristic_pairs"]).success
    hand_made_sweep(store, "mine", folder)
    assert index_and_promote()["trust_remote_code"] is False
    assert search_loads_with() == [False] and not marker.exists()

    spec.write_text("trust_remote_code = true\n" + spec.read_text())
    assert load_spec(spec).trust_remote_code is True
    assert run(["heuristic_pairs"]).success
    assert marker.exists()
    assert index_and_promote()["trust_remote_code"] is True and search_loads_with() == [True]
    # an index recorded before the field existed: served with the folder's code off
    choice = store.latest("mine", "serving_index") / "choice.json"
    choice.write_text(json.dumps({k: v for k, v in json.loads(choice.read_text()).items()
                                  if k != "trust_remote_code"}))
    assert search_loads_with() == [False]


def test_ui_command_binds_to_localhost():
    text = (PROJECT_ROOT / "README.md").read_text() + (PROJECT_ROOT / "dagster.yaml").read_text()
    commands = [c for c in re.findall(r"dagster dev[^\n`]*", text) if c != "dagster dev"]  # with options
    assert commands and all("-h 127.0.0.1" in command for command in commands)
