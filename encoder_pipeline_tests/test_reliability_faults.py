"""Faults: a stage killed with SIGKILL and run again, two domains materialized at once, and a failed
blocking check. Each kill hits a real child process (`subprocess`) once it has made observable
progress; the re-run happens in the test's process, against the same files."""

import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from fake_llm import FAKE_KEY, FakeOpenAIServer
from spec_files import write_spec
from test_promotion import D, candidate, put, serve
from transformers import TrainerCallback

from encoder_pipeline.definitions import defs
from encoder_pipeline.defs.evaluation.assets import SAFE_TO_PROMOTE
from encoder_pipeline.defs.serving.assets import serving_index
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest, remove_torn_arrays
from encoder_pipeline.lib.index import build_quantized, load_index, save_index
from encoder_pipeline.lib.llm import GenerationParams, OpenAIBackend, ResponseCache
from encoder_pipeline.lib.promotion import garbage_collect
from encoder_pipeline.lib.queries import generate_frame
from encoder_pipeline.lib.train import TrainingConfig, train_encoder
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import PROJECT_ROOT, shared_corpus

POLL_S = 0.005
ASSETS = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]


def spawn(log: Path, script: str, *args: object, env: dict | None = None) -> subprocess.Popen:
    """`script` in a fresh Python process, its output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_until(condition, child: subprocess.Popen, log: Path, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"the child exited ({child.returncode}) before {what}; {log}:\n"
                        f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            pytest.fail(f"no {what} within {timeout_s} s; {log}:\n{log.read_text()[-3000:]}")
        time.sleep(POLL_S)


def sigkill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL  # reaped: its pid no longer counts as alive


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ...; [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children_of(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and _stat(int(p.name))[1:2] == [str(pid)]]


def exited(pid: int) -> bool:
    return _stat(pid)[:1] in ([], ["Z"])


def hidden_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name != ".gitkeep"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches on a busy 2-core machine: one intra-op thread (as test_lib_train), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- synthetic generation -------------------------------------------------------------------------

GENERATE = """
    import functools, json, sys
    from encoder_pipeline.lib.llm import GenerationParams, OpenAIBackend
    from encoder_pipeline.lib.queries import generate_frame
    base_url, cache_dir, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    backend = functools.partial(OpenAIBackend, base_url=base_url, model="fake-model", api_key="{key}",
                                max_concurrency=4)
    generate_frame(prompts, backend, cache_dir, GenerationParams(max_new_tokens=8))
""".replace("{key}", FAKE_KEY)
PROMPTS = [{"doc_id": f"d{i:02d}", "variant": 0, "style": "plain", "prompt": f"prompt {i:02d}"}
           for i in range(24)]
SLOW = "prompt 05"  # in the first chunk of 8: its request hangs until the test releases it


@pytest.fixture
def llm_server():
    srv = FakeOpenAIServer()
    srv.release = threading.Event()
    srv.asked, srv.answered = [], []

    def respond(prompt: str) -> str:
        srv.asked.append(prompt)
        if prompt == SLOW:
            srv.release.wait(timeout=120)
        srv.answered.append(prompt)
        return f"answer to {prompt}"

    srv.respond = respond
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def test_killed_generation_never_pays_twice_for_an_answer(llm_server, tmp_path):
    """8 prompts per chunk, 4 requests at a time: one request hangs while the other 7 of its chunk
    are answered. They are cached as they arrive (not when the chunk ends); Daft's worker process
    ends with the killed run instead of sending the rest of its batch on its own; the re-run asks
    only for the prompts never answered."""
    cache_dir = tmp_path / "llm_cache"
    params = GenerationParams(max_new_tokens=8)
    key_of = {ResponseCache(cache_dir).key("openai", "fake-model", p["prompt"], params): p["prompt"]
              for p in PROMPTS}
    log = tmp_path / "generate.log"
    child = spawn(log, GENERATE, llm_server.base_url, cache_dir, json.dumps(PROMPTS))
    entries = lambda: {key_of[p.stem] for p in cache_dir.glob("*.json")}
    wait_until(lambda: len(entries()) >= 7 and SLOW in llm_server.asked, child, log,
               "7 cached answers beside the hanging request", timeout_s=90)
    workers = children_of(child.pid)
    sigkill(child)
    cached, answered = entries(), set(llm_server.answered)
    deadline = time.monotonic() + 10
    while not all(exited(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    assert all(exited(pid) for pid in workers), f"orphaned workers {workers} outlived the killed run"
    llm_server.release.set()
    time.sleep(0.5)
    assert len(llm_server.asked) == len(cached) + 1, "nothing was sent after the kill"
    assert answered - cached == set(), f"answered but not cached before the kill: {answered - cached}"
    assert SLOW not in cached and all(json.loads(p.read_text())["text"].startswith("answer to ")
                                      for p in cache_dir.glob("*.json")), "no torn cache entry"

    asked_before = len(llm_server.asked)
    backend = functools.partial(OpenAIBackend, base_url=llm_server.base_url, model="fake-model",
                                api_key=FAKE_KEY, max_concurrency=4)
    rows = generate_frame(PROMPTS, backend, str(cache_dir), params)
    asked_again = llm_server.asked[asked_before:]
    assert sorted(asked_again) == sorted({p["prompt"] for p in PROMPTS} - cached)
    assert not set(asked_again) & cached, "a prompt answered before the kill was paid again"
    assert list(rows["text"]) == [f"answer to {p['prompt']}" for p in PROMPTS]
    assert int(rows["cached"].sum()) == len(cached)


# --- training -------------------------------------------------------------------------------------

TRAIN = """
    import sys
    import pandas as pd, torch
    from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
    from encoder_pipeline.lib.train import TrainingConfig, train_encoder
    torch.set_num_threads(1)
    rows, output, work = pd.read_parquet(sys.argv[1]), sys.argv[2], sys.argv[3]
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=int(sys.argv[4]),
                            checkpoint_every_s=0)
    train_encoder(DEFAULT_BASE_MODEL, rows, output, config, checkpoint_dir=work)
"""
MAX_STEPS = 5


def docstring_pairs(count: int) -> pd.DataFrame:
    """(question, docstring) pairs from real standard-library functions."""
    import json as json_module
    import os.path as path_module
    import shutil as shutil_module
    functions = [f for module in (str, path_module, json_module, shutil_module, list, dict)
                 for _, f in inspect.getmembers(module, callable) if (f.__doc__ or "").strip()
                 and not f.__name__.startswith("_")]
    unique = {f"what does {f.__qualname__} do": f.__doc__.strip() for f in functions}
    return pd.DataFrame(list(unique.items())[:count], columns=["query", "positive"])


class StepsSeen(TrainerCallback):
    def __init__(self) -> None:
        self.start_step, self.steps = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step = state.global_step  # after a resume: the checkpoint's step

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    """A checkpoint after every step; the kill comes once one is complete. A torn checkpoint (its
    trainer_state.json cut off, as a kill during the save leaves it) is ignored and deleted."""
    rows = docstring_pairs(32)
    assert len(rows) == 32
    rows.to_parquet(tmp_path / "rows.parquet")
    work, log = tmp_path / "checkpoints", tmp_path / "train.log"
    child = spawn(log, TRAIN, tmp_path / "rows.parquet", tmp_path / "killed", work, MAX_STEPS)

    def complete_steps() -> list[int]:
        steps = []
        for state in work.glob("checkpoint-*/trainer_state.json"):
            try:
                steps.append(json.loads(state.read_text())["global_step"])
            except (ValueError, FileNotFoundError):  # being written, or rotated away
                continue
        return steps

    wait_until(lambda: max(complete_steps(), default=0) >= 2, child, log, "a complete checkpoint at step 2")
    sigkill(child)
    last = max(complete_steps())
    assert last < MAX_STEPS and not (tmp_path / "killed" / "model").exists()
    torn = work / "checkpoint-99"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_step": 99, "log_hist')

    seen = StepsSeen()
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=MAX_STEPS, checkpoint_every_s=0)
    result = train_encoder(encoders.DEFAULT_BASE_MODEL, rows, tmp_path / "resumed", config,
                           checkpoint_dir=work, callbacks=[seen])
    assert result.resumed_from_step == last == seen.start_step
    assert seen.steps == list(range(last + 1, MAX_STEPS + 1)) and result.steps == MAX_STEPS
    model = encoders.load_encoder(str(tmp_path / "resumed" / "model"), fresh=True)
    assert model.encode(["what does str.split do"]).shape == (1, 384)
    assert not work.exists(), "checkpoints are removed after success"


# --- index build ----------------------------------------------------------------------------------

BUILD_INDEX = """
    import sys
    import numpy as np
    from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest, remove_torn_arrays
    from encoder_pipeline.lib.index import build_quantized, save_index
    vectors = np.random.default_rng(0).standard_normal((200_000, 128), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"unit-{i}" for i in range(len(vectors))]
    index = build_quantized(vectors, 128, "fp32", ids, ids, ids)
    with ArtifactStore(sys.argv[1]).publish(Manifest("{domain}", "embedding_index", "v2", 0, {})) as staging:
        save_index(staging, index, ids, ids, ids, "enc-2", "fp32")
"""


def publish_index(store: ArtifactStore, version: str, rows: int) -> None:
    vectors = np.random.default_rng(1).standard_normal((rows, 128), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"unit-{i}" for i in range(rows)]
    with store.publish(Manifest(D, "embedding_index", version, 0, {})) as staging:
        save_index(staging, build_quantized(vectors, 128, "fp32", ids, ids, ids), ids, ids, ids,
                   f"enc-{version[-1]}", "fp32")


def test_killed_index_build_leaves_the_published_version_alone(tmp_path):
    """The kill lands while the new index file grows in its staging folder: readers keep seeing
    the complete old version, and the next publish removes what the killed one left."""
    store = ArtifactStore(tmp_path / "artifacts")
    publish_index(store, "v1", 500)
    asset_dir = store.asset_dir(D, "embedding_index")
    log = tmp_path / "index.log"
    child = spawn(log, BUILD_INDEX.replace("{domain}", D), store.root)
    growing = lambda: any(p.stat().st_size > 0 for p in asset_dir.glob(".staging-*/index.faiss"))
    wait_until(growing, child, log, "a growing index file in staging")
    sigkill(child)

    assert store.latest_version(D, "embedding_index") == "v1" and store.versions(D, "embedding_index") == ["v1"]
    assert not (asset_dir / "v2").exists()
    assert load_index(store.latest(D, "embedding_index"), "enc-1").index.ntotal == 500
    assert [p.name.split("-")[0] for p in hidden_leftovers(asset_dir) if p.parent == asset_dir] == [".staging"]

    publish_index(store, "v2", 300)  # the re-run
    assert store.latest_version(D, "embedding_index") == "v2" and store.versions(D, "embedding_index") == ["v1", "v2"]
    assert load_index(store.latest(D, "embedding_index"), "enc-2").index.ntotal == 300
    assert hidden_leftovers(asset_dir) == [], "the killed run's staging folder was removed"
    assert json.loads((asset_dir / "v2" / "manifest.json").read_text())["version"] == "v2"


def test_a_mining_cache_file_cut_short_is_removed(tmp_path):
    """sentence-transformers' mining cache is written in place by `np.save`; a kill mid-write leaves
    a prefix of the file, which would fail every later mining run of the domain."""
    vectors = np.random.default_rng(0).standard_normal((500, 64), dtype=np.float32)
    np.save(tmp_path / "query_embeddings_a.npy", vectors)
    np.save(tmp_path / "corpus_embeddings_b.npy", vectors)
    whole = (tmp_path / "corpus_embeddings_b.npy").read_bytes()
    (tmp_path / "corpus_embeddings_b.npy").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError):
        np.load(tmp_path / "corpus_embeddings_b.npy")
    assert remove_torn_arrays(tmp_path) == [tmp_path / "corpus_embeddings_b.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["query_embeddings_a.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "query_embeddings_a.npy"), vectors)


# --- work folders of killed processes: scratch and half-deleted versions ----------------------------

HOLD_SCRATCH = """
    import sys, time
    from pathlib import Path
    from encoder_pipeline.lib.artifacts import ArtifactStore
    with ArtifactStore(sys.argv[1]).scratch(sys.argv[2]) as scratch:
        (scratch / "units.parquet").write_bytes(b"part of a file")  # what clean_corpus streams there
        Path(sys.argv[3]).touch()
        time.sleep(600)
"""


def stdlib_corpus(path: Path, documents: int = 40) -> Path:
    """A small JSONL corpus of real standard-library docstrings (no sample corpus needed)."""
    pairs = docstring_pairs(documents)
    assert len(pairs) == documents
    with path.open("w") as out:
        for number, (query, doc) in enumerate(zip(pairs["query"], pairs["positive"], strict=True)):
            out.write(json.dumps({"_id": f"d{number}", "title": query, "text": doc}) + "\n")
    return path


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_clean_corpus(tmp_path, monkeypatch):
    """README: the next publish on the same machine deletes work folders whose owner process has
    exited, scratch (clean_corpus) among them. A process SIGKILLed inside `ArtifactStore.scratch`
    leaves its `.scratch-*` folder; the next clean_corpus run of the domain removes it and keeps the
    scratch folder of a process still alive."""
    root, domain = tmp_path / "artifacts", "mine"
    children = {}
    for name in ("killed", "alive"):
        children[name] = spawn(tmp_path / f"{name}.log", HOLD_SCRATCH, root, domain, tmp_path / name)
    for name, child in children.items():
        wait_until((tmp_path / name).exists, child, tmp_path / f"{name}.log", "a file in its scratch folder")
    scratch_of = {name: [p for p in root.joinpath(domain).glob(".scratch-*") if f"-{child.pid}-" in p.name]
                  for name, child in children.items()}
    assert [len(found) for found in scratch_of.values()] == [1, 1]
    sigkill(children["killed"])
    try:
        assert scratch_of["killed"][0].is_dir(), "a SIGKILL leaves the folder behind"
        (tmp_path / "domains").mkdir()
        write_spec(tmp_path / "domains", name=domain, path=str(stdlib_corpus(tmp_path / "corpus.jsonl")))
        monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(domain_partitions.name, [domain])
        clean = next(a for a in ASSETS if a.key.to_user_string() == "clean_corpus")
        result = dg.materialize([clean], instance=instance, partition_key=domain, resources={
            PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(root)),
            "settings": PipelineSettings(profile="tiny")})
        assert result.success
        assert not scratch_of["killed"][0].exists(), "the killed process's scratch folder was removed"
        assert scratch_of["alive"][0].is_dir(), "a live process's scratch folder is left alone"
        assert [p.name for p in hidden_leftovers(root)] == [scratch_of["alive"][0].name] + \
            [p.name for p in hidden_leftovers(scratch_of["alive"][0])]
    finally:
        sigkill(children["alive"])


DELETE_SLOWLY = """
    import shutil, sys, time
    from pathlib import Path
    from encoder_pipeline.lib.artifacts import ArtifactStore
    from encoder_pipeline.lib.promotion import garbage_collect
    rmtree = shutil.rmtree

    def stuck_rmtree(path, *args, **kwargs):  # a deletion that gets one file in, then hangs
        if Path(path).name.startswith(".deleting-"):
            next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            part = Path(sys.argv[3] + ".part")  # renamed into place: the test polls for it and reads it
            part.write_text(str(path))
            part.replace(sys.argv[3])
            time.sleep(600)
        return rmtree(path, *args, **kwargs)

    shutil.rmtree = stuck_rmtree
    garbage_collect(ArtifactStore(sys.argv[1]), sys.argv[2], keep_promoted=1)
"""


@pytest.mark.parametrize("next_step", ["gc", "publish"])
def test_a_gc_killed_mid_deletion_leaves_nothing_after_the_next_gc_or_publish(tmp_path, next_step):
    """README: a version `gc` was deleting when it was killed sits renamed out of sight as
    `.deleting-*` (readers never see it half-deleted); the next gc, or the next publish of that
    asset, on the same machine removes it. The child's deletion hangs after its first file (its
    rmtree is wrapped) so that the SIGKILL lands mid-deletion every time."""
    store = ArtifactStore(tmp_path / "artifacts")
    put(store, "clean_corpus", "c1")
    for n in range(1, 4):
        put(store, "encoder_heuristic", f"e{n}", {"clean_corpus": "c1"},
            {"model/weights": "w" * 1000, "model/config.json": {"n": n}})
        candidate(store, f"i{n}", f"e{n}")
        serve(store, f"s{n}", f"i{n}")
    latest = {asset: store.latest_version(D, asset) for asset in
              ("clean_corpus", "encoder_heuristic", "embedding_index", "eval_report", "serving_index")}
    doomed = {(a, v) for a, v in garbage_collect(store, D, keep_promoted=1, dry_run=True).deleted}
    assert doomed
    marker, log = tmp_path / "deleting", tmp_path / "gc.log"
    child = spawn(log, DELETE_SLOWLY, store.root, D, marker)
    wait_until(marker.exists, child, log, "a version half deleted")
    sigkill(child)
    leftover = Path(marker.read_text())
    asset = leftover.parent.name
    assert leftover.is_dir() and leftover.name.startswith(".deleting-")
    assert {latest_asset: store.latest_version(D, latest_asset) for latest_asset in latest} == latest
    assert all(not v.startswith(".") for v in store.versions(D, asset)), "readers never list it"

    if next_step == "gc":
        garbage_collect(store, D, keep_promoted=1)
        assert not {(a, v) for a, v in doomed if (store.asset_dir(D, a) / v).exists()}
    else:
        put(store, asset, "next")
    assert not leftover.exists()
    assert hidden_leftovers(store.root) == [], "no work folder is left"


# --- two domains at once --------------------------------------------------------------------------

MATERIALIZE = """
    import sys
    import dagster as dg
    from encoder_pipeline.definitions import defs
    from encoder_pipeline.domains import domain_partitions
    from encoder_pipeline.resources import (PUBLISHED, ArtifactStoreResource, LLMResource,
                                            PipelineSettings, published_artifacts)
    domain, names = sys.argv[1], sys.argv[2].split(",")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [domain])
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.key.to_user_string() in names]
    result = dg.materialize(assets, instance=instance, partition_key=domain, resources={
        PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(),
        "settings": PipelineSettings(profile="tiny"), "llm": LLMResource()})
    sys.exit(0 if result.success else 1)
"""
CONCURRENT_ASSETS = ["clean_corpus", "eval_set", "heuristic_pairs"]
DOMAINS = {"docs_small": "web_qa", "policies_small": "legal"}  # name: the built-in spec it copies


def small_domain(domains: Path, name: str, builtin: str, documents: int = 60) -> None:
    """`builtin`'s spec under another name, over `documents` documents spread over its corpus
    (without its judged set, which those documents would not cover). Few documents: eval_set asks
    the local LLM about up to 30% of them, and two runs share two cores."""
    spec = (PROJECT_ROOT / "data" / "domains" / f"{builtin}.toml").read_text()
    corpus_path = tomllib.loads(spec)["corpus"]["path"]
    folder = domains / name
    folder.mkdir(parents=True)
    lines = (shared_corpus(corpus_path) / "corpus.jsonl").read_text().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_text("".join(lines[:: len(lines) // documents][:documents]))
    spec = re.sub(r"\[judged\][^\[]*", "", spec).replace(f'name = "{builtin}"', f'name = "{name}"')
    (domains / f"{name}.toml").write_text(spec.replace(f'"{corpus_path}"', f'"{folder}"'))


@pytest.mark.slow
def test_two_domains_materialize_at_once_without_sharing_files(tmp_path):
    home, domains = tmp_path / "home", tmp_path / "domains"
    for name, builtin in DOMAINS.items():
        small_domain(domains, name, builtin)
    env = {"ENCODER_PIPELINE_HOME": str(home), "ENCODER_PIPELINE_DOMAINS": str(domains)}
    children = {domain: spawn(tmp_path / f"{domain}.log", MATERIALIZE, domain, ",".join(CONCURRENT_ASSETS),
                              env=env)
                for domain in DOMAINS}
    for domain, child in children.items():
        assert child.wait(timeout=600) == 0, (tmp_path / f"{domain}.log").read_text()[-3000:]

    store = ArtifactStore(home)
    fingerprints, versions = set(), set()
    for domain in children:
        for asset in CONCURRENT_ASSETS:
            manifest = store.manifest(domain, asset)
            assert (manifest["domain"], manifest["asset"]) == (domain, asset)
            assert store.versions(domain, asset) == [store.latest_version(domain, asset)]
            versions.add(manifest["version"])
        fingerprints.add(store.manifest(domain, "clean_corpus")["corpus_fingerprint"])
        corpus = pd.read_parquet(store.latest(domain, "clean_corpus") / "corpus.parquet")
        with (domains / domain / "corpus.jsonl").open() as lines:
            assert set(corpus["parent_id"]) <= {json.loads(line)["_id"] for line in lines}, \
                f"{domain}: units from another domain's corpus"
        pairs = pd.read_parquet(store.latest(domain, "heuristic_pairs") / "pairs.parquet")
        assert set(pairs["doc_id"]) <= set(corpus["doc_id"]), f"{domain}: pairs of another corpus"
        split = json.loads((store.latest(domain, "eval_set") / "eval_set.json").read_text())
        assert set(split["held_out_doc_ids"]) <= set(corpus["parent_id"])
    assert len(fingerprints) == 2 and len(versions) == 2  # one run per domain, distinct corpora
    # beside the domains only the shared model folder (the local LLM's GGUF, assembled under a
    # temporary name and renamed: both runs may race to it)
    assert sorted(p.name for p in home.iterdir() if p.name != "_models") == sorted(DOMAINS)
    assert hidden_leftovers(home) == [], "no work folder or temporary file is left"


# --- a failed blocking check ----------------------------------------------------------------------


def report_stand_in(safe: bool) -> dg.AssetsDefinition:
    """In place of the real eval_report (which needs a whole trained build): it judges the latest
    embedding_index and emits the same blocking `safe_to_promote` check, passing or failing. Its
    report.json always says safe, so only the check can keep serving_index from running."""

    @dg.asset(name="eval_report", partitions_def=domain_partitions,
              check_specs=[dg.AssetCheckSpec(SAFE_TO_PROMOTE, asset="eval_report", blocking=True)])
    def eval_report(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource):
        store = artifacts.store()
        index = store.latest_version(D, "embedding_index")
        put(store, "eval_report", f"r-{index}-{context.run.run_id[:4]}", {"embedding_index": index},
            {"report.json": {"verdict": "train", "promotion": {"safe": True, "reason": "stand-in"},
                             "after": {"ndcg@10": 0.7, "p95_ms": 5.0, "index_mb": 0.1}}})
        return dg.MaterializeResult(check_results=[dg.AssetCheckResult(
            check_name=SAFE_TO_PROMOTE, passed=safe, severity=dg.AssetCheckSeverity.ERROR)])

    return eval_report


def test_a_failed_blocking_check_keeps_the_old_index_serving(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    put(store, "clean_corpus", "c1")
    put(store, "encoder_heuristic", "e1", {"clean_corpus": "c1"}, {"model/weights": "w"})
    candidate(store, "i1", "e1")
    serve(store, "s1", "i1")
    candidate(store, "i2", "e1")  # the new candidate index

    def run(safe: bool) -> dg.ExecuteInProcessResult:
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(domain_partitions.name, [D])
        return dg.materialize([report_stand_in(safe), serving_index], instance=instance, partition_key=D,
                              raise_on_error=False, resources={
                                  PUBLISHED: published_artifacts,
                                  "artifacts": ArtifactStoreResource(root=str(store.root)),
                                  "settings": PipelineSettings(), "llm": LLMResource()})

    blocked = run(safe=False)
    [check] = blocked.get_asset_check_evaluations()
    assert not check.passed
    assert [e.asset_key.to_user_string() for e in blocked.get_asset_materialization_events()] == ["eval_report"]
    assert "serving_index" not in {e.step_key for e in blocked.all_events if e.is_step_start}
    assert store.latest_version(D, "serving_index") == "s1"
    assert store.versions(D, "serving_index") == ["s1"]

    promoted = run(safe=True)  # the same candidate, its check passing: promoted over s1
    assert promoted.success
    served = store.latest(D, "serving_index")
    assert served.name != "s1"
    assert json.loads((served / "promotion.json").read_text())["embedding_index_version"] == "i2"
    assert json.loads((served / "promotion.json").read_text())["previous"]["version"] == "s1"
