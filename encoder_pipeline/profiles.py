"""Size profiles: `tiny` for tests, `default` for the main job (about 12 minutes for `code` on a
2-core Intel Xeon with AMX), `full` for real use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from encoder_pipeline.lib.teacher import DEFAULT_TEACHER

ProfileName = Literal["tiny", "default", "full"]  # the one list: settings, the CLI and PROFILES read it


@dataclass(frozen=True)
class Profile:
    training_documents: int  # the training stages' stable sample of documents (0: all); serving covers all
    eval_queries: int  # held-out queries when the domain has no judged set
    judged_queries: int  # judged queries evaluated on (0: all of them)
    max_pairs: int  # structural pairs kept after the consistency filter
    consistency_top_k: int  # keep a pair only if its positive ranks in the base model's top-k
    dev_queries: int  # held-out dev queries (best epoch, index width), from structure or the LLM
    dev_distractors: int  # training-corpus units the dev queries are scored against, besides positives
    synthetic_documents: int  # documents sent to the LLM (time-budgeted for the local model)
    queries_per_document: int
    round_trip_top_k: int
    epochs: float
    batch_size: int
    latency_queries: int  # distinct queries timed for p95 latency
    teacher: str  # the encoder that mines, scores every training row and is reported; "": the base model
    merge_weights: tuple[float, ...] | None = None  # fine-tuned shares tried on dev; None: the recipe's


PROFILES: dict[str, Profile] = {
    "tiny": Profile(training_documents=250, eval_queries=30, judged_queries=30,
                    max_pairs=32,  # two steps a rung: training is most of a tiny build's time
                    consistency_top_k=20,
                    dev_queries=8, synthetic_documents=4,
                    dev_distractors=40,  # each rung passes its dev slice twice (epoch = share 1.0, share 0.5)
                    queries_per_document=2, round_trip_top_k=10, epochs=1, batch_size=16,
                    latency_queries=40, teacher="",  # suite time: the base model teaches
                    merge_weights=(1.0, 0.5, 0.0)),  # and three merges are scored, not five
    "default": Profile(training_documents=3000, eval_queries=300, judged_queries=0, max_pairs=2000, consistency_top_k=20,
                       dev_queries=100, dev_distractors=1000,
                       synthetic_documents=512,
                       # One epoch: two lifted code's dev slice and heuristic rung, but not the served
                       # index (two seeds) and left the synthetic rung below the heuristic one, at
                       # 1.5x the build time (docs/results.md, "Two epochs, tried").
                       queries_per_document=1, round_trip_top_k=10, epochs=1, batch_size=32,
                       latency_queries=300, teacher=DEFAULT_TEACHER),
    "full": Profile(training_documents=0, eval_queries=1000, judged_queries=0, max_pairs=100_000, consistency_top_k=20,
                    dev_queries=500, dev_distractors=1000,
                    synthetic_documents=2000,
                    queries_per_document=2, round_trip_top_k=10, epochs=1, batch_size=64,
                    latency_queries=500, teacher=DEFAULT_TEACHER),
}


assert list(PROFILES) == list(get_args(ProfileName)), "every profile name has one Profile"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]
