"""Contrastive fine-tuning of a sentence-transformers encoder on (query, positive[, negatives]) rows.

Columns in: `query`, `positive`, then optional `negative_1..N`. Loss: MultipleNegativesRankingLoss
(in-batch negatives plus any mined ones; van den Oord et al. 2018, Henderson et al. 2017) with the
no-duplicates batch sampler, since a repeated text in a batch would be a false negative.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
    losses,
)
from sentence_transformers.evaluation import InformationRetrievalEvaluator
from sentence_transformers.training_args import BatchSamplers

from encoder_pipeline.lib.encoders import load_encoder

MIN_TRAINING_PAIRS = 16


class TrainingDataError(ValueError):
    """Too little data to train on."""


@dataclass(frozen=True)
class TrainingConfig:
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    max_seq_length: int = 128
    seed: int = 0


@dataclass
class DevSet:
    """A dev slice carved from training pairs: {qid: text}, {doc_id: text}, {qid: {doc_id}}."""

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]

    def evaluator(self) -> InformationRetrievalEvaluator:
        return InformationRetrievalEvaluator(
            self.queries, self.corpus, self.relevant, name="dev", ndcg_at_k=[10], mrr_at_k=[10],
            accuracy_at_k=[1], precision_recall_at_k=[10, 100], map_at_k=[100],
            show_progress_bar=False, batch_size=64,
        )

    def ndcg_at_10(self, model) -> float:
        return float(self.evaluator()(model)["dev_cosine_ndcg@10"])


@dataclass
class TrainingResult:
    training_rows: int
    steps: int
    train_seconds: float
    pairs_per_second: float
    peak_memory_mb: float
    final_loss: float
    dev_ndcg_at_10: float


def train_encoder(base_model: str, rows: pd.DataFrame, output_dir: str | Path, config: TrainingConfig,
                  dev: DevSet | None = None) -> TrainingResult:
    """Fine-tune `base_model` on `rows`, save a sentence-transformers folder to `output_dir/model`."""
    if len(rows) < MIN_TRAINING_PAIRS:
        raise TrainingDataError(
            f"only {len(rows)} training rows; at least {MIN_TRAINING_PAIRS} are needed to train "
            "(add documents with structure, or enable synthetic queries)"
        )
    torch.manual_seed(config.seed)
    model = load_encoder(base_model, config.max_seq_length, fresh=True)
    columns = ["query", "positive"] + sorted(c for c in rows.columns if c.startswith("negative_"))
    dataset = Dataset.from_pandas(rows[columns].reset_index(drop=True), preserve_index=False)
    output_dir = Path(output_dir)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=min(config.batch_size, len(rows)),
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float is a ratio of the total steps in v5
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset,
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(output_dir / "model"))
    return TrainingResult(
        training_rows=len(rows),
        steps=int(output.global_step),
        train_seconds=round(seconds, 2),
        pairs_per_second=round(len(rows) * config.epochs / seconds, 2),
        peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        final_loss=round(float(output.training_loss), 4),
        dev_ndcg_at_10=round(dev.ndcg_at_10(model), 4) if dev else float("nan"),
    )


def result_dict(result: TrainingResult) -> dict:
    return asdict(result)
