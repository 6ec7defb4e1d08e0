"""Contrastive fine-tuning of a sentence-transformers encoder on (query, positive[, negatives]) rows.

Columns in: `query`, `positive`, then optional `negative_1..N`. Out: a sentence-transformers folder
at `output_dir/model` and a `TrainingResult`.

Loss (see `lib/losses.py`): MultipleNegativesRankingLoss (InfoNCE over in-batch plus mined
negatives; van den Oord et al. 2018, Henderson et al. 2017) with a Global Orthogonal Regularization
term (Zhang et al. 2017, as in EmbeddingGemma), under MatryoshkaLoss (Kusupati et al. 2022), and with
GradCache (Gao et al. 2021) once the batch exceeds `mini_batch_size`, so the batch is a setting
rather than a memory limit. Batches come from the no-duplicates sampler, since a repeated text in a
batch would be a false in-batch negative.

After training, the dimensions are put in decreasing order of variance over the domain's documents
(an orthogonal rotation appended to the model, `order_dimensions_by_variance`): inner products at
full width are unchanged, and a Matryoshka-truncated prefix keeps the most informative directions.

The dev slice (carved from the training pairs, never the eval set) is scored at the end of every
epoch; the best epoch's checkpoint is kept. Checkpoints go to `checkpoint_dir`, a work folder that
outlives a crashed run: calling `train_encoder` again with the same inputs resumes from the last one.

Every GPU present is used: `train_encoder` starts one process per GPU (or is launched that way by
`torchrun --nproc_per_node N`), the trainer runs them as DDP, the effective batch is split over the N
processes, and the loss gathers every device's embeddings so each anchor still sees the whole
effective batch as negatives. Without a GPU it trains on the CPU (several CPU processes run gloo DDP).
bf16 mixed precision wherever the hardware computes bf16 natively (`mixed_bf16`: GPUs from Ampere,
CPUs with AVX512-BF16 or AMX; 1.55x the pairs per second of fp32 on this CPU), fp32 elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bm25s
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator
from sentence_transformers.sentence_transformer.modules import Dense, Normalize
from sentence_transformers.training_args import BatchSamplers
from torch import nn
from transformers import TrainerCallback

from encoder_pipeline.lib.artifacts import write_json_atomic
from encoder_pipeline.lib.encoders import (
    encode,
    load_encoder,
    model_fingerprint,
    native_bf16,
)
from encoder_pipeline.lib.index import truncate
from encoder_pipeline.lib.losses import contrastive_loss, default_matryoshka_dims, describe_loss
from encoder_pipeline.lib.metrics import bm25_retriever, dense_run, evaluate

MIN_TRAINING_PAIRS = 16
# The auto batch keeps at least this many optimizer steps per epoch. A probe on ~700 pairs: batch
# 128 lost to batch 32 because it cut the step count to a quarter.
MIN_STEPS_PER_EPOCH = 64
NEGATIVE_COLUMN = re.compile(r"^negative_\d+$")
DEV_METRIC = "dev_cosine_ndcg@10"
TEACHER_COLUMN = "teacher_embeddings"  # per row: the teacher's embeddings of its texts, flattened
Teacher = Callable[[list[str]], np.ndarray]  # texts -> the teacher's embeddings, one row per text
DevEmbeddings = tuple[np.ndarray, np.ndarray]  # a dev slice's query and corpus embeddings (`DevSet.embeddings`)
RUN_FILE = "run.json"
# Fine-tuned shares tried on the dev slice (LM-Cocktail / WiSE-FT); 0.0 is the base model itself.
MERGE_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
MERGE_P = 0.05  # a merge is kept over the base model only when it beats it on dev with p below this


class TrainingDataError(ValueError):
    """Too little data to train on."""


@dataclass(frozen=True)
class TrainingConfig:
    epochs: float = 1.0
    batch_size: int | None = None  # effective batch; None: auto_batch_size(pairs)
    min_batch_size: int = 32  # the auto batch's floor (small sets want small batches)
    max_batch_size: int = 1024  # the auto batch's ceiling
    mini_batch_size: int = 32  # texts per forward pass under GradCache: bounds activation memory
    gradcache: bool | None = None  # None: only when a device's batch exceeds mini_batch_size
    matryoshka_dims: tuple[int, ...] | None = None  # None: full, 1/2, 1/4, 1/8 of the model; (): off
    gor_weight: float = 0.1  # Global Orthogonal Regularization (second moment), 0 turns it off
    # Weight of distilling the teacher's scores of each query's in-batch candidates (when
    # `train_encoder` is given a teacher; `losses.distillation_term`); 0 turns it off. 0.25, not 1:
    # at 1 the KL pulled each rung toward the teacher's ranking where the pairs teach more than it
    # knows (web_qa served +0.016 at 1, +0.030 at 0.25 over three seeds; code level; docs/results.md).
    distill_weight: float = 0.25
    teacher: str = ""  # the teacher's revision: part of what a resumed checkpoint must match
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 128
    max_steps: int = -1  # > 0 overrides epochs
    bf16: bool = True  # mixed precision where the hardware computes bf16 natively (`mixed_bf16`)
    seed: int = 0
    checkpoint_every_s: float = 300.0  # mid-epoch checkpoint interval (epoch ends always save)
    # WiSE-FT: the kept weights are this share of the fine-tuned ones plus the rest of the base
    # model's (`interpolate_with_base`); 1.0 keeps the fine-tuned weights as they are. None: chosen
    # on the dev slice among `merge_weights` (`choose_merge`), 1.0 when there is no dev slice.
    fine_tuned_weight: float | None = None
    merge_weights: tuple[float, ...] = MERGE_WEIGHTS
    order_dimensions: bool = True  # append the variance-ordering rotation after training
    rotation_sample: int = 4000  # documents the rotation is estimated from

    def __post_init__(self) -> None:
        if self.fine_tuned_weight is not None:
            _check_fine_tuned_weight(self.fine_tuned_weight)  # before training, not after it


def _check_fine_tuned_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fine_tuned_weight must be within [0, 1], got {weight}")


def auto_batch_size(pairs: int, min_batch: int = 32, max_batch: int = 1024) -> int:
    """The largest power of two that still gives MIN_STEPS_PER_EPOCH steps, within [min, max].

    32 up to ~4k pairs, 64 at 4k, 256 at 16k, 1024 from 64k. Large batches (more in-batch
    negatives) help only when the step count survives them; GradCache keeps their memory flat.
    """
    fitting = 2 ** int(math.log2(max(1, pairs // MIN_STEPS_PER_EPOCH)))
    return int(min(max_batch, max(min_batch, fitting)))


def lexical_distractors(queries: Sequence[str], texts: Sequence[str], count: int, seed: int = 0) -> list[int]:
    """Positions of `count` of `texts` to score dev queries against: each query's BM25 neighbours,
    taken rank by rank across the queries, then a seeded random fill when they run out.

    A random sample of the training corpus rarely holds what a whole-corpus search confuses with the
    answer, so the base model scored 0.85-0.88 on such dev slices against 0.36-0.68 on the eval sets
    and no merge could show a gain there. Lexical neighbours are those confusers at the same size and
    cost, and BM25 favours neither the base model nor a fine-tuned one (dense neighbours would).
    """
    if count >= len(texts):
        return list(range(len(texts)))
    per_query = min(len(texts), math.ceil(count / max(1, len(queries))) * 2)
    rows, scores = bm25_retriever(texts).retrieve(
        bm25s.tokenize(list(queries), stopwords="en", show_progress=False),
        k=per_query, show_progress=False, n_threads=1)
    chosen: dict[int, None] = {}  # insertion-ordered set
    for rank in range(per_query):
        for query_rows, query_scores in zip(rows, scores, strict=True):
            if query_scores[rank] > 0:
                chosen.setdefault(int(query_rows[rank]))
            if len(chosen) == count:
                return list(chosen)
    rest = [i for i in range(len(texts)) if i not in chosen]
    return [*chosen, *np.random.default_rng(seed).choice(rest, count - len(chosen), replace=False).tolist()]


@dataclass
class DevSet:
    """A dev slice carved from training pairs: {qid: text}, {doc_id: text}, {qid: {doc_id}}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]

    def evaluator(self, truncated_dim: int, bf16: bool = True) -> _DevEvaluator:
        """What the trainer calls at each epoch end: full-width and `truncated_dim` nDCG@10 as
        `dev_cosine_ndcg@10` and `dev_cosine_dim{truncated_dim}_ndcg@10`, the embeddings kept by step."""
        return _DevEvaluator(self, truncated_dim, bf16)

    def ndcg_at_10(self, model) -> float:
        return float(np.mean(list(self.per_query_ndcg_at_10(model).values())))

    def embeddings(self, model, bf16: bool = True) -> DevEmbeddings:
        """The dev queries' and corpus's embeddings (normalized), in the order of `queries` and `corpus`."""
        return self.embedded_by(lambda texts: encode(model, texts, bf16=bf16))

    def embedded_by(self, embed: Callable[[list[str]], np.ndarray]) -> DevEmbeddings:
        """`embed(texts)` (normalized embeddings, one row per text) of the dev queries and corpus."""
        return embed(list(self.queries.values())), embed(list(self.corpus.values()))

    def scores(self, embeddings: DevEmbeddings, dims: int | None = None) -> dict[str, float]:
        """Each dev query's nDCG@10 (pytrec_eval) from `embeddings`, at full width or at the first
        `dims` dimensions (re-normalized, as a Matryoshka index serves them)."""
        queries, corpus = embeddings
        if dims:
            queries, corpus = truncate(queries, dims), truncate(corpus, dims)
        run = dense_run(queries, corpus, list(self.queries), list(self.corpus), 10)
        qrels = {q: dict.fromkeys(docs, 1) for q, docs in self.relevant.items()}
        return {q: row["ndcg@10"] for q, row in evaluate(run, qrels)[1].items()}

    def per_query_ndcg_at_10(self, model, bf16: bool = True) -> dict[str, float]:
        """Each dev query's nDCG@10 over this corpus: what a paired test needs."""
        return self.scores(self.embeddings(model, bf16))

    def fingerprint(self) -> str:
        blob = json.dumps([self.queries, self.corpus, {k: sorted(v) for k, v in self.relevant.items()}],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _DevEvaluator(SentenceEvaluator):
    """The dev slice scored at each epoch end as `choose_merge` scores a merge (per query, pytrec_eval),
    its embeddings kept by step: the merge search reads the kept checkpoint's (share 1.0) instead of
    encoding the dev slice again, one pass of ~1,100 texts per rung in a default build. Encodes in
    the precision `encoders.encode` uses (bf16 where the CPU has it)."""

    def __init__(self, dev: DevSet, truncated_dim: int, bf16: bool) -> None:
        super().__init__()
        self.dev, self.truncated_dim, self.bf16 = dev, truncated_dim, bf16
        self.primary_metric = DEV_METRIC
        self.embeddings_by_step: dict[int, DevEmbeddings] = {}

    def __call__(self, model, output_path: str | None = None, epoch: float = -1, steps: int = -1
                 ) -> dict[str, float]:
        self.embeddings_by_step[steps] = embeddings = self.dev.embeddings(model, self.bf16)
        return {DEV_METRIC: float(np.mean(list(self.dev.scores(embeddings).values()))),
                f"dev_cosine_dim{self.truncated_dim}_ndcg@10":
                    float(np.mean(list(self.dev.scores(embeddings, self.truncated_dim).values())))}


@dataclass
class TrainingResult:
    training_rows: int
    batch_size: int
    steps: int  # optimizer steps in total (including any before a resume)
    train_seconds: float  # wall time of this call's training, evaluation and checkpoints included
    pairs_per_second: float  # rows trained per second of training steps (evaluation and saving excluded)
    peak_memory_mb: float  # the process's peak RSS (ru_maxrss)
    final_loss: float
    dev_ndcg_at_10: float  # of the kept (best) checkpoint
    matryoshka_dim: int  # 1/4 of the model's dimension
    dev_ndcg_at_10_truncated: float  # the kept checkpoint at `matryoshka_dim` dimensions
    loss: str = ""
    best_step: int = 0
    resumed_from_step: int = 0  # 0: a fresh run
    world_size: int = 1  # training processes (DDP ranks; one per GPU)
    dev_history: list[dict] = field(default_factory=list)  # [{step, ndcg@10, ndcg@10 truncated}]
    fine_tuned_weight: float = 1.0  # the share of fine-tuned weights kept (0.0: the base model)
    merge: dict = field(default_factory=dict)  # how it was chosen: dev nDCG@10 per weight, p, rule
    # The saved model's nDCG@10 per dev query, and which dev slice (`DevSet.fingerprint`): the index
    # sweep's choice of rung reads them instead of encoding the dev slice with every rung again.
    dev_per_query: dict[str, float] = field(default_factory=dict)
    dev_fingerprint: str = ""


def train_encoder(base_model: str, rows: pd.DataFrame, output_dir: str | Path, config: TrainingConfig,
                  dev: DevSet | None = None, checkpoint_dir: str | Path | None = None,
                  callbacks: Sequence[TrainerCallback] = (), devices: int | None = None,
                  trust_remote_code: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  teacher: Teacher | None = None,
                  base_dev_embeddings: DevEmbeddings | None = None) -> TrainingResult:
    """Fine-tune `base_model` on `rows`, save a sentence-transformers folder to `output_dir/model`.

    `teacher(texts)` gives a teacher's embeddings of texts: every row then carries the teacher's
    embeddings of its texts, and the loss distils the teacher's scores of each query's in-batch
    candidates with `config.distill_weight` (set `config.teacher` to its revision).

    `checkpoint_dir` belongs to this run (default `output_dir/checkpoints`): if it holds checkpoints
    of the same inputs (model, rows, config, dev set), training resumes from the last one; it is
    deleted after success. Pass a folder outside any staging area for crash-resumable training.

    `base_dev_embeddings`: the base model's embeddings of `dev` (`DevSet.embedded_by` through an
    embedding cache), the merge search's share 0.0; by default the base model encodes the dev slice.

    `devices` (default: the GPUs present): with more than one, and unless this process is already a
    DDP rank (torchrun), training runs in that many processes, one per device (`run_distributed`).
    `progress(step, total steps)` is called about every tenth of training (not across DDP processes).
    """
    if len(rows) < MIN_TRAINING_PAIRS:
        raise TrainingDataError(
            f"only {len(rows)} training rows; at least {MIN_TRAINING_PAIRS} are needed to train "
            "(add documents with structure, or enable synthetic queries)"
        )
    columns = text_columns(rows)
    if teacher is not None and config.distill_weight and TEACHER_COLUMN not in rows.columns:
        rows = with_teacher_embeddings(rows, columns, teacher)  # once, before any DDP process starts
    devices = torch.cuda.device_count() if devices is None else devices
    if devices > 1 and distributed_world_size() == 1:
        if callbacks:
            raise ValueError("callbacks cannot cross into the DDP processes; launch with torchrun instead")
        with tempfile.TemporaryDirectory(prefix="ddp-result-") as scratch:
            result_file = Path(scratch) / "result.json"
            run_distributed(devices, _train_rank, base_model, rows, str(output_dir), config, dev,
                            checkpoint_dir, str(result_file), trust_remote_code, base_dev_embeddings)
            return TrainingResult(**json.loads(result_file.read_text()))
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir / "checkpoints"
    distilled = bool(config.distill_weight) and TEACHER_COLUMN in rows.columns
    rows = rows[columns + ([TEACHER_COLUMN] if distilled else [])].reset_index(drop=True)
    batch_size = min(config.batch_size or auto_batch_size(len(rows), config.min_batch_size,
                                                           config.max_batch_size), len(rows))
    world_size = distributed_world_size()
    per_device = math.ceil(batch_size / world_size)

    torch.manual_seed(config.seed)
    model = load_encoder(base_model, config.max_seq_length, trust_remote_code, fresh=True)
    dim = model.get_embedding_dimension()
    quarter = max(1, dim // 4)
    loss = training_loss(model, config, per_device, world_size)

    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=per_device,  # the effective batch, split over the DDP processes
        bf16=config.bf16 and mixed_bf16(),
        use_cpu=not torch.cuda.is_available(),  # also what lets accelerate start gloo DDP on CPUs
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float is a ratio of the total steps in v5
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=config.seed,
        data_seed=config.seed,
        # Epoch ends evaluate and save (the dev score picks the kept checkpoint); _Checkpointer adds
        # time-based saves inside long epochs so a crash loses at most `checkpoint_every_s`.
        eval_strategy="epoch" if dev else "no",
        save_strategy="epoch",
        save_total_limit=2,  # the last and the best (load_best_model_at_end always retains the best)
        load_best_model_at_end=dev is not None,
        metric_for_best_model=f"eval_{DEV_METRIC}" if dev else None,
        greater_is_better=True,
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    # Rank 0 clears a foreign checkpoint folder before the other ranks look into it.
    with args.main_process_first(local=False, desc="checkpoints"):
        resume_from = _prepare_checkpoints(checkpoint_dir, _run_fingerprint(base_model, rows[columns], config,
                                                                             dev))
    clock = _StepClock()
    evaluator = dev.evaluator(quarter, config.bf16) if dev else None
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=_dataset(rows, columns, distilled),
        loss=loss, evaluator=evaluator,
        callbacks=[clock, _Checkpointer(config.checkpoint_every_s), *callbacks,
                   *([_Progress(progress)] if progress else [])],
    )
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    best_step = trainer.state.best_global_step or trainer.state.global_step

    def base() -> SentenceTransformer:  # loaded only when a merge needs it
        return load_encoder(base_model, config.max_seq_length, trust_remote_code)

    base_key = f"{model_fingerprint(base_model)}@{config.max_seq_length}"
    merged: dict[float, DevEmbeddings] = {}  # each share's dev embeddings, when the merge was searched
    if config.fine_tuned_weight is None and dev:
        merge, merged = choose_merge(model, base(), dev, config.seed, config.merge_weights, base_key,
                                     evaluator.embeddings_by_step.get(best_step), config.bf16,
                                     base_dev_embeddings)
    else:
        merge = {"weight": 1.0 if config.fine_tuned_weight is None else config.fine_tuned_weight,
                 "rule": "no dev slice" if config.fine_tuned_weight is None else "set in the spec"}
    weight = merge["weight"]
    if weight < 1.0:
        interpolate_with_base(model, base(), weight)
    # The kept model's dev embeddings where the merge search or the epoch's evaluation computed them
    kept_dev = merged.get(weight, evaluator.embeddings_by_step.get(best_step) if dev and weight == 1.0 else None)
    rotation = None
    if config.order_dimensions:
        documents = list(dict.fromkeys([*rows["positive"], *(dev.corpus.values() if dev else ())]))
        rotation = order_dimensions_by_variance(
            model, documents, config.rotation_sample, config.seed, config.bf16,
            dict(zip(dev.corpus.values(), kept_dev[1], strict=True)) if kept_dev is not None else None)
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        model.save_pretrained(str(output_dir / "model"))

    history = [{"step": e["step"], "ndcg@10": e[f"eval_{DEV_METRIC}"],
                "ndcg@10_truncated": e.get(f"eval_dev_cosine_dim{quarter}_ndcg@10", float("nan"))}
               for e in trainer.state.log_history if f"eval_{DEV_METRIC}" in e]
    kept = next((h for h in history if h["step"] == best_step), history[-1] if history else None)
    per_query: dict[str, float] = {}
    if kept:
        # The saved model's dev embeddings without a pass of the dev slice through it: the kept ones,
        # rotated as the model now does (inner products are unchanged, so only the truncated score moves).
        final = kept_dev
        if final is None:  # a share set in the spec, or a resumed run's kept epoch
            final = dev.embeddings(model, config.bf16)
        elif rotation is not None:
            final = (rotate(final[0], rotation), rotate(final[1], rotation))
        per_query = dev.scores(final)
        kept = {**kept, "ndcg@10": float(np.mean(list(per_query.values()))),
                "ndcg@10_truncated": float(np.mean(list(dev.scores(final, quarter).values())))}
    trainer.accelerator.wait_for_everyone()  # other ranks may still be reading the best checkpoint
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    pairs_trained = (trainer.state.epoch - clock.start_epoch) * len(rows)
    return TrainingResult(
        training_rows=len(rows),
        batch_size=batch_size,
        steps=int(output.global_step),
        train_seconds=round(seconds, 2),
        pairs_per_second=round(pairs_trained / max(clock.seconds, 1e-9), 2),
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        final_loss=round(float(output.training_loss), 4),
        dev_ndcg_at_10=round(kept["ndcg@10"], 4) if kept else float("nan"),
        matryoshka_dim=quarter,
        dev_ndcg_at_10_truncated=round(kept["ndcg@10_truncated"], 4) if kept else float("nan"),
        loss=describe_loss(_gradcache(config, per_device), config.mini_batch_size,
                           _matryoshka_dims(config, dim), config.gor_weight,
                           config.distill_weight if distilled else 0.0),
        best_step=int(best_step),
        resumed_from_step=_step_of(resume_from) if resume_from else 0,
        dev_history=history,
        world_size=world_size,
        fine_tuned_weight=weight,
        merge=merge,
        dev_per_query=per_query,
        dev_fingerprint=dev.fingerprint() if dev else "",
    )


def text_columns(rows: pd.DataFrame) -> list[str]:
    """`query`, `positive`, then `negative_1..N` in order: the loss's column order."""
    return ["query", "positive"] + sorted((c for c in rows.columns if NEGATIVE_COLUMN.match(c)),
                                          key=lambda c: int(c.split("_")[1]))


def with_teacher_embeddings(rows: pd.DataFrame, columns: list[str], teacher: Teacher) -> pd.DataFrame:
    """`rows` plus TEACHER_COLUMN: per row, the teacher's embeddings of its texts in `columns` order,
    flattened (the labels `losses.distillation_term` reads). Each distinct text is embedded once."""
    texts = list(dict.fromkeys(rows[columns].to_numpy().ravel().tolist()))
    vectors = np.asarray(teacher(texts), dtype=np.float32)
    position = {text: i for i, text in enumerate(texts)}
    rows_of = np.vectorize(position.__getitem__, otypes=[np.int64])(rows[columns].to_numpy())
    flattened = vectors[rows_of].reshape(len(rows), -1)
    return rows.assign(**{TEACHER_COLUMN: list(flattened)})


def _dataset(rows: pd.DataFrame, columns: list[str], distilled: bool) -> Dataset:
    """The text columns in order, plus the teacher's embeddings as one `label` vector per row."""
    data = rows[columns]
    if distilled:
        data = data.assign(label=[vector.tolist() for vector in rows[TEACHER_COLUMN]])
    return Dataset.from_pandas(data, preserve_index=False)


def _train_rank(base_model: str, rows: pd.DataFrame, output_dir: str, config: TrainingConfig,
                dev: DevSet | None, checkpoint_dir: str | Path | None, result_file: str,
                trust_remote_code: bool, base_dev_embeddings: DevEmbeddings | None) -> None:
    result = train_encoder(base_model, rows, output_dir, config, dev, checkpoint_dir,
                           trust_remote_code=trust_remote_code, base_dev_embeddings=base_dev_embeddings)
    if int(os.environ["RANK"]) == 0:
        Path(result_file).write_text(json.dumps(asdict(result)))


def run_distributed(world_size: int, target, *args) -> None:
    """`target(*args)` in `world_size` processes with the environment torchrun gives its ranks
    (RANK, LOCAL_RANK, WORLD_SIZE, a loopback rendezvous), so the trainer runs them as one DDP job
    (NCCL, one GPU each; gloo on CPUs). `target` and `args` must pickle."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_entry, args=(world_size, port, target, args), nprocs=world_size)


def _rank_entry(rank: int, world_size: int, port: int, target, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    target(*args)


def distributed_world_size() -> int:
    """DDP processes this training is one of: torchrun and `accelerate launch` set WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mixed_bf16() -> bool:
    """Whether bf16 mixed precision (autocast, fp32 master weights) runs natively here: GPUs from
    Ampere on, CPUs with AVX512-BF16 or AMX. Elsewhere (AVX2-only CPUs) it would be emulated and
    slower than fp32, so training stays fp32. Measured: benchmarks/training_levers.py."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return native_bf16()


def _gradcache(config: TrainingConfig, per_device_batch: int) -> bool:
    return config.gradcache if config.gradcache is not None else per_device_batch > config.mini_batch_size


def _matryoshka_dims(config: TrainingConfig, dim: int) -> tuple[int, ...]:
    return default_matryoshka_dims(dim) if config.matryoshka_dims is None else tuple(config.matryoshka_dims)


def training_loss(model: SentenceTransformer, config: TrainingConfig, per_device_batch: int,
                  world_size: int = 1) -> nn.Module:
    """The loss `train_encoder` trains with. GradCache once a device's batch exceeds the mini-batch;
    under DDP (`world_size` > 1) each device's anchors are scored against the candidates gathered
    from every device, so the negatives per anchor do not shrink when the batch is split."""
    return contrastive_loss(model, gradcache=_gradcache(config, per_device_batch),
                            mini_batch_size=config.mini_batch_size,
                            matryoshka_dims=_matryoshka_dims(config, model.get_embedding_dimension()),
                            gor_weight=config.gor_weight, gather_across_devices=world_size > 1,
                            distill_weight=config.distill_weight)


# (base model revision and sequence length, precision, dev slice) -> the base model's dev embeddings:
# the same for the three rungs of a run, so encoded once per process.
_base_embeddings: dict[tuple[str, bool, str], DevEmbeddings] = {}


def choose_merge(model: SentenceTransformer, base: SentenceTransformer, dev: DevSet, seed: int = 0,
                 weights: Sequence[float] = MERGE_WEIGHTS, base_key: str = "",
                 tuned: DevEmbeddings | None = None, bf16: bool = True,
                 base_embeddings: DevEmbeddings | None = None) -> tuple[dict, dict[float, DevEmbeddings]]:
    """The fine-tuned share (of `weights`) to keep, chosen on the dev slice (`pick_merge`); `model`
    is left as it was. Each share's merge with the base (weights averaged, no retraining) is scored
    per dev query. `tuned`: `model`'s own dev embeddings (share 1.0) where already computed (the
    epoch's evaluation); the base model's (share 0.0) are `base_embeddings` where given (an embedding
    cache), else encoded and kept in this process under `base_key` (its revision) for the next rung.
    Returns the choice and each share's dev embeddings."""
    tuned_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    embedded: dict[float, DevEmbeddings] = {}
    try:
        for weight in weights:
            if weight == 0.0 and base_embeddings is not None:
                embedded[weight] = base_embeddings
            elif weight == 0.0:
                key = (base_key, bf16, dev.fingerprint())
                cached = _base_embeddings.get(key) if base_key else None
                embedded[weight] = cached if cached is not None else dev.embeddings(base, bf16)
                if base_key:
                    _base_embeddings[key] = embedded[weight]
            elif weight == 1.0 and tuned is not None:
                embedded[weight] = tuned
            else:
                model.load_state_dict(tuned_state)
                if weight < 1.0:
                    interpolate_with_base(model, base, weight)
                embedded[weight] = dev.embeddings(model, bf16)
    finally:
        model.load_state_dict(tuned_state)
    return pick_merge({weight: dev.scores(e) for weight, e in embedded.items()}, seed), embedded


def pick_merge(per_query: dict[float, dict[str, float]], seed: int = 0) -> dict:
    """The rule over {fine-tuned share: {dev query: nDCG@10}} (share 0.0: the base model): the best
    mean is kept only when it beats the base with p < MERGE_P in a paired randomization test; else
    the base model, since training did not help beyond noise. Ties go to more fine-tuning.
    `detectable_gain`: the smallest mean gain of the fully fine-tuned model the test could show on
    this slice (1.96 standard errors of its per-query differences from the base): a slice too small
    to tell says so instead of passing for evidence that training does not help.
    Returns {weight, dev_ndcg_at_10: {share: mean}, p_vs_base, detectable_gain, rule}."""
    from encoder_pipeline.lib.report import paired_randomization_test

    if 0.0 not in per_query:
        raise ValueError("the merge shares must include 0.0 (the base model): it is what a merge must beat")
    scores = {w: float(np.mean(list(q.values()))) if q else 0.0 for w, q in per_query.items()}
    best = max(scores, key=lambda w: (scores[w], w))
    p = paired_randomization_test(per_query[best], per_query[0.0], seed=seed)[1]
    beats = best != 0.0 and scores[best] > scores[0.0] and p < MERGE_P
    queries = len(per_query[best])
    tuned = per_query[max(per_query)]
    differences = np.array([tuned[q] - per_query[0.0][q] for q in per_query[0.0]])
    detectable = float(1.96 * differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else 1.0
    rule = (f"share {best:g} of the fine-tuned weights: best on the dev slice ({queries} queries), beats "
            f"the base model (p = {p:.3f})") if beats else (
            f"the base model: no merge beats it on the dev slice ({queries} queries) beyond noise "
            f"(best, share {best:g}: {scores[best]:.4f} vs {scores[0.0]:.4f}, p = {p:.3f}; on these "
            f"queries only a gain above ~{detectable:.3f} could show)")
    return {"weight": best if beats else 0.0, "p_vs_base": round(p, 4), "detectable_gain": round(detectable, 4),
            "rule": rule, "dev_ndcg_at_10": {f"{w:g}": round(v, 4) for w, v in scores.items()}}


def pick_rung(per_query: dict[str, dict[str, float]], kept: Sequence[str], seed: int = 0) -> tuple[str, str]:
    """The rung to serve, from `per_query` ({rung: {dev query: nDCG@10}}, in ladder order: each rung
    adds data decisions to the one before) and `kept` (the rungs whose merge kept trained weights).
    Returns (rung, why).

    The candidates are the kept rungs (none kept: each rung is the base model, the top one is served).
    The highest candidate is served unless a lower one beats it on dev with p < MERGE_P. The rungs are
    the same model trained on nested data, so their dev differences are mostly below what the slice
    can show, and the best mean among them is a draw: on `code` (seed 0, two epochs) dev 0.757 /
    0.753 / 0.749 picked the rung that scores 0.018 below the top one on the eval set."""
    from encoder_pipeline.lib.report import paired_randomization_test

    rungs = list(per_query)
    candidates = [r for r in rungs if r in kept]
    if not candidates:
        return rungs[-1], f"{rungs[-1]}: no rung's merge kept training, so each is the base model"
    means = {r: float(np.mean(list(per_query[r].values()))) if per_query[r] else 0.0 for r in candidates}
    top = candidates[-1]
    best = max(candidates, key=lambda r: (means[r], candidates.index(r)))
    if best == top:
        return top, f"{top}: the kept rung with the most data, and the best on the dev slice ({means[top]:.4f})"
    p = paired_randomization_test(per_query[best], per_query[top], seed=seed)[1]
    if p < MERGE_P:
        return best, (f"{best}: beats {top}, the kept rung with more data, on the dev slice "
                      f"({means[best]:.4f} vs {means[top]:.4f}, p = {p:.3f})")
    return top, (f"{top}: the kept rung with the most data; no lower rung beats it on the dev slice beyond "
                 f"noise (best, {best}: {means[best]:.4f} vs {means[top]:.4f}, p = {p:.3f})")


def interpolate_with_base(model: SentenceTransformer, base: SentenceTransformer, fine_tuned_weight: float
                          ) -> None:
    """Set `model`'s weights to `fine_tuned_weight` * its own + (1 - `fine_tuned_weight`) * `base`'s,
    in place: WiSE-FT (Wortsman et al., 2022), a weight-space ensemble of the fine-tuned model and the
    one it started from.

    The training pairs (title -> body, docstring -> code, synthetic questions) are not always the
    form of the user's real queries, and a small fine-tune forgets some of what the base model
    learnt from a billion general pairs; the interpolation keeps part of both. Parameters only
    `model` has (a rotation appended later) are left alone.
    sentence-transformers has no weight-merging helper, hence this loop.
    """
    _check_fine_tuned_weight(fine_tuned_weight)
    base_state = base.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in base_state and tensor.is_floating_point():
                tensor.mul_(fine_tuned_weight).add_(base_state[name].to(tensor.device, tensor.dtype),
                                                    alpha=1.0 - fine_tuned_weight)


def order_dimensions_by_variance(model: SentenceTransformer, documents: Sequence[str], sample: int,
                                 seed: int, bf16: bool = True, embedded: dict[str, np.ndarray] | None = None
                                 ) -> np.ndarray:
    """Append an orthogonal rotation (then re-normalize) that puts the embedding's dimensions in
    decreasing order of variance over `documents` (their principal axes).

    A rotation preserves every inner product, so full-width retrieval is unchanged; truncating to
    the first d dimensions (Matryoshka, the index sweep) then keeps the d highest-variance directions
    rather than whichever came first. Measured on `code` (3 rungs, eval set): 1/4 of the dimensions
    keeps ~96% of full nDCG@10 instead of ~91%. sentence-transformers has no such module, hence a
    Dense layer with fixed weights; it saves and loads as a standard sentence-transformers folder.
    `embedded`: `model`'s embeddings of some documents, already computed (the dev corpus's).
    Returns the rotation's axes (`rotate` applies them to embeddings already computed).
    """
    rng = np.random.default_rng(seed)
    documents = list(documents)
    if len(documents) > sample:
        documents = [documents[i] for i in sorted(rng.choice(len(documents), sample, replace=False))]
    embedded = embedded or {}
    missing = [d for d in documents if d not in embedded]
    encoded = dict(zip(missing, encode(model, missing, bf16=bf16), strict=True)) if missing else {}
    # axes to ~1e-3: the ordering, not the geometry
    vectors = np.stack([embedded[d] if d in embedded else encoded[d] for d in documents])
    # full_matrices: a complete orthonormal basis even from fewer documents than dimensions
    _, _, axes = np.linalg.svd(vectors - vectors.mean(axis=0), full_matrices=True)
    dim = vectors.shape[1]
    rotation = Dense(dim, dim, bias=False, activation_function=nn.Identity(),
                            init_weight=torch.from_numpy(np.ascontiguousarray(axes, dtype=np.float32)))
    model.append(rotation.to(model.device))
    model.append(Normalize())
    return axes


def rotate(embeddings: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Normalized `embeddings` as a model with `order_dimensions_by_variance`'s rotation (`axes`,
    returned by it) appended would give them."""
    rotated = embeddings @ axes.T.astype(np.float32)
    return rotated / np.maximum(np.linalg.norm(rotated, axis=1, keepdims=True), 1e-12)


class _StepClock(TrainerCallback):
    """Seconds spent in training steps (batch collation included; evaluation and saving excluded)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.start_epoch = 0.0
        self._mark = time.perf_counter()

    def _reset(self, *args, **kwargs) -> None:
        self._mark = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.start_epoch = state.epoch or 0.0  # > 0 after a resume
        self._reset()

    on_evaluate = on_save = _reset

    def on_step_end(self, args, state, control, **kwargs) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self._mark = now


class _Progress(TrainerCallback):
    """Reports (step, total steps) about every tenth of training and at its last step."""

    def __init__(self, report: Callable[[int, int], None]) -> None:
        self.report = report

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step % max(1, state.max_steps // 10) == 0 or state.global_step == state.max_steps:
            self.report(state.global_step, state.max_steps)


class _Checkpointer(TrainerCallback):
    """Save a checkpoint every `seconds` inside an epoch (epoch ends save anyway)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        at_epoch_end = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-9
        due = (time.monotonic() - self._last >= self.seconds and state.global_step < state.max_steps
               and not at_epoch_end)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # DDP ranks must agree: a save on one rank only would hang the others at its barrier.
            decision = [due]
            dist.broadcast_object_list(decision, src=0)
            due = decision[0]
        if due:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs) -> None:
        self._last = time.monotonic()


def _run_fingerprint(base_model: str, rows: pd.DataFrame, config: TrainingConfig,
                     dev: DevSet | None) -> str:
    """What a checkpoint must match to be resumed: base model, training rows, config, dev set."""
    settings = {k: v for k, v in asdict(config).items() if k != "checkpoint_every_s"}
    digest = hashlib.sha256(json.dumps(
        [model_fingerprint(base_model), settings, dev.fingerprint() if dev else None],
        sort_keys=True, default=str).encode())
    digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:24]


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _prepare_checkpoints(checkpoint_dir: Path, fingerprint: str) -> Path | None:
    """The last complete checkpoint of this same run, or None; anything else there is cleared."""
    marker = checkpoint_dir / RUN_FILE
    if checkpoint_dir.exists() and _read_json(marker).get("fingerprint") != fingerprint:
        shutil.rmtree(checkpoint_dir)
    write_json_atomic(marker, {"fingerprint": fingerprint})
    # The trainer writes trainer_state.json last, in place: a checkpoint whose state is missing or
    # does not parse was cut off mid-save (a kill). It is deleted, so that neither the resume nor
    # the trainer's rotation of old checkpoints counts it.
    complete = []
    for checkpoint in checkpoint_dir.glob("checkpoint-*"):
        if _read_json(checkpoint / "trainer_state.json"):
            complete.append(checkpoint)
        else:
            shutil.rmtree(checkpoint)
    return max(complete, key=_step_of) if complete else None


def _read_json(path: Path) -> dict:
    """A JSON file's content; {} when it is missing or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

