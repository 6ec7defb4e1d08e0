"""Drift: the corpus_source observation, corpus_drift_sensor's decisions on a corpus that changes
between ticks (record, skip, refresh, retrain), its no-flood rules, and the incremental index refresh
that embedding_index does when only the corpus moved.

A small real domain: documented functions of the running Python's standard library (qualified name
-> docstring) as a JSONL corpus, cleaned by the real clean_corpus asset, indexed by the real
embedding_index asset with the packaged MiniLM; the encoders, sweep, eval set and the promotion of
that index are stood in for by hand-published artifacts (the base model plays the trained encoder),
so no training runs here.
"""

import inspect
import json
import shutil
import string
import textwrap
import time

import dagster as dg
import numpy as np
import pytest
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,  # links a runless check result to its materialization
)
from spec_files import write_spec

from encoder_pipeline.definitions import defs
from encoder_pipeline.defs.automation.sensors import REASON_TAG, corpus_drift_sensor
from encoder_pipeline.defs.corpus.assets import clean_corpus
from encoder_pipeline.defs.corpus.drift import CORPUS_SOURCE, DATA_VERSION_TAG
from encoder_pipeline.defs.evaluation.assets import SAFE_TO_PROMOTE
from encoder_pipeline.defs.indexing.assets import embedding_index
from encoder_pipeline.defs.training.assets import RUNGS
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import drift
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, model_fingerprint, resolve_model_path
from encoder_pipeline.lib.heldout import EvalSplit, QuerySet
from encoder_pipeline.lib.index import UPDATABLE_PRECISIONS, build_quantized, update_index
from encoder_pipeline.lib.layout import EVAL_FILE, SWEEP_FILE, write_eval_split
from encoder_pipeline.lib.search import Searcher, index_version
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets

DOMAIN = "notes"
MODULES = (json, shutil, string, textwrap, inspect)


def stdlib_documents() -> list[dict]:
    """Documented public functions of a few stdlib modules: title = qualified name, text = docstring."""
    docs = []
    for module in MODULES:
        for name, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if callable(member) and not name.startswith("_") else None
            if doc and len(doc.split()) >= 12 and inspect.getmodule(member) is module:
                docs.append({"_id": f"{module.__name__}.{name}", "title": f"{module.__name__}.{name}",
                             "text": doc})
    return docs


def write_corpus(path, docs) -> None:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def publish(store: ArtifactStore, asset: str, upstream: dict, files: dict) -> None:
    """A hand-made version of an upstream asset this test does not run (see the module docstring)."""
    with store.publish(Manifest(domain=DOMAIN, asset=asset, version="hand", seed=0, config={},
                                upstream=upstream)) as staging:
        for name, write in files.items():
            write(staging / name)


def resources(root) -> dict:
    return {PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(root)),
            "settings": PipelineSettings(profile="tiny"), "llm": LLMResource()}


def materialize(assets, instance, root) -> dg.ExecuteInProcessResult:
    """`assets` alone; the graph's others only provide their published versions."""
    return dg.materialize(graph_assets(), selection=assets, instance=instance, partition_key=DOMAIN,
                          resources=resources(root))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The domain built once: corpus, spec, clean_corpus (with its source snapshot), a stand-in eval
    set / ladder / sweep, and the int8 embedding_index; each test works on a copy."""
    base = tmp_path_factory.mktemp("drift")
    docs = stdlib_documents()[:48]
    write_corpus(base / "notes.jsonl", docs)
    (base / "domains").mkdir()
    write_spec(base / "domains", name=DOMAIN, path=base / "notes.jsonl")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENCODER_PIPELINE_DOMAINS", str(base / "domains"))
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(domain_partitions.name, [DOMAIN])
        store = ArtifactStore(base / "artifacts")
        assert materialize([clean_corpus], instance, store.root).success
        corpus_version = store.latest_version(DOMAIN, "clean_corpus")
        # Eval queries: the first sentence of a docstring finds its function.
        evaluated = docs[::4]
        split = EvalSplit(QuerySet({f"q{i}": d["text"].split(".")[0] for i, d in enumerate(evaluated)},
                                   {f"q{i}": {d["_id"]: 1} for i, d in enumerate(evaluated)}, "structural"),
                          QuerySet({}, {}, "structural"), {d["_id"] for d in evaluated})
        publish(store, "eval_set", {"clean_corpus": corpus_version},
                {EVAL_FILE: lambda path: write_eval_split(path, split)})
        for rung in RUNGS:
            publish(store, rung, {}, {})
        model = resolve_model_path(DEFAULT_BASE_MODEL)
        sweep = {"rung": RUNGS[0], "model_path": model, "revision": model_fingerprint(model),
                 "chosen": {"dims": 384, "precision": "int8", "dev": {"ndcg@10": 1.0}}}
        publish(store, "index_sweep", {"clean_corpus": corpus_version},
                {SWEEP_FILE: lambda path: path.write_text(json.dumps(sweep))})
        result = materialize([embedding_index], instance, store.root)
        assert result.success
        [built_index] = result.asset_materializations_for_node("embedding_index")
        assert built_index.metadata["build_mode"].value == "full"
        # Promoted as serving_index would: the drift canary measures what is served, nothing else.
        index_dir = store.latest(DOMAIN, "embedding_index")
        copies = {item.name: lambda path, item=item: shutil.copy2(item, path)
                  for item in index_dir.iterdir() if item.name != "manifest.json"}
        publish(store, "serving_index", {"embedding_index": index_dir.name},
                {**copies, "promotion.json": lambda path: path.write_text(json.dumps({"previous": None}))})
    return base, docs


@pytest.fixture
def domain(built, tmp_path, monkeypatch):
    """A private copy of the built domain: (corpus file, artifact store, Dagster instance, docs)."""
    base, docs = built
    shutil.copytree(base / "artifacts", tmp_path / "artifacts")
    shutil.copy(base / "notes.jsonl", tmp_path / "notes.jsonl")
    (tmp_path / "domains").mkdir()
    write_spec(tmp_path / "domains", name=DOMAIN, path=tmp_path / "notes.jsonl")
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(tmp_path / "domains"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [DOMAIN])
    return tmp_path / "notes.jsonl", ArtifactStore(tmp_path / "artifacts"), instance, list(docs)


def tick(instance, store, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources(store.root))
    return corpus_drift_sensor(context)


def new_document(i: int) -> dict:
    return {"_id": f"added.{i}", "title": f"added.tally_marks_{i}",
            "text": f"Count occurrences of tally marks in a ledger string number {i}, grouping "
                    "them in fives and returning the total as an integer."}


def observed(result) -> dict:
    [event] = result.asset_events
    assert event.asset_key == dg.AssetKey(CORPUS_SOURCE) and event.partition == DOMAIN
    assert event.tags[DATA_VERSION_TAG] == event.metadata["fingerprint"].value
    return {key: value.value for key, value in event.metadata.items()}


def test_sensor_decisions_on_a_changing_corpus(domain):
    corpus, store, instance, docs = domain
    first = tick(instance, store)  # the corpus as trained: recorded, nothing requested
    metadata = observed(first)
    assert first.run_requests == [] and metadata["added"] == metadata["changed"] == metadata["removed"] == 0
    assert metadata["documents"] == len(docs) and metadata["decision"] == "none"
    assert isinstance(tick(instance, store, first.cursor), dg.SkipReason)

    write_corpus(corpus, [*docs, new_document(0)])  # one document in 49: below every threshold
    small = tick(instance, store, first.cursor)
    metadata = observed(small)
    assert (metadata["added"], metadata["changed"], metadata["removed"]) == (1, 0, 0)
    assert metadata["changed_fraction"] == pytest.approx(1 / len(docs))
    assert 0 < metadata["new_token_share"] < 0.02 and "tally" in metadata["new_terms"]
    assert 0 <= metadata["canary_recall_drop"] <= 0.05 and metadata["canary_recall_at_10"] > 0.5
    [request] = small.run_requests
    assert request.job_name == "index_refresh_job" and request.partition_key == DOMAIN
    assert "below the retrain thresholds" in request.tags[REASON_TAG]
    assert isinstance(tick(instance, store, small.cursor), dg.SkipReason)  # requested once only

    changed = [{**doc, "text": "Deprecated: this helper was removed."} for doc in docs[:6]]
    write_corpus(corpus, [*changed, *docs[6:], new_document(0)])  # 7 of 48 documents: > 10%
    big = tick(instance, store, small.cursor)
    metadata = observed(big)
    assert (metadata["added"], metadata["changed"]) == (1, 6)
    [request] = big.run_requests
    assert request.job_name == "train_encoder_job" and request.partition_key == DOMAIN
    assert request.tags[REASON_TAG].startswith("drift: 14.6% of documents")
    assert request.run_key != small.run_requests[0].run_key


def test_no_canary_before_a_first_promotion(domain):
    """Nothing served (the candidate index was never promoted): the drift is measured, the canary
    is not, and the candidate is not measured in its place."""
    corpus, store, instance, docs = domain
    shutil.rmtree(store.asset_dir(DOMAIN, "serving_index"))
    write_corpus(corpus, [*docs, new_document(0)])
    metadata = observed(tick(instance, store))
    assert (metadata["added"], metadata["changed"], metadata["removed"]) == (1, 0, 0)
    assert "canary_recall_drop" not in metadata
    assert metadata["canary"] == "no served index with a corpus snapshot"


def test_never_floods(domain):
    corpus, store, instance, docs = domain
    first = tick(instance, store)
    write_corpus(corpus, [*[new_document(i) for i in range(6)], *docs])  # 6 of 48 added: > 10%

    run = instance.add_run(dg.DagsterRun(job_name="train_encoder_job", run_id="a" * 36,
                                         status=dg.DagsterRunStatus.STARTED,
                                         tags={"dagster/partition": DOMAIN}))
    busy = tick(instance, store, first.cursor)
    assert observed(busy)["decision"] == "retrain" and busy.run_requests == []

    instance.report_run_canceled(run)  # that retrain started just now: within the 24 h interval
    waiting = tick(instance, store, busy.cursor)
    [request] = waiting.run_requests
    assert request.job_name == "index_refresh_job"
    assert "retrain deferred 24.0 h (minimum interval)" in request.tags[REASON_TAG]
    assert isinstance(tick(instance, store, waiting.cursor), dg.SkipReason)

    fresh = dg.DagsterInstance.ephemeral()  # no retrain on record: the request goes out
    fresh.add_dynamic_partitions(domain_partitions.name, [DOMAIN])
    retrain = tick(fresh, store, waiting.cursor)
    [request] = retrain.run_requests
    assert request.job_name == "train_encoder_job"
    assert time.time() - json.loads(retrain.cursor)[DOMAIN]["retrain_requested_at"] < 60

    write_corpus(corpus, [*[new_document(i) for i in range(9)], *docs])  # more drift, minutes later
    again = tick(fresh, store, retrain.cursor)
    assert [r.job_name for r in again.run_requests] == ["index_refresh_job"]


def test_incremental_index_refresh(domain):
    corpus, store, instance, docs = domain
    before = Searcher.for_domain(DOMAIN, store).index
    indexed = [doc for doc in docs if doc["_id"] in set(before.ids)]  # near-duplicates were dropped
    removed, edited, unchanged = indexed[1], indexed[5], indexed[9]
    kept = [{**doc, "text": doc["text"] + " Also accepts a path."} if doc is edited else doc
            for doc in docs if doc is not removed]
    write_corpus(corpus, [*kept, new_document(0), new_document(1)])

    result = materialize([clean_corpus, embedding_index], instance, store.root)
    metadata = result.asset_materializations_for_node("embedding_index")[0].metadata
    assert metadata["build_mode"].value == "incremental"
    assert (metadata["units_embedded"].value, metadata["units_removed"].value) == (3, 2)

    # the refreshed candidate (a report and a promotion would serve it; not run here)
    searcher = Searcher(index_version(store, DOMAIN, "embedding_index",
                                      store.latest_version(DOMAIN, "embedding_index")))
    index = searcher.index
    assert index.index.ntotal == len(index.ids) == before.index.ntotal + 1
    assert removed["_id"] not in index.ids and {"added.0", "added.1"} <= set(index.ids)
    [hit] = searcher.search("count tally marks in a ledger string and group them in fives", k=1)
    assert hit.id.startswith("added.")
    # Unchanged units keep the vectors they had: the same query scores them as before.
    query = searcher.embed([unchanged["text"].split(".")[0]])
    [[(old_row, old_score)]] = before.search(query, 1)
    [[(new_row, new_score)]] = index.search(query, 1)
    assert before.ids[old_row] == index.ids[new_row] and new_score == pytest.approx(old_score, abs=1e-6)


# The assets whose conditions decide these cases (fewer to evaluate per tick).
AUTOMATED = dg.AssetSelection.assets("heuristic_pairs", "embedding_index", "eval_report", "serving_index")


def _automation_tick(instance, cursor=None):
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor,
                                               asset_selection=AUTOMATED)
    graph = defs.resolve_asset_graph()
    return result, {key.to_user_string() for key in graph.get_all_asset_keys()
                    if result.get_requested_partitions(key) == {"code"}}


@pytest.mark.parametrize("passed", [False, True])
def test_automation_refreshes_on_a_new_corpus_and_promotes_only_past_blocking_checks(passed):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])

    def materialized(asset: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition="code"))

    result, _ = _automation_tick(instance)
    for asset in ("eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives", *RUNGS,
                  "index_sweep", "embedding_index", "eval_report", "serving_index"):
        materialized(asset)
    result, _ = _automation_tick(instance, result.cursor)
    materialized("clean_corpus")  # a new corpus snapshot: the index and the report follow, training does not
    result, requested = _automation_tick(instance, result.cursor)
    assert requested == {"embedding_index", "eval_report"}

    materialized("embedding_index")
    materialized("eval_report")
    report = dg.AssetRecordsFilter(asset_key=dg.AssetKey("eval_report"), asset_partitions=["code"])
    [record] = instance.fetch_materializations(report, limit=1).records
    instance.report_runless_asset_event(dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("eval_report"), check_name=SAFE_TO_PROMOTE, passed=passed, partition="code",
        blocking=True, target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
            storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp)))
    _, requested = _automation_tick(instance, result.cursor)
    assert requested == ({"serving_index"} if passed else set())


@pytest.mark.parametrize("precision", UPDATABLE_PRECISIONS)
def test_update_index_keeps_rows_aligned(precision):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(40)]
    index = build_quantized(vectors[:30], 32, precision, ids[:30], ids[:30], ids[:30])
    update_index(index, [0, 7, 29], vectors[30:], ids[30:], ids[30:], ids[30:])
    assert index.index.ntotal == len(index.ids) == 37 and {"d0", "d7", "d29"}.isdisjoint(index.ids)
    for i in (3, 12, 28, 30, 39):  # each vector still finds its own id
        [[(row, _)]] = index.search(vectors[i:i + 1], 1)
        assert index.ids[row] == f"d{i}"


def test_decide_and_vocabulary_shift():
    thresholds = drift.Thresholds(changed_fraction=0.1, new_token_share=0.02, canary_recall_drop=0.05)
    base = {"fingerprint": "b", "documents": 100, "training_fingerprint": "a", "indexed_fingerprint": "a"}
    assert drift.decide(drift.Drift(**base, changed_fraction=0.02), thresholds).action == "refresh"
    assert drift.decide(drift.Drift(**base, changed_fraction=0.1), thresholds).action == "retrain"
    assert drift.decide(drift.Drift(**base, canary_recall_before=0.9, canary_recall_after=0.8),
                        thresholds).reason.startswith("drift: canary Recall@10 fell 0.900 -> 0.800")
    assert drift.decide(drift.Drift(**{**base, "fingerprint": "a"}), thresholds).action == "none"
    assert drift.decide(drift.Drift("a", 100), thresholds).action == "none"  # nothing to compare with

    shift = drift.vocabulary_shift({"parse", "date", "string"}, ["Parse the date string", "parse a tarball"],
                                   changed_tokens=50, corpus_tokens=1000)
    # 2 of the 6 terms read are new ("a" is too short to count), in 5% of the corpus's tokens
    assert shift.new_token_share == pytest.approx(2 / 6 * 0.05)
    assert shift.new_terms == [("tarball", 1), ("the", 1)]
