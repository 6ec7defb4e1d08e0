"""The other three built-in partitions build at small scale on their real sample corpora
(../shared/corpora): web_qa (BEIR, a judged set) and legal (no judged set) end to end; biomedical (BEIR,
a judged set, like web_qa) its training data, the stages its spec shapes (a domain differs by its
spec, and nothing below mined_negatives reads more of it than web_qa's run covers). The `code`
partition's run is test_assets.py.

The served index covers the whole corpus, so each corpus is cut to every judged document plus
OTHER_DOCUMENTS others (gene_ontology's 43,558 terms would take minutes to embed twice)."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions, load_domain
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL, resolve_model_path
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings, published_artifacts
from encoder_pipeline_tests.conftest import requires_shared_corpora, shared_corpus

pytestmark = [requires_shared_corpora, pytest.mark.slow]


OTHER_DOCUMENTS = 300  # more than the tiny profile samples (250), so `legal` (no judged set) has units outside it


TRAINING_DATA_STAGES = ["clean_corpus", "eval_set", "heuristic_pairs", "synthetic_queries", "mined_negatives"]


def _cut_corpus(domain: str, root: Path) -> None:
    """The domain's BEIR folder under `root` (its spec path), with every judged document and a
    sample of the others."""
    relative = load_domain(domain).corpus.path
    source, target = shared_corpus(relative), root / relative
    target.mkdir(parents=True)
    corpus = pd.read_json(source / "corpus.jsonl", lines=True, dtype={"_id": str})
    judged = set()
    if (source / "qrels").is_dir():
        qrels = pd.read_csv(source / "qrels" / "dev.tsv", sep="\t", dtype=str)
        judged = set(qrels["corpus-id"])
        (target / "qrels").mkdir()
        (target / "qrels" / "dev.tsv").write_text((source / "qrels" / "dev.tsv").read_text())
        (target / "queries.jsonl").write_text((source / "queries.jsonl").read_text())
    others = corpus[~corpus["_id"].isin(judged)].sample(OTHER_DOCUMENTS, random_state=0)
    pd.concat([corpus[corpus["_id"].isin(judged)], others]).to_json(
        target / "corpus.jsonl", orient="records", lines=True, force_ascii=False)


@pytest.fixture(scope="session")  # a copy of 90 MB: each worker makes its own, the tests spread
def copied_teacher(tmp_path_factory) -> str:
    """The base model's weights in a folder of their own: a teacher that is not the base model (so the
    report adds its row) at the base model's speed; its figures must then equal the base model's."""
    folder = tmp_path_factory.mktemp("teacher") / "minilm-copy"
    shutil.copytree(resolve_model_path(DEFAULT_BASE_MODEL), folder)
    return str(folder)


def _materialize(domain: str, tmp_path: Path, monkeypatch, llm, teacher_model: str,
                 only: list[str] | None = None) -> tuple[dg.ExecuteInProcessResult, list[dg.AssetsDefinition]]:
    _cut_corpus(domain, tmp_path / "corpora")
    monkeypatch.setenv("ENCODER_PIPELINE_CORPUS_ROOT", str(tmp_path / "corpora"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [domain])
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)
              and a.group_names_by_key[a.key] != "automation" and (only is None or a.key.to_user_string() in only)]
    result = dg.materialize(assets, instance=instance, partition_key=domain, resources={
        PUBLISHED: published_artifacts, "artifacts": ArtifactStoreResource(root=str(tmp_path / "artifacts")),
        "settings": PipelineSettings(profile="tiny", teacher_model=teacher_model),
        "llm": llm,  # the graph is under test here, not the LLM's queries
    }, raise_on_error=False)
    return result, assets


def _leakage_audits_pass(result: dg.ExecuteInProcessResult) -> None:
    leakage = [c for c in result.get_asset_check_evaluations() if c.check_name == "no_eval_leakage"]
    assert leakage and all(c.passed for c in leakage)


def test_biomedical_builds_its_training_data_and_passes_the_leakage_audit(tmp_path, monkeypatch, stand_in_llm):
    result, _ = _materialize("biomedical", tmp_path, monkeypatch, stand_in_llm, DEFAULT_BASE_MODEL,
                             only=TRAINING_DATA_STAGES)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert result.success and materialized == set(TRAINING_DATA_STAGES)
    _leakage_audits_pass(result)
    store, spec = ArtifactStore(tmp_path / "artifacts"), load_domain("biomedical")
    # the spec's judged set is what it evaluates on, and its extractor is what made the pairs
    judged = pd.read_json(tmp_path / "corpora" / spec.corpus.path / "queries.jsonl", lines=True, dtype={"_id": str})
    split = json.loads((store.latest("biomedical", "eval_set") / "eval_set.json").read_text())
    assert split["eval"]["queries"] and set(split["eval"]["queries"].values()) <= set(judged["text"])
    pairs = pd.read_parquet(store.latest("biomedical", "heuristic_pairs") / "pairs.parquet")
    assert pairs["extractor"].isin(spec.queries.pair_extractor).any()
    generation = json.loads((store.latest("biomedical", "synthetic_queries") / "generation.json").read_text())
    assert generation["prompts"] > 0
    mined = pd.read_parquet(store.latest("biomedical", "mined_negatives") / "mined.parquet")
    assert len(mined) and mined["negative_1"].notna().all()


@pytest.mark.parametrize("domain", ["web_qa", "legal"])
def test_builtin_domain_materializes_end_to_end(domain, tmp_path, monkeypatch, stand_in_llm, copied_teacher):
    # On web_qa a copy of the base model teaches (the default teacher, mpnet, is ~8x slower to
    # encode), so the report adds its row; on legal the base model teaches (suite time). Which
    # teacher is chosen is test_domains' concern; that it mines, teaches and is reported is this
    # test's.
    teacher_model = copied_teacher if domain == "web_qa" else DEFAULT_BASE_MODEL
    result, assets = _materialize(domain, tmp_path, monkeypatch, stand_in_llm, teacher_model)
    # every asset materializes; serving_index only when the blocking promotion check passed (a
    # trained encoder worse than off-the-shelf at this tiny scale is a legitimate "do not promote")
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    graph = {a.key.to_user_string() for a in assets}
    assert materialized >= graph - {"serving_index"}
    promotion = next(c for c in result.get_asset_check_evaluations() if c.check_name == "safe_to_promote")
    assert ("serving_index" in materialized) == promotion.passed
    store = ArtifactStore(tmp_path / "artifacts")
    spec = load_domain(domain)
    report = json.loads((store.latest(domain, "eval_report") / "report.json").read_text())
    # the spec's columns are used, not just stored: the report's header and the human-judged flag
    assert report["unit"] == spec.unit.name and report["query_form"] == spec.queries.form
    assert report["human_judged"] is (spec.judged is not None)
    for system in ("bm25", "off_the_shelf", "encoder_heuristic", "encoder_hard_negatives"):
        assert 0.0 <= report["systems"][system]["ndcg@10"] <= 1.0
    rung = json.loads((store.latest(domain, "encoder_hard_negatives") / "training.json").read_text())
    # the one recipe: every rung distils the teacher, which mined the negatives and is reported
    assert "KL(teacher, in-batch)" in rung["loss"]
    assert rung["teacher"] == teacher_model and not rung["teacher_fallback"]
    assert store.manifest(domain, "mined_negatives")["config"]["teacher"] == teacher_model
    teacher = report["teacher"]
    page = (store.latest(domain, "eval_report") / "report.md").read_text()
    if teacher_model == DEFAULT_BASE_MODEL:  # no row of its own: the off-the-shelf row is the teacher's
        assert teacher == {"model": DEFAULT_BASE_MODEL, "fallback": ""} and "The base model taught" in page
    else:
        assert teacher["model"] == copied_teacher and teacher["haystack"] == "sample"
        assert teacher["ndcg@10"] == pytest.approx(report["systems"]["off_the_shelf"]["ndcg@10"], abs=0.01)
        assert teacher["p95_ms"] > 0 and teacher["usd_per_1k_queries"] > 0
        assert "The teacher off the shelf" in page
    # a real retrieval signal on real data: the off-the-shelf encoder beats chance by far
    assert report["systems"]["off_the_shelf"]["recall@100"] > 0.3
    _leakage_audits_pass(result)
    prompts = (store.latest(domain, "synthetic_queries") / "generation.json").read_text()
    assert json.loads(prompts)["prompts"] > 0
    # trained on the profile's sample, indexed and judged on every unit of the corpus
    units = pd.read_parquet(store.latest(domain, "clean_corpus") / "corpus.parquet")
    assert units["in_sample"].sum() < len(units)
    choice = json.loads((store.latest(domain, "embedding_index") / "choice.json").read_text())
    assert choice["vectors"] == choice["corpus_units"] == len(units) == report["haystacks"]["corpus"]["units"]
    if "index_mb" in teacher:
        assert teacher["index_mb"] == pytest.approx(len(units) * 384 * 4 / 1e6)  # every unit, at its own width
