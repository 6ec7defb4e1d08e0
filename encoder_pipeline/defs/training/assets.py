"""The ablation ladder: three sibling checkpoints that differ only in their training data, so the
report can attribute the lift to each data decision (heuristic -> + synthetic -> + hard negatives)."""

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial

import dagster as dg
import pandas as pd

from encoder_pipeline.defs.shared import ProgressLog, domain_spec, embeddings_cache, publish
from encoder_pipeline.domains import domain_partitions
from encoder_pipeline.lib.artifacts import ArtifactStore
from encoder_pipeline.lib.encoders import model_fingerprint
from encoder_pipeline.lib.layout import (
    HEURISTIC_PAIRS,
    MINED_NEGATIVES,
    MODEL_DIR,
    SYNTHETIC_QUERIES,
    TRAINING_FILE,
    Artifact,
    MinedArtifact,
    PairsArtifact,
    SyntheticArtifact,
    corpus_texts,
    latest,
    read_eval_split,
    read_sample_units,
    rung_model_path,
)
from encoder_pipeline.lib.layout import RUNGS as LADDER_RUNGS
from encoder_pipeline.lib.teacher import TeacherEmbedder
from encoder_pipeline.lib.train import (
    DevSet,
    TrainingConfig,
    TrainingDataError,
    lexical_distractors,
    train_encoder,
)
from encoder_pipeline.lib.vector_cache import cached_embeddings
from encoder_pipeline.resources import PUBLISHED, ArtifactStoreResource, PipelineSettings

GROUP = "training"

RowsFn = Callable[..., pd.DataFrame]  # the rung's upstream handles, by parameter name -> its training rows


def _heuristic(pairs: PairsArtifact) -> pd.DataFrame:
    return pairs.rows()


def _with_synthetic(pairs: PairsArtifact, synthetic: SyntheticArtifact) -> pd.DataFrame:
    return pd.concat([pairs.rows(), synthetic.rows()], ignore_index=True)


def _mined(mined: MinedArtifact) -> pd.DataFrame:
    return mined.rows()


# (rung, what it trains on, its upstream assets by parameter name, its rows from them)
LADDER: list[tuple[str, str, dict[str, str], RowsFn]] = [
    ("encoder_heuristic", "structural pairs only", {"pairs": HEURISTIC_PAIRS}, _heuristic),
    ("encoder_synthetic", "structural + synthetic pairs",
     {"pairs": HEURISTIC_PAIRS, "synthetic": SYNTHETIC_QUERIES}, _with_synthetic),
    ("encoder_hard_negatives", "structural + synthetic pairs with mined hard negatives",
     {"mined": MINED_NEGATIVES}, _mined),
]
RUNGS = [name for name, *_ in LADDER]
assert tuple(RUNGS) == LADDER_RUNGS, "lib.layout names the same rungs, in the same order"


def training_rows(store: ArtifactStore, domain: str, rung: str) -> pd.DataFrame:
    """`rung`'s training rows from the latest published training data (what benchmarks retrain on)."""
    _, _, inputs, rows_fn = next(entry for entry in LADDER if entry[0] == rung)
    return rows_fn(**{param: latest(store, domain, asset) for param, asset in inputs.items()})


def dev_set(store: ArtifactStore, domain: str, seed: int, distractors: int) -> DevSet | None:
    """eval_set's dev slice against the units of its relevant documents plus `distractors` from the
    training sample outside every held-out document, the dev queries' lexical neighbours first
    (`lexical_distractors`; None: the corpus gave no dev slice). Each rung encodes this corpus once
    per epoch (the best epoch's choice) and once per merge share between 0 and 1; the base model's
    embeddings of it come from the embedding cache."""
    split = read_eval_split(store, domain)
    if not split.dev.queries:
        return None
    units = read_sample_units(store, domain)
    units_of = units.groupby("parent_id")["doc_id"].agg(set)
    relevant = {qid: set().union(*(units_of.get(parent, set()) for parent in rels))
                for qid, rels in split.dev.qrels.items()}
    positives = set().union(*relevant.values())
    others = units[~units["parent_id"].isin(split.held_out_doc_ids)]
    others_texts = corpus_texts(others)  # each unit's text built once: BM25 and the dev corpus share it
    picked = lexical_distractors(list(split.dev.queries.values()), others_texts, distractors, seed)
    answers = units[units["doc_id"].isin(positives)]
    corpus = {**dict(zip(answers["doc_id"], corpus_texts(answers), strict=True)),
              **{others["doc_id"].iloc[i]: others_texts[i] for i in picked}}
    return DevSet(split.dev.queries, corpus, relevant)


def build_rung(name: str, data_label: str, inputs: dict[str, str], rows_fn: RowsFn) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        partitions_def=domain_partitions,
        group_name=GROUP,
        kinds={"pytorch", "sentence_transformers"},
        owners=["team:retrieval"],
        ins={param: dg.AssetIn(asset, input_manager_key=PUBLISHED) for param, asset in inputs.items()},
        automation_condition=dg.AutomationCondition.eager(),
        description=f"Encoder fine-tuned from the base model on {data_label} "
                    "(MultipleNegativesRankingLoss + GOR + the teacher's scores of each query's "
                    "in-batch candidates distilled (KL), under Matryoshka, GradCache when the batch "
                    "exceeds the mini-batch, no-duplicates batches); the "
                    "best epoch on the dev slice is kept, then merged with the base model at the "
                    "share of fine-tuned weights the dev slice prefers (the base model itself when "
                    "no merge beats it beyond noise); a crashed run resumes from its last checkpoint.",
    )
    def rung(context: dg.AssetExecutionContext, artifacts: ArtifactStoreResource,
             settings: PipelineSettings, **upstream: Artifact) -> dg.MaterializeResult:
        spec = domain_spec(context)
        store = artifacts.store()
        sizes = settings.sizes()
        rows = rows_fn(**upstream)
        # The batch grows with the pairs (auto_batch_size), from the profile's batch as its floor.
        teacher = settings.teacher(spec.training.teacher_model)
        if teacher.fallback:
            context.log.warning(teacher.fallback)
        distill = spec.training.distill_weight
        config = TrainingConfig(epochs=sizes.epochs, min_batch_size=sizes.batch_size, seed=settings.seed,
                                bf16=settings.bf16_training,
                                fine_tuned_weight=spec.training.fine_tuned_weight, teacher=teacher.revision,
                                **({} if distill is None else {"distill_weight": distill}),
                                **({} if sizes.merge_weights is None else {"merge_weights": sizes.merge_weights}))
        embedder = TeacherEmbedder(settings.encoder(spec.trust_remote_code, teacher.model),
                                   embeddings_cache(store, spec.name),
                                   progress=ProgressLog(context, f"embedding {name}'s rows with the teacher"))
        dev = dev_set(store, spec.name, settings.seed, sizes.dev_distractors)
        # The base model's dev embeddings through the domain's cache (the dev corpus is units the
        # training-data stages mostly encoded with it already), as training encodes the dev slice.
        base = replace(settings.encoder(spec.trust_remote_code), bf16=config.bf16,
                       max_seq_length=config.max_seq_length)
        base_dev = (dev.embedded_by(partial(cached_embeddings, base, cache_dir=embeddings_cache(store, spec.name)))
                    if dev else None)
        # heuristic_pairs always: the chain to the eval split it was held out from (layout.held_out_before)
        with publish(context, artifacts, settings,
                     {"base_model": settings.base_model, "rows": data_label, **asdict(config),
                      **teacher.describe()},
                     [*upstream.values(), HEURISTIC_PAIRS]) as staging:
            try:
                # Checkpoints live outside the staging folder so that a re-run after a crash resumes.
                result = train_encoder(settings.base_model, rows, staging, config, dev,
                                       checkpoint_dir=store.domain_dir(spec.name) / "_checkpoints" / name,
                                       trust_remote_code=spec.trust_remote_code,
                                       progress=ProgressLog(context, f"training {name} (steps)"),
                                       teacher=embedder, base_dev_embeddings=base_dev)
            except TrainingDataError as error:
                raise dg.Failure(f"domain '{spec.name}', {name}: {error}") from error
            revision = model_fingerprint(str(staging / MODEL_DIR))
            (staging / TRAINING_FILE).write_text(json.dumps({**asdict(result), "revision": revision,
                                                             **teacher.describe()}))
        return dg.MaterializeResult(metadata={
            "training_rows": dg.MetadataValue.int(result.training_rows),
            "batch_size": dg.MetadataValue.int(result.batch_size),
            "loss": result.loss,
            "teacher": teacher.model,
            **({"teacher_fallback": teacher.fallback} if teacher.fallback else {}),
            "fine_tuned_weight": dg.MetadataValue.float(result.fine_tuned_weight),  # 1.0: no merge, 0.0: the base
            "merge_rule": result.merge.get("rule", ""),
            **({"merge_dev_ndcg_at_10": dg.MetadataValue.md(pd.DataFrame(
                list(result.merge["dev_ndcg_at_10"].items()), columns=["fine-tuned share", "dev nDCG@10"])
                .to_markdown(index=False))} if result.merge.get("dev_ndcg_at_10") else {}),
            "steps": dg.MetadataValue.int(result.steps),
            "train_seconds": dg.MetadataValue.float(result.train_seconds),
            "pairs_per_second": dg.MetadataValue.float(result.pairs_per_second),
            "peak_memory_mb": dg.MetadataValue.float(result.peak_memory_mb),
            "final_loss": dg.MetadataValue.float(result.final_loss),
            "dev_ndcg_at_10": dg.MetadataValue.float(result.dev_ndcg_at_10),
            "truncated_dim": dg.MetadataValue.int(result.matryoshka_dim),
            "dev_ndcg_at_10_truncated": dg.MetadataValue.float(result.dev_ndcg_at_10_truncated),
            "best_step": dg.MetadataValue.int(result.best_step),
            "resumed_from_step": dg.MetadataValue.int(result.resumed_from_step),
            "dev_by_epoch": dg.MetadataValue.md(
                pd.DataFrame(result.dev_history, columns=["step", "ndcg@10", "ndcg@10_truncated"])
                .to_markdown(index=False)),
            "revision": revision,
            "model_path": dg.MetadataValue.path(str(rung_model_path(store, spec.name, name))),
        })

    return rung


ladder_encoders = [build_rung(*rung) for rung in LADDER]
