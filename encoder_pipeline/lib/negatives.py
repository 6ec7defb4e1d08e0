"""Positive-aware hard-negative mining (NV-Retriever's TopK-PercPos) via sentence-transformers.

Columns in: `query`, `positive`. Columns out: `query`, `positive`, `negative_1..N` (rows whose
query found fewer than N usable negatives are dropped by `mine_hard_negatives` itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives

from encoder_pipeline.lib.encoders import inference_precision


@dataclass(frozen=True)
class MiningConfig:
    relative_margin: float = 0.05  # drop candidates scoring above 95% of the positive's score
    num_negatives: int = 3
    range_min: int = 0
    range_max: int = 50
    sampling_strategy: str = "top"
    query_chunk_size: int = 20_000  # bounds the query x top-k score matrix held at once


def mine_negatives(pairs: pd.DataFrame, corpus: list[str], model: SentenceTransformer,
                   config: MiningConfig, cache_dir: str | Path, bf16: bool = True) -> pd.DataFrame:
    """Mine negatives for each (query, positive) from `corpus` (which must exclude eval documents).

    `cache_dir` must be specific to the model: mine_hard_negatives keys its embedding cache by the
    texts only. Queries are mined in chunks, the corpus embeddings are reused from that cache.
    """
    chunks = []
    for start in range(0, len(pairs), config.query_chunk_size):
        part = pairs.iloc[start : start + config.query_chunk_size][["query", "positive"]]
        with inference_precision(bf16):
            mined = mine_hard_negatives(
                Dataset.from_pandas(part, preserve_index=False),
                model,
                anchor_column_name="query",
                positive_column_name="positive",
                corpus=corpus,
                range_min=config.range_min,
                range_max=config.range_max,
                relative_margin=config.relative_margin,
                num_negatives=config.num_negatives,
                sampling_strategy=config.sampling_strategy,
                output_format="n-tuple",
                use_faiss=True,
                batch_size=64,
                cache_folder=str(cache_dir),
                verbose=False,
            )
        chunks.append(mined.to_pandas())
    result = pd.concat(chunks, ignore_index=True)
    return result.rename(columns={"anchor": "query"})
