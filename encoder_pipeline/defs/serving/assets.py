"""serving_index: the version users search. A copy of the candidate `embedding_index` folder (index
files, ids, choice.json) plus the report's verdict, published only once the report says it is safe,
or when an operator forces it (`encoder-pipeline promote --domain D --force`), which it records."""

import json
import shutil

import dagster as dg
from pydantic import Field

from encoder_pipeline.defs.shared import publish
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import start_reading
from encoder_pipeline.lib.index import served_bytes
from encoder_pipeline.lib.layout import (
    EMBEDDING_INDEX,
    EVAL_REPORT,
    PROMOTION_FILE,
    SERVING_INDEX,
    ReportArtifact,
    latest,
)
from encoder_pipeline.lib.promotion import garbage_collect
from encoder_pipeline.lib.search import NothingServed, served_index
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings

GROUP = "serving"
NOT_COPIED = {"manifest.json"}  # the new version writes its own


class PromotionConfig(dg.Config):
    """How this promotion treats the report's verdict."""

    force: bool = Field(
        False, description="Promote the latest candidate even though its eval_report refused it "
        "(safe_to_promote failed). Recorded as `forced` with the refusal's reason in promotion.json "
        "and in this materialization's metadata. `encoder-pipeline promote --domain D --force` sets it.")


@dg.asset(
    name=SERVING_INDEX,
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"faiss"},
    owners=["team:retrieval"],
    ins={"judged": dg.AssetIn(EVAL_REPORT, input_manager_key=PUBLISHED)},
    automation_condition=(dg.AutomationCondition.eager()
                          & dg.AutomationCondition.all_deps_blocking_checks_passed()
                          ).with_label("eager, once the report's blocking checks pass"),
)
def serving_index(context: dg.AssetExecutionContext, config: PromotionConfig, judged: ReportArtifact,
                  artifacts: ArtifactStoreResource, settings: PipelineSettings) -> dg.MaterializeResult:
    """Promote the candidate index: copy the `embedding_index` version the latest report judged
    (same layout: index files, ids.json.gz, index.json, choice.json) and record the verdict in
    promotion.json. In a run with `eval_report`, Dagster skips this asset when the blocking
    `safe_to_promote` check fails; materialized on its own, it refuses a report that is not safe to
    promote (unless `force`, which promotion.json and the metadata then record as `forced`) or that
    judged another `embedding_index` version. The previous version stays on disk:
    `encoder-pipeline rollback` serves it again. After a promotion, artifacts that neither the last
    `settings.keep_promoted_versions` promotions nor any asset's current version needs are deleted
    (`lib.promotion.garbage_collect`)."""
    domain = context.partition_key
    start_reading()  # its own ledger: it loads no spec (defs.shared.domain_spec starts the others')
    store = artifacts.store()
    report = judged.report()
    candidate = latest(store, domain, EMBEDDING_INDEX)
    candidate_version = candidate.version
    judged_version = judged.manifest()["upstream"][EMBEDDING_INDEX]
    if judged_version != candidate_version:
        raise dg.Failure(f"the latest eval_report judged embedding_index {judged_version}, not the "
                         f"latest {candidate_version}: materialize eval_report first")
    refused = not report["promotion"]["safe"]
    if refused and not config.force:
        raise dg.Failure(f"eval_report says not to promote: {report['promotion']['reason']} "
                         f"(`encoder-pipeline promote --domain {domain} --force` serves it anyway)")
    forced = refused  # only a refusal is overridden; a safe candidate is promoted as usual
    if forced:
        context.log.warning(f"forced promotion of embedding_index {candidate_version} over its "
                            f"report's refusal: {report['promotion']['reason']}")

    source, choice = candidate.path, candidate.choice()
    try:
        previous = served_index(domain, store)
        previous_info = {"version": previous.version, "rung": previous.choice["rung"],
                         "revision": previous.revision}
    except NothingServed:
        previous_info = None
    promotion = {
        "embedding_index_version": candidate_version,
        "eval_report_version": judged.version,
        "rung": choice["rung"], "revision": choice["revision"],
        "dims": choice.get("dims"), "precision": choice.get("precision"),
        "verdict": report["verdict"], "reason": report["promotion"]["reason"], "forced": forced,
        "ndcg@10": report["after"]["ndcg@10"], "p95_ms": report["after"]["p95_ms"],
        "index_mb": report["after"]["index_mb"], "previous": previous_info,
    }
    fingerprint = candidate.manifest()["corpus_fingerprint"]
    with publish(context, artifacts, settings, {EMBEDDING_INDEX: candidate_version, "forced": forced},
                 [candidate, judged], corpus_fingerprint=fingerprint) as staging:
        for item in source.iterdir():
            if item.name in NOT_COPIED:
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
        (staging / PROMOTION_FILE).write_text(json.dumps(promotion, indent=2))
    published = store.latest(domain, SERVING_INDEX)
    collected = garbage_collect(store, domain, settings.keep_promoted_versions)
    context.log.info(f"garbage collection deleted {len(collected.deleted)} versions: "
                     f"{', '.join(f'{a}/{v}' for a, v in collected.deleted) or 'none'}")
    return dg.MaterializeResult(metadata={
        "promoted_revision": choice["revision"],
        "previous_revision": previous_info["revision"] if previous_info else "none",
        "promoted_version": candidate_version,
        "previous_version": previous_info["version"] if previous_info else "none",
        "rung": choice["rung"],
        "verdict": report["verdict"],
        "forced": dg.MetadataValue.bool(forced),
        "reason": report["promotion"]["reason"],
        "ndcg_at_10": dg.MetadataValue.float(report["after"]["ndcg@10"]),
        "index_mb": dg.MetadataValue.float(served_bytes(published) / 1e6),
        **({"corpus_units": dg.MetadataValue.int(choice["corpus_units"]),
            "coverage": f"{choice['vectors']:,} of the corpus's {choice['corpus_units']:,} units "
                        f"({choice['corpus_documents']:,} documents)"} if "corpus_units" in choice else {}),
        "path": dg.MetadataValue.path(str(published)),
        "gc_deleted_versions": dg.MetadataValue.int(len(collected.deleted)),
        "gc_freed_mb": dg.MetadataValue.float(collected.freed_bytes / 1e6),
    })
