"""The other three built-in partitions materialize end to end at small scale on their real sample
corpora (../shared/corpora): BEIR with a judged set (web_qa, biomedical) and without (legal). The
`code` partition's run is test_assets.py."""

import json

import dagster as dg
import pytest

from encoder_pipeline.definitions import defs
from encoder_pipeline.domains import domain_partitions, load_domain
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.encoders import DEFAULT_BASE_MODEL
from encoder_pipeline.resources import ArtifactStoreResource, LLMResource, PipelineSettings
from encoder_pipeline_tests.conftest import requires_shared_corpora

pytestmark = [requires_shared_corpora, pytest.mark.slow]  # ~95 s each on 2 cores


@pytest.mark.parametrize("domain", ["web_qa", "biomedical", "legal"])
def test_builtin_domain_materializes_end_to_end(domain, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(domain_partitions.name, [domain])
    assets = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]
    result = dg.materialize(assets, instance=instance, partition_key=domain, resources={
        "artifacts": ArtifactStoreResource(root=str(tmp_path)),
        # The base model mines in every domain here, biomedical's spec teacher (mpnet, ~10x slower to
        # encode) included: which teacher mines is test_domains' concern; the teacher's scores are
        # still distilled where the spec asks (biomedical).
        "settings": PipelineSettings(profile="tiny", teacher_model=DEFAULT_BASE_MODEL),
        "llm": LLMResource(),
    }, raise_on_error=False)
    # every asset materializes; serving_index only when the blocking promotion check passed (a
    # trained encoder worse than off-the-shelf at this tiny scale is a legitimate "do not promote")
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    graph = {a.key.to_user_string() for a in assets}
    assert materialized >= graph - {"serving_index"}
    promotion = next(c for c in result.get_asset_check_evaluations() if c.check_name == "safe_to_promote")
    assert ("serving_index" in materialized) == promotion.passed
    store = ArtifactStore(tmp_path)
    spec = load_domain(domain)
    report = json.loads((store.latest(domain, "eval_report") / "report.json").read_text())
    # the spec's columns are used, not just stored: the report's header and the human-judged flag
    assert report["unit"] == spec.unit.name and report["query_form"] == spec.queries.form
    assert report["human_judged"] is (spec.judged is not None)
    for system in ("bm25", "off_the_shelf", "encoder_heuristic", "encoder_hard_negatives"):
        assert 0.0 <= report["systems"][system]["ndcg@10"] <= 1.0
    rung = json.loads((store.latest(domain, "encoder_hard_negatives") / "training.json").read_text())
    assert ("KL(teacher scores)" in rung["loss"]) is bool(spec.training.distill_weight)
    # a real retrieval signal on real data: the off-the-shelf encoder beats chance by far
    assert report["systems"]["off_the_shelf"]["recall@100"] > 0.3
    leakage = [c for c in result.get_asset_check_evaluations() if c.check_name == "no_eval_leakage"]
    assert leakage and all(c.passed for c in leakage)
    prompts = (store.latest(domain, "synthetic_queries") / "generation.json").read_text()
    assert json.loads(prompts)["prompts"] > 0
