"""The ladder's loss: InfoNCE over in-batch (and mined) negatives, a Global Orthogonal
Regularization term and a teacher-distillation term; optionally GradCache'd, under MatryoshkaLoss.

How the levers compose (the reason this module exists):

- GOR needs the embeddings of the whole batch. sentence-transformers' `GlobalOrthogonalRegularizationLoss`
  embeds the columns itself with gradients, so pairing it with `CachedMultipleNegativesRankingLoss`
  (as a second loss, or through the trainer's multi-task dict) runs a second full-batch forward pass
  with activations alive: exactly the memory GradCache exists to avoid. Instead the GOR term is added
  inside the cached loss's `calculate_loss`, which GradCache runs on the detached full-batch
  embeddings (its step 2): the term's gradient lands in the same per-embedding gradient cache as the
  InfoNCE gradient, and step 3 back-propagates the sum mini-batch by mini-batch. Memory stays bounded
  by `mini_batch_size`, and the GOR statistics cover the full effective batch, as uncached.
- MatryoshkaLoss wraps a cached loss by decorating its `calculate_loss` (it truncates and re-normalizes
  the cached embeddings to each dim, calls the wrapped function, and chains the gradient back through
  the truncation). Because GOR lives in `calculate_loss`, it is applied at every Matryoshka dim, with
  that dim's weight and with GOR's 1/d floor for that dim. The uncached path gets the same: its
  forward is called once per dim on the truncated embeddings. Spreading each prefix out is the point
  for truncated retrieval.
- The distillation term (`distillation_term`) rides the same way. Its labels are the teacher's own
  embeddings of every text of the row (query, positive, negative_1..N), so the teacher's scores can
  be computed for whatever batch the sampler draws: each query against every candidate in the batch
  (all positives and mined negatives), exactly the candidates InfoNCE ranks. Rows with mined
  negatives thus learn the teacher's ranking of their own candidates, rows without them (the
  heuristic and synthetic rungs) the teacher's in-batch score matrix, and the rungs still differ
  only in their data. Under GradCache it is computed in `calculate_loss` on the full batch and
  back-propagated through the cache; under Matryoshka it applies at every dim (the teacher's side
  stays at its own width).
  Why not sentence-transformers' `MarginMSELoss` (GPL's loss): it needs precomputed per-row
  margins, so it cannot score in-batch candidates (rows without mined negatives would get no
  teacher signal), and as a second loss it would run a second forward pass outside GradCache.
- The uncached variant (`MNRLWithGOR`) computes the identical objective; `test_lib_train.py` checks
  the two give the same parameter gradients. With one mini-batch GradCache buys no memory and costs
  an extra no-grad forward pass, so `train.py` uses it only when the batch exceeds `mini_batch_size`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    GlobalOrthogonalRegularizationLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from torch import Tensor, nn


def _gor(model: SentenceTransformer) -> GlobalOrthogonalRegularizationLoss:
    # EmbeddingGemma's form of GOR: the second-moment term only. Averaged over columns (not summed)
    # so a weight means the same with 0 or 3 mined negatives per row.
    return GlobalOrthogonalRegularizationLoss(model, mean_weight=0.0, second_moment_weight=1.0,
                                              aggregation="mean")


def gor_term(gor: GlobalOrthogonalRegularizationLoss, embeddings: list[Tensor]) -> Tensor:
    """The unweighted GOR value of per-column embeddings (one tensor per input column)."""
    return sum(gor.compute_loss_from_embeddings(embeddings).values())


def distillation_term(embeddings: list[Tensor], teacher_embeddings: Tensor, scale: float) -> Tensor:
    """KL(teacher || student) over each query's in-batch candidates, both softmaxed at the InfoNCE
    scale: the student learns the teacher's ranking of every candidate InfoNCE ranks (GPL's use of a
    teacher's scores, listwise over the batch instead of MarginMSE's per-pair margins).

    `teacher_embeddings` holds, per row, the teacher's embeddings of the row's texts in column order
    (query, positive, negative_1..N), flattened to one vector: shape (rows, columns * teacher dim).
    The candidates are ordered as MultipleNegativesRankingLoss orders them (every positive, then
    every negative_1, ...). Under DDP the term stays per device (the teacher's side is not gathered).

    The label wins over the teacher: a row whose teacher ranks another candidate above the row's
    own positive adds nothing (averaged over all rows, so the weight means the same per row). A
    bi-encoder teacher is no oracle; where it contradicts the pair, matching its ranking would teach
    the student to rank the labelled positive below a candidate the pair says is not the answer.
    """
    rows, columns = embeddings[0].shape[0], len(embeddings)
    teacher = F.normalize(teacher_embeddings.to(embeddings[0]).reshape(rows, columns, -1), dim=-1)
    teacher_candidates = teacher[:, 1:].transpose(0, 1).reshape(-1, teacher.shape[-1])
    anchors = F.normalize(embeddings[0], dim=-1)
    candidates = F.normalize(torch.cat(embeddings[1:]), dim=-1)
    student = scale * anchors @ candidates.T
    target = scale * teacher[:, 0] @ teacher_candidates.T
    agrees = target.argmax(dim=-1) == torch.arange(rows, device=target.device)  # row i's positive: i
    per_row = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(target, dim=-1),
                       log_target=True, reduction="none").sum(dim=-1)
    return (per_row * agrees).sum() / rows


class MNRLWithGOR(nn.Module):
    def __init__(self, model: SentenceTransformer, gor_weight: float = 0.1, scale: float = 20.0,
                 gather_across_devices: bool = False, distill_weight: float = 0.0) -> None:
        """
        MultipleNegativesRankingLoss plus `gor_weight` times a Global Orthogonal Regularization term
        (and, given the teacher's embeddings as labels, `distill_weight` times `distillation_term`),
        computed from one forward pass.

        Args:
            model: SentenceTransformer model
            gor_weight: weight of the GOR second-moment term (0 turns it off)
            scale: InfoNCE logit scale (1 / temperature)
            gather_across_devices: under DDP, every device's candidates are each anchor's negatives
                (the GOR term stays per device)
            distill_weight: weight of `distillation_term` when labels (teacher embeddings) are given

        References:
            - InfoNCE with in-batch negatives: https://huggingface.co/papers/1705.00652
            - GOR: https://huggingface.co/papers/1708.06320; EmbeddingGemma's use of it:
              https://huggingface.co/papers/2509.20354
            - Distilling a teacher's scores (GPL):
              https://huggingface.co/papers/2112.07577

        Inputs:
            +-------------------------------------------------+-------------------------------------+
            | Inputs                                          | Labels                              |
            +=================================================+=====================================+
            | (anchor, positive, negative_1, ..., negative_n) | none, or the teacher's embeddings   |
            |                                                 | of the row's texts, flattened       |
            +-------------------------------------------------+-------------------------------------+

        Relations:
            - :class:`CachedMNRLWithGOR` is the same objective with GradCache (same gradients).

        Example:
            ``MatryoshkaLoss(model, MNRLWithGOR(model, gor_weight=0.1), [384, 192, 96, 48])``
        """
        super().__init__()
        self.model = model
        self.gor_weight = gor_weight
        self.mnrl = MultipleNegativesRankingLoss(model, scale=scale, gather_across_devices=gather_across_devices)
        self.gor = _gor(model)
        self.distill_weight = distill_weight

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = embed_columns(self.model, sentence_features)
        loss = self.mnrl.compute_loss_from_embeddings(embeddings, labels)
        if self.gor_weight:
            loss = loss + self.gor_weight * gor_term(self.gor, embeddings)
        if self.distill_weight and labels is not None:
            loss = loss + self.distill_weight * distillation_term(embeddings, labels, self.mnrl.scale)
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.mnrl.scale, "gor_weight": self.gor_weight, "gor": self.gor.get_config_dict(),
                "distill_weight": self.distill_weight}


class CachedMNRLWithGOR(CachedMultipleNegativesRankingLoss):
    def __init__(self, model: SentenceTransformer, gor_weight: float = 0.1, scale: float = 20.0,
                 mini_batch_size: int = 32, gather_across_devices: bool = False,
                 distill_weight: float = 0.0) -> None:
        """
        :class:`MNRLWithGOR` with GradCache: the effective batch is whatever the trainer hands in,
        activation memory is bounded by `mini_batch_size` (see the module docstring for how the GOR
        term rides in GradCache's embedding-gradient cache).

        Args:
            model: SentenceTransformer model
            gor_weight: weight of the GOR second-moment term (0 turns it off)
            scale: InfoNCE logit scale (1 / temperature)
            mini_batch_size: texts per forward pass; bounds activation memory
            gather_across_devices: under DDP, every device's candidates are each anchor's negatives
                (the GOR term stays per device)
            distill_weight: weight of `distillation_term` when labels (teacher embeddings) are given

        References:
            - GradCache: https://huggingface.co/papers/2101.06983
            - GOR: https://huggingface.co/papers/1708.06320

        Inputs: as :class:`MNRLWithGOR`.

        Example:
            ``MatryoshkaLoss(model, CachedMNRLWithGOR(model, 0.1, mini_batch_size=32), [384, 192, 96, 48])``
        """
        super().__init__(model, scale=scale, mini_batch_size=mini_batch_size,
                         gather_across_devices=gather_across_devices)
        self.gor_weight = gor_weight
        self.gor = _gor(model)
        self.distill_weight = distill_weight

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        loss = super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(column) for column in reps]
        term = self.gor_weight * gor_term(self.gor, embeddings) if self.gor_weight else None
        if self.distill_weight and labels is not None:
            distill = self.distill_weight * distillation_term(embeddings, labels, self.scale)
            term = distill if term is None else term + distill
        if term is None:
            return loss
        # `reps` are GradCache's detached leaf embeddings; backward() here adds the GOR and
        # distillation gradients to the InfoNCE gradient already accumulated in each `rep.grad`.
        if with_backward:
            term.backward()
            term = term.detach()
        return loss + term

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "gor_weight": self.gor_weight,
                "gor": self.gor.get_config_dict(), "distill_weight": self.distill_weight}


def default_matryoshka_dims(embedding_dim: int) -> tuple[int, ...]:
    """Full, 1/2, 1/4, 1/8 of the model's dimension: 384/192/96/48 for MiniLM."""
    return tuple(d for d in (embedding_dim, embedding_dim // 2, embedding_dim // 4, embedding_dim // 8)
                 if d > 0)


def contrastive_loss(model: SentenceTransformer, *, gradcache: bool, mini_batch_size: int = 32,
                     matryoshka_dims: Sequence[int] = (), gor_weight: float = 0.1,
                     scale: float = 20.0, gather_across_devices: bool = False,
                     distill_weight: float = 0.0) -> nn.Module:
    """The training loss: (Cached)MNRLWithGOR, under MatryoshkaLoss when `matryoshka_dims` is given.

    Columns in: `query`, `positive`, then optional `negative_1..N`; labels (optional): the teacher's
    embeddings of each row's texts (`distillation_term`), distilled with `distill_weight`.
    """
    if gradcache:
        loss: nn.Module = CachedMNRLWithGOR(model, gor_weight, scale, mini_batch_size, gather_across_devices,
                                            distill_weight)
    else:
        loss = MNRLWithGOR(model, gor_weight, scale, gather_across_devices, distill_weight)
    if matryoshka_dims:
        loss = MatryoshkaLoss(model, loss, list(matryoshka_dims))
    return loss


def describe_loss(gradcache: bool, mini_batch_size: int, matryoshka_dims: Sequence[int],
                  gor_weight: float, distill_weight: float = 0.0) -> str:
    """One line for metadata, e.g. `Matryoshka(384/192/96/48) of CachedMNRL(mini-batch 32) + 0.1 GOR`."""
    core = f"CachedMNRL(mini-batch {mini_batch_size})" if gradcache else "MNRL"
    if gor_weight:
        core += f" + {gor_weight:g} GOR"
    if distill_weight:
        core += f" + {distill_weight:g} KL(teacher, in-batch)"
    if matryoshka_dims:
        core = f"Matryoshka({'/'.join(str(d) for d in matryoshka_dims)}) of {core}"
    return core
