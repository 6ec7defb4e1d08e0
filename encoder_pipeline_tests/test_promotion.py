"""Operating the served index: publish history, rollback and re-promotion, garbage collection that
keeps every served version loadable, the promotion gate that keeps a worse index out (and serves
nothing rather than a refused candidate, unless forced, on the record), and a CLI backfill that
lands on the Dagster instance. Artifact trees are handmade (real ArtifactStore, real files); the
last store tests read the session's real tiny build."""

import json
import shutil

import dagster as dg
import pytest

from encoder_pipeline import cli
from encoder_pipeline.defs.automation.health import domain_health, domain_health_job
from encoder_pipeline.defs.serving.assets import serving_index
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.index import load_index, save_index
from encoder_pipeline.lib.layout import read_report
from encoder_pipeline.lib.promotion import (
    PromotionError,
    garbage_collect,
    needed_versions,
    promote,
    promoted_versions,
    read_promotion,
    rollback,
)
from encoder_pipeline.lib.search import NothingServed, Searcher, served_index
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets, refusal_parts

D = "notes"
REFUSED = "not promoted: 0.8880 is below the off-the-shelf model's 0.9350 by more than 0.01"


def put(store: ArtifactStore, asset: str, version: str, upstream: dict | None = None,
        files: dict | None = None) -> None:
    with store.publish(Manifest(D, asset, version, 0, {}, upstream=upstream or {})) as staging:
        for name, payload in (files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(json.dumps(payload) if isinstance(payload, dict) else payload)


def candidate(store: ArtifactStore, index: str, encoder: str, upstream_encoder: str | None = None,
              safe: bool = True, ndcg: float = 0.7, reason: str = "checked") -> None:
    """An embedding_index built by `encoder` (its choice.json names the model folder; the manifest
    may record another encoder version, as when a rung is retrained between sweep and index) and the
    eval_report that judged it."""
    model = store.asset_dir(D, "encoder_heuristic") / encoder / "model"
    put(store, "embedding_index", index, {"clean_corpus": "c1",
                                          "encoder_heuristic": upstream_encoder or encoder},
        {"choice.json": {"rung": "encoder_heuristic", "model_path": str(model), "revision": encoder,
                         "dims": 96, "precision": "int8"}, "index.faiss": "vectors"})
    put(store, "eval_report", f"r-{index}", {"embedding_index": index},
        {"report.json": {"verdict": "train", "promotion": {"safe": safe, "reason": reason},
                         "after": {"ndcg@10": ndcg, "p95_ms": 5.0, "index_mb": 0.1}}})


def serve(store: ArtifactStore, version: str, index: str) -> None:
    """A serving_index version as the asset writes it: the candidate's files and promotion.json,
    whose `previous` is the version served when it was promoted."""
    try:
        previous = {"version": store.latest_version(D, "serving_index")}
    except FileNotFoundError:
        previous = None
    choice = json.loads((store.asset_dir(D, "embedding_index") / index / "choice.json").read_text())
    put(store, "serving_index", version, {"embedding_index": index, "eval_report": f"r-{index}"},
        {"choice.json": choice, "promotion.json": {"embedding_index_version": index,
                                                   "previous": previous}})


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    """Four promotions, s1..s4, of indexes i1..i4 built by encoders e1..e4 (version names sort
    against their publish order). i3 was built by e2 while its manifest records e3."""
    store = ArtifactStore(tmp_path / "artifacts")
    put(store, "clean_corpus", "c1")
    for n in range(1, 5):
        put(store, "encoder_heuristic", f"e{n}", {"clean_corpus": "c1"}, {"model/weights": "w"})
        candidate(store, f"i{n}", "e2" if n == 3 else f"e{n}", upstream_encoder=f"e{n}")
        serve(store, f"s{n}", f"i{n}")
    (store.domain_dir(D) / "_embeddings" / "cache.npy").parent.mkdir()
    (store.domain_dir(D) / "_embeddings" / "cache.npy").write_text("cache")
    return store


def test_versions_follow_publish_order_not_names_or_mtimes(tmp_path):
    store = ArtifactStore(tmp_path)
    legacy = store.asset_dir(D, "eval_set") / "0-legacy"  # published before history.jsonl existed
    legacy.mkdir(parents=True)
    for version in ("zz", "aa", "mm"):
        put(store, "eval_set", version)
    put(store, "eval_set", "zz")  # re-published: it moves to the end
    assert store.versions(D, "eval_set") == ["0-legacy", "aa", "mm", "zz"]
    store.set_latest(D, "eval_set", "aa", reason="rollback")
    assert store.latest_version(D, "eval_set") == "aa"
    with open(store.asset_dir(D, "eval_set") / "history.jsonl", "a") as history:
        history.write('{"event": "publish", "vers')  # a crash mid-append
    assert store.versions(D, "eval_set") == ["0-legacy", "aa", "mm", "zz"]
    assert store.history(D, "eval_set")[-1] == {**store.history(D, "eval_set")[-1],
                                                "event": "set_latest", "version": "aa", "from": "zz"}
    with pytest.raises(FileNotFoundError):
        store.set_latest(D, "eval_set", "nope", reason="promote")


def test_rollback_walks_back_promotions_and_promote_returns(store):
    assert promoted_versions(store, D) == ["s1", "s2", "s3", "s4"]
    assert rollback(store, D) == ("s4", "s3")
    assert rollback(store, D) == ("s3", "s2")
    assert served_index(D, store).version == "s2"
    assert promote(store, D, "s4") == ("s2", "s4")
    with pytest.raises(PromotionError, match="not a promoted version.*s1, s2, s3, s4"):
        promote(store, D, "i4")
    promote(store, D, "s1")
    with pytest.raises(PromotionError, match="first promotion"):
        rollback(store, D)
    assert store.latest_version(D, "serving_index") == "s1"


def test_rollback_skips_a_version_that_was_rolled_back(store):
    """s4 is rolled back (bad); s5 is promoted over s3. Rolling s5 back serves s3, not s4."""
    rollback(store, D)
    candidate(store, "i5", "e4")
    serve(store, "s5", "i5")
    assert rollback(store, D) == ("s5", "s3")


def test_gc_keeps_the_last_promotions_and_what_they_need(store):
    encoders = store.asset_dir(D, "encoder_heuristic")
    dry = garbage_collect(store, D, keep_promoted=2, dry_run=True)
    assert all((store.asset_dir(D, a) / v).is_dir() for a, v in dry.deleted)  # nothing deleted
    result = garbage_collect(store, D, keep_promoted=2)
    assert sorted(result.deleted) == sorted(dry.deleted) == sorted([
        ("serving_index", "s1"), ("serving_index", "s2"), ("embedding_index", "i1"),
        ("embedding_index", "i2"), ("eval_report", "r-i1"), ("eval_report", "r-i2"),
        ("encoder_heuristic", "e1")])
    assert result.freed_bytes > 0 and promoted_versions(store, D) == ["s3", "s4"]
    # s3's index was built by e2 (its choice.json), not the e3 its manifest names: both stay
    assert (encoders / "e2" / "model").is_dir() and (encoders / "e3").is_dir()
    assert rollback(store, D) == ("s4", "s3")
    assert served_index(D, store).model_path == encoders / "e2" / "model"  # s3 still loads
    assert (store.domain_dir(D) / "_embeddings" / "cache.npy").exists()
    assert not list(store.domain_dir(D).glob("*/.deleting-*"))


def test_gc_never_deletes_what_is_served_or_its_rollback_target(store):
    rollback(store, D)
    rollback(store, D)  # serving s2, whose rollback target is s1
    result = garbage_collect(store, D, keep_promoted=1)
    assert promoted_versions(store, D) == ["s1", "s2", "s4"]
    assert ("encoder_heuristic", "e3") in result.deleted  # only s3's manifest named it
    assert served_index(D, store).model_path == store.asset_dir(D, "encoder_heuristic") / "e2" / "model"
    assert rollback(store, D) == ("s2", "s1")
    assert served_index(D, store).model_path.is_dir()
    with pytest.raises(ValueError, match="at least 1"):
        garbage_collect(store, D, keep_promoted=0)


def _materialize_serving(store: ArtifactStore, keep: int = 3) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [D])
    return dg.materialize(graph_assets(), selection=[serving_index], instance=instance,
                          partition_key=D, raise_on_error=False,
                          resources={PUBLISHED: published_artifacts,
                                     "artifacts": ArtifactStoreResource(root=str(store.root)),
                                     "settings": PipelineSettings(keep_promoted_versions=keep),
                                     "llm": LLMResource()})


def test_the_gate_keeps_a_worse_index_from_replacing_the_served_one(store):
    """serving_index materialized on its own refuses a candidate its report found worse (the
    report's `safe_to_promote` rule is test_lib_report's); a safe one is promoted and the
    retention setting collects what the last promotions no longer need."""
    candidate(store, "i5", "e4", safe=False, ndcg=0.2)
    result = _materialize_serving(store)
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert "says not to promote" in failure.step_failure_data.error.message
    assert store.latest_version(D, "serving_index") == "s4"

    candidate(store, "i6", "e4")
    result = _materialize_serving(store, keep=1)
    assert result.success
    served = store.latest(D, "serving_index")
    assert json.loads((served / "promotion.json").read_text())["previous"]["version"] == "s4"
    [event] = result.get_asset_materialization_events()
    deleted = event.materialization.metadata["gc_deleted_versions"].value
    assert promoted_versions(store, D) == ["s4", served.name]  # the newest and its rollback target
    assert deleted == 3 + 4 + 4 + 3  # s1-s3; i1-i3 and i5; their reports; e1-e3 (s4 needs e4)
    assert served_index(D, store).model_path.is_dir()


def test_the_real_build_is_fully_referenced(tiny_code_served):
    """On the session's real build the references resolve: the served encoder (a real choice.json
    path) is needed, and collection deletes nothing that any current version was built from."""
    store = tiny_code_served.store
    served = served_index("code", store)
    needed = needed_versions(store, "code", keep_promoted=1)
    assert (served.choice["rung"], served.model_path.parent.name) in needed
    assert garbage_collect(store, "code", keep_promoted=1, dry_run=True).deleted == []
    assert tiny_code_served.metadata["gc_deleted_versions"].value == 0
    for asset in ("clean_corpus", "encoder_hard_negatives", "eval_report", "serving_index"):
        assert store.versions("code", asset)[-1] == store.latest_version("code", asset)


def test_a_blocked_promotion_keeps_serving_and_force_is_on_the_record(tiny_code_served, tmp_path,
                                                                       dagster_home, capsys):
    """The blocked path, deterministically, on a copy of the real build: a candidate whose units all
    name a document nobody judged scores nDCG@10 0, so the real eval_report refuses it against the
    index served now and the off-the-shelf model; serving_index is skipped and `search` keeps
    serving the same version; `promote` exits 3; `promote --force` serves it, recorded as forced."""
    store = ArtifactStore(tmp_path / "artifacts")  # where dagster_home points the CLI
    shutil.copytree(tiny_code_served.store.domain_dir("code"), store.domain_dir("code"), symlinks=True)
    before = served_index("code", store)
    built = store.latest("code", "embedding_index")
    index = load_index(built, before.revision)
    manifest = store.manifest("code", "embedding_index")
    with store.publish(Manifest("code", "embedding_index", "blind", 0, {}, manifest["corpus_fingerprint"],
                                manifest["upstream"])) as staging:
        save_index(staging, index, index.ids, ["judged-by-nobody"] * len(index.ids), index.titles,
                   before.revision)
        shutil.copy2(built / "choice.json", staging / "choice.json")

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    blocked = dg.materialize(
        graph_assets(), selection=["eval_report", "serving_index"],
        instance=instance, partition_key="code", raise_on_error=False,
        resources={PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(store.root)),
                   "settings": PipelineSettings(profile="tiny"), "llm": LLMResource()})
    report = read_report(store, "code")
    reason = report["promotion"]["reason"]
    assert report["after"]["ndcg@10"] == 0.0 and report["promotion"]["safe"] is False
    assert "below the off-the-shelf model's" in reason and "below the currently served index's" in reason
    assert "serving_index" not in {e.step_key for e in blocked.all_events if e.is_step_start}
    assert served_index("code", store).version == before.version
    assert cli.main(["search", "--domain", "code", "parse a date", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["served"]["version"] == before.version
    assert cli.not_promoted_message(store, "code").startswith(
        f"{reason} (check safe_to_promote); `search` keeps serving serving_index {before.version} ")

    assert cli.main(["promote", "--domain", "code"]) == 3
    assert "says not to promote" in capsys.readouterr().err
    assert served_index("code", store).version == before.version
    assert cli.main(["promote", "--domain", "code", "--force"]) == 0
    assert "FORCED over its report's refusal" in capsys.readouterr().out
    forced = served_index("code", store)
    assert forced.version != before.version and forced.choice == before.choice
    promotion = read_promotion(store, "code", forced.version)
    assert promotion["forced"] is True and promotion["reason"] == reason
    assert promotion["embedding_index_version"] == "blind"
    assert promotion["previous"]["version"] == before.version
    [record] = instance.fetch_materializations(dg.AssetKey("serving_index"), limit=5).records
    assert record.asset_materialization.metadata["forced"].value is True
    # the history says which promotions were forced: the build's (forced iff its report refused it)
    history = [read_promotion(store, "code", v)["forced"] for v in promoted_versions(store, "code")]
    assert history[-1] is True and all(f is tiny_code_served.forced for f in history[:-1])
    assert cli.main(["rollback", "--domain", "code"]) == 0
    assert served_index("code", store).version == before.version


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    """A throwaway instance for the CLI (DAGSTER_HOME), whose queued runs nothing dequeues."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: QueuedRunCoordinator\n"
        "telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("ENCODER_PIPELINE_HOME", str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)  # the CLI moves to the project root; this restores the directory
    return home


def test_cli_rollback_promote_gc(store, dagster_home, capsys):
    assert cli.main(["rollback", "--domain", D]) == 0
    assert "now serving serving_index s3 (was s4)" in capsys.readouterr().out
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    [observation] = instance.fetch_observations(dg.AssetKey("serving_index"), limit=5).records
    metadata = observation.asset_observation.metadata
    assert metadata["action"].value == "rollback" and metadata["served_version"].value == "s3"
    assert observation.partition_key == D
    assert cli.main(["promote", "--domain", D, "--version", "nope"]) == 2
    assert "s1, s2, s3, s4" in capsys.readouterr().err
    assert cli.main(["promote", "--domain", D, "--version", "s4"]) == 0
    assert cli.main(["gc", "--domain", D, "--keep", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete serving_index/s1" in out and (store.asset_dir(D, "serving_index") / "s1").is_dir()
    assert cli.main(["gc", "--domain", D, "--keep", "3"]) == 0
    assert promoted_versions(store, D) == ["s2", "s3", "s4"]

    # without --version: the newest candidate, through the serving_index asset and its gate
    instance.add_dynamic_partitions(domain_partitions.name, [D])
    candidate(store, "i5", "e4", safe=False, reason=REFUSED)
    assert cli.main(["promote", "--domain", D]) == 3
    assert "says not to promote" in capsys.readouterr().err
    # what `materialize` prints when the gate held: the reason, and the version still served
    assert cli.not_promoted_message(store, D) == (f"{REFUSED} (check safe_to_promote); `search` keeps "
                                                  f"serving serving_index s4 (encoder_heuristic, int8@96)")
    assert cli.main(["promote", "--domain", D, "--force", "--version", "s3"]) == 2
    assert "not both" in capsys.readouterr().err and served_index(D, store).version == "s4"
    candidate(store, "i6", "e4")
    assert cli.main(["promote", "--domain", D]) == 0
    assert "promoted embedding_index i6 (previously served: s4)" in capsys.readouterr().out
    assert len(promoted_versions(store, D)) == 3  # the setting's default keeps three
    assert read_promotion(store, D, served_index(D, store).version)["forced"] is False


def test_nothing_is_served_before_a_promotion_unless_forced(tmp_path, dagster_home, capsys):
    """Before a first promotion nothing is served, whatever the candidate: every reader refuses
    with a sentence that names the candidate, says why it is not served and what to run. A refused
    candidate is served only by `promote --force`, which promotion.json and the UI record."""
    store = ArtifactStore(tmp_path / "artifacts")  # where dagster_home points the CLI
    put(store, "clean_corpus", "c1")
    put(store, "encoder_heuristic", "e1", {"clean_corpus": "c1"}, {"model/weights": "w"})
    candidate(store, "i1", "e1")
    with pytest.raises(NothingServed, match=r"no index has been promoted\. Its candidate, embedding_index i1 "
                       r"\(encoder_heuristic, int8@96\), passed its eval_report \(checked\) but was not "
                       r"promoted: `encoder-pipeline promote --domain notes` serves it"):
        served_index(D, store)
    candidate(store, "i2", "e1", safe=False, reason=REFUSED)
    store.set_latest(D, "eval_report", "r-i1", reason="rollback")  # the latest report judged i1
    with pytest.raises(NothingServed, match="embedding_index i2 .* has not been judged by an eval_report "
                                            "yet: `encoder-pipeline materialize --domain notes`"):
        served_index(D, store)
    store.set_latest(D, "eval_report", "r-i2", reason="promote")

    sentence = refusal_parts(store, D)
    assert REFUSED in sentence
    for read in (lambda: served_index(D, store), lambda: Searcher.for_domain(D, store)):
        with pytest.raises(NothingServed) as refused:
            read()
        assert all(part in str(refused.value) for part in sentence), str(refused.value)
    for argv in (["search", "--domain", D, "a query"], ["export", "--domain", D, "--out", str(tmp_path)],
                 ["rollback", "--domain", D], ["promote", "--domain", D, "--version", "i1"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert all(part in err for part in sentence), (argv, err)
    message = cli.not_promoted_message(store, D)
    assert "nothing is served" in message and all(part in message for part in sentence)
    assert cli.main(["gc", "--domain", D, "--dry-run"]) == 0  # nothing served: no rollback target to keep
    assert "would delete embedding_index/i1" in capsys.readouterr().out

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    instance.add_dynamic_partitions(domain_partitions.name, [D])
    assert cli.main(["promote", "--domain", D]) == 3
    assert f"`encoder-pipeline promote --domain {D} --force` serves it anyway" in capsys.readouterr().err
    with pytest.raises(NothingServed):
        served_index(D, store)
    assert cli.main(["promote", "--domain", D, "--force"]) == 0
    out = capsys.readouterr().out
    assert f"promoted embedding_index i2, FORCED over its report's refusal ({REFUSED})" in out
    [version] = promoted_versions(store, D)
    assert served_index(D, store).version == version
    promotion = read_promotion(store, D, version)
    assert (promotion["forced"], promotion["reason"], promotion["previous"]) == (True, REFUSED, None)
    [record] = instance.fetch_materializations(dg.AssetKey("serving_index"), limit=5).records
    metadata = record.asset_materialization.metadata
    assert metadata["forced"].value is True and metadata["reason"].value == REFUSED


def _refusing_build(store: ArtifactStore) -> dg.Definitions:
    """In place of train_encoder_job's graph: a run that builds candidate i9 and reports it refused,
    failing the blocking check as the real eval_report does, then the real serving_index."""

    @dg.asset(name="eval_report", partitions_def=domain_partitions,
              check_specs=[dg.AssetCheckSpec("safe_to_promote", asset="eval_report", blocking=True)])
    def refusing_report() -> dg.MaterializeResult:
        candidate(store, "i9", "e1", safe=False, reason=REFUSED)
        (store.latest(D, "eval_report") / "report.md").write_text("# notes")
        return dg.MaterializeResult(check_results=[dg.AssetCheckResult(
            check_name="safe_to_promote", passed=False, severity=dg.AssetCheckSeverity.ERROR)])

    return dg.Definitions(
        assets=[refusing_report, serving_index, domain_health],  # materialize refreshes domain_health
        jobs=[dg.define_asset_job("train_encoder_job", selection=[refusing_report, serving_index],
                                  partitions_def=domain_partitions), domain_health_job],
        resources={PUBLISHED: published_artifacts,
                   "artifacts": ArtifactStoreResource(root=str(store.root)), "settings": PipelineSettings(),
                   "llm": LLMResource()})


@pytest.mark.parametrize("served_before", [True, False])
def test_materialize_says_what_a_refused_candidate_leaves_served(served_before, tmp_path, dagster_home,
                                                                  capsys, monkeypatch):
    """`materialize` exits 3 when safe_to_promote held the candidate back, and its sentence is true:
    the version `search` keeps serving, or that nothing is served, why, and the command that serves
    the candidate anyway."""
    store = ArtifactStore(tmp_path / "artifacts")
    put(store, "encoder_heuristic", "e1", {}, {"model/weights": "w"})
    if served_before:
        candidate(store, "i1", "e1")
        serve(store, "s1", "i1")
    monkeypatch.setattr("encoder_pipeline.definitions.defs", _refusing_build(store))
    monkeypatch.setattr("encoder_pipeline.domains.load_domain", lambda name, *_: None)  # no spec file for D
    dg.DagsterInstance.from_config(str(dagster_home)).add_dynamic_partitions(domain_partitions.name, [D])
    assert cli.main(["materialize", "--domain", D]) == 3
    printed = capsys.readouterr()
    err = printed.err
    # the designed refusal is a sentence, not a trace
    assert "eval_report: FAILED: refused by its blocking check safe_to_promote" in printed.out, printed.out
    assert "Stack Trace" not in printed.out + err and "DagsterAssetCheckFailedError" not in printed.out + err
    if served_before:
        assert f"{REFUSED} (check safe_to_promote); `search` keeps serving serving_index s1 " in err
    else:
        assert "nothing is served" in err and all(part in err for part in refusal_parts(store, D))
    assert promoted_versions(store, D) == (["s1"] if served_before else [])


def test_cli_backfill_lands_on_the_instance(dagster_home, capsys):
    assert cli.main(["backfill", "--domains", "code,web_qa", "--profile", "tiny"]) == 0
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    [backfill] = instance.get_backfills()
    assert backfill.backfill_id in capsys.readouterr().out
    assert backfill.job_name == "train_encoder_job" and not backfill.is_asset_backfill
    assert backfill.partition_names == ["code", "web_qa"]
    assert backfill.status.value == "REQUESTED"  # the daemon picks it up
    assert backfill.run_config == {"resources": {"settings": {"config": {"profile": "tiny"}}}}
    assert backfill.partition_set_origin.repository_origin.code_location_origin.location_name == \
        "encoder_pipeline"  # what `dagster dev` names the location (pyproject.toml)
    assert {"code", "web_qa"} <= set(instance.get_dynamic_partitions(domain_partitions.name))

    assert cli.main(["backfill", "--domains", "code,nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown domain(s) nosuch" in err and "known: " in err and "web_qa" in err
    assert len(instance.get_backfills()) == 1
