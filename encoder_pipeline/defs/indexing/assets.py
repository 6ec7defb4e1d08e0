"""embedding_index: the corpus embedded by the best rung (chosen on the dev slice, never the eval
set) in an int8 scalar-quantized FAISS index, bound to that encoder's revision."""

import json
import time

import dagster as dg

from encoder_pipeline.defs.shared import (
    corpus_texts,
    domain_spec,
    embeddings_cache,
    publish,
    read_corpus_units,
)
from encoder_pipeline.defs.training.assets import (
    RUNGS,
    ladder_encoders,
    read_training_result,
    rung_model_path,
)
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib import encoders
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.index import build_index, save_index
from encoder_pipeline.resources import ArtifactStoreResource, PipelineSettings

GROUP = "serving"
INDEX_KIND = "sq8"
CHOICE_FILE = "choice.json"


def best_rung(store: ArtifactStore, domain: str) -> tuple[str, dict[str, float]]:
    """The rung with the highest dev nDCG@10; on a tie the rung with more data decisions."""
    scores = {r: read_training_result(store, domain, r)["dev_ndcg_at_10"] for r in RUNGS}
    order = sorted(RUNGS, key=lambda r: (scores[r], RUNGS.index(r)), reverse=True)
    return order[0], scores


def read_index_choice(store: ArtifactStore, domain: str) -> dict:
    return json.loads((store.latest(domain, "embedding_index") / CHOICE_FILE).read_text())


@dg.asset(
    partitions_def=domain_partitions,
    group_name=GROUP,
    kinds={"faiss"},
    owners=["team:retrieval"],
    deps=ladder_encoders,
)
def embedding_index(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
                    settings: PipelineSettings) -> dg.MaterializeResult:
    """FAISS int8 scalar-quantizer index of the whole corpus, embedded by the ladder rung with the
    best dev nDCG@10; refuses to be queried with any other encoder revision."""
    spec = domain_spec(context)
    store = artifacts.store()
    rung, dev_scores = best_rung(store, spec.name)
    model_path = str(rung_model_path(store, spec.name, rung))
    revision = encoders.model_fingerprint(model_path)
    units = read_corpus_units(store, spec.name)
    vectors = encoders.cached_embeddings(model_path, corpus_texts(units),
                                         embeddings_cache(store, spec.name),
                                         bf16=settings.bf16_inference)
    started = time.perf_counter()
    index = build_index(vectors, INDEX_KIND)
    build_seconds = time.perf_counter() - started
    with publish(context, artifacts, settings, {"kind": INDEX_KIND, "rung": rung},
                 ["clean_corpus", *RUNGS]) as staging:
        size = save_index(staging, index, list(units["doc_id"]), list(units["parent_id"]),
                          list(units["title"]), revision, INDEX_KIND, build_seconds)
        (staging / CHOICE_FILE).write_text(json.dumps(
            {"rung": rung, "model_path": model_path, "revision": revision, "dev_ndcg_at_10": dev_scores}))
    return dg.MaterializeResult(metadata={
        "rung": rung,
        "encoder_revision": revision,
        "vectors": dg.MetadataValue.int(index.ntotal),
        "dim": dg.MetadataValue.int(index.d),
        "index_mb": dg.MetadataValue.float(size / 1e6),
        "build_seconds": dg.MetadataValue.float(build_seconds),
        **{f"dev_ndcg_at_10/{r}": dg.MetadataValue.float(s) for r, s in dev_scores.items()},
    })
