"""From judgments to the verdict: five queries judged over the session's tiny `code` build (a copy of
it), then eval_set and eval_report materialized again. The report evaluates on the five human-judged
queries and says so, shows each figure's evidence, and flags the rungs trained before the judged
documents were held out."""

import json
import shutil

import dagster as dg
import pytest

from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.judging import JudgingSession, Pooler, bm25_system, eval_queries, point_spec_at
from encoder_pipeline.lib.layout import read_corpus_units, read_report
from encoder_pipeline.resources import (
    PUBLISHED,
    ArtifactStoreResource,
    LLMResource,
    PipelineSettings,
    published_artifacts,
)
from encoder_pipeline_tests.conftest import graph_assets, tiny_code_spec

pytestmark = pytest.mark.slow
JUDGED_QUERIES = 5


def test_five_judged_queries_carry_the_report_and_its_verdict(tiny_code_run, tmp_path, monkeypatch):
    _, built = tiny_code_run
    store = ArtifactStore(tmp_path / "artifacts")
    shutil.copytree(built.root / "code", store.root / "code", ignore=shutil.ignore_patterns("_checkpoints"))
    domains = tmp_path / "domains"
    domains.mkdir()
    spec_file = domains / "code.toml"
    spec_file.write_text(tiny_code_spec())  # cut as the session built it
    monkeypatch.setenv("ENCODER_PIPELINE_DOMAINS", str(domains))
    settings = PipelineSettings(profile="tiny")
    # Pooled by BM25 alone (the page's pooling of every system is test_judge_page's): the rungs'
    # corpus embeddings would cost this test a minute.
    units = read_corpus_units(store, "code")
    folder = store.domain_dir("code") / "judged"
    session = JudgingSession(folder, eval_queries(store, "code"), Pooler([bm25_system(units)], depth=3), units,
                             target=JUDGED_QUERIES, on_first_judgment=lambda: point_spec_at(spec_file, folder))
    relevant = {}
    for position in range(JUDGED_QUERIES):
        state = session.state(position)
        first, *others = state["candidates"]
        session.judge(state["query"]["id"], first["doc_id"], 1)  # a person's call, made here by rank
        relevant[state["query"]["id"]] = first["doc_id"]
        for candidate in others:
            session.judge(state["query"]["id"], candidate["doc_id"], 0)
    assert f'path = "{session.folder}"' in spec_file.read_text()  # the spec points at the judgments

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, ["code"])
    result = dg.materialize(graph_assets(), selection=["eval_set", "eval_report"],
                            instance=instance, partition_key="code", raise_on_error=False,
                            resources={PUBLISHED: published_artifacts,
                                       "artifacts": ArtifactStoreResource(root=str(store.root)),
                                       "settings": settings, "llm": LLMResource()})
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        "eval_set", "eval_report"}
    # the judged set in the UI: eval_set's metadata counts what the log holds
    [eval_set] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "eval_set"]
    shown = eval_set.materialization.metadata
    assert shown["judged_set_queries"].value == JUDGED_QUERIES
    assert shown["judged_set_relevant"].value == JUDGED_QUERIES and shown["judged_set_judgments"].value > JUDGED_QUERIES
    report = read_report(store, "code")
    assert report["human_judged"] and report["eval_queries"] == JUDGED_QUERIES
    assert report["verdict"].endswith(f"Evidence: human-judged, {JUDGED_QUERIES} queries.")
    evidence = report["evidence_by_system"]
    assert all(row["queries"] == JUDGED_QUERIES for row in evidence.values())
    # the pool was BM25's top-3 over the whole corpus, judged in full
    assert evidence["bm25@corpus"]["judged@10"] > 0
    assert all(row["ndcg@10_low"] <= report["systems"][name]["ndcg@10"] <= row["ndcg@10_high"]
               for name, row in evidence.items())
    # the rungs were trained before these documents were held out: flagged until retrained
    held_out = set(json.loads((store.latest("code", "eval_set") / "eval_set.json").read_text())["held_out_doc_ids"])
    assert set(relevant.values()) <= held_out
    assert set(report["stale_rungs"]) == {"encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"}
    page = (store.latest("code", "eval_report") / "report.md").read_text()
    assert "**Stale:** encoder_heuristic" in page and f"human-judged, {JUDGED_QUERIES} queries" in page
