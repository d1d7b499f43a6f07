"""Losses: the hinge triplet loss on a ``[B, B]`` score matrix (MODEL.md §2; VSE++ hardest negatives) and the first
stage's in-batch contrastive loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ContrastiveLoss(nn.Module):
    """``sum_i [m + s(i, j) - s(i, i)]_+`` over negative captions j of image i, plus the same over negative images of
    each caption, with the diagonal excluded. With ``max_violation`` only the hardest negative of each row and column
    counts (the default of SGRAF and HSC); otherwise every violating negative is summed.

    Shapes: ``scores [B, B]`` with ``scores[i, j]`` = image i against caption j and matching pairs on the diagonal.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, scores: Tensor, max_violation: bool | None = None) -> Tensor:
        hardest = self.max_violation if max_violation is None else max_violation
        positive = scores.diag()
        eye = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
        cost_caption = (self.margin + scores - positive.unsqueeze(1)).clamp(min=0).masked_fill(eye, 0)
        cost_image = (self.margin + scores - positive.unsqueeze(0)).clamp(min=0).masked_fill(eye, 0)
        if hardest:
            return cost_caption.max(1)[0].sum() + cost_image.max(0)[0].sum()
        return cost_caption.sum() + cost_image.sum()


TERMS = ("infonce", "hinge", "distill")
# every non-empty set of terms, written in TERMS order and joined by "+": infonce, hinge, infonce+hinge, ...
KINDS = tuple("+".join(t for i, t in enumerate(TERMS) if mask >> i & 1) for mask in range(1, 2 ** len(TERMS)))


class ImageTextContrastive(nn.Module):
    """The first stage's in-batch loss on ``[B, B]`` cosines (``cosine[i, j]`` = image of caption i against caption
    j; matching pairs on the diagonal): the sum of the chosen terms (``kind``, joined by "+", in the order of
    :data:`TERMS`).

    ``infonce`` (CLIP / ALBEF): ``(CE(scale * cosine, diag) + CE(scale * cosine^T, diag)) / 2`` with the model's learned
    inverse temperature ``scale``; ``hinge``: :class:`ContrastiveLoss` on the cosine matrix itself (the scale unused);
    ``distill``: the first stage learns the exact scorer's ranking of the batch, ``(KL(p_rows || q_rows) +
    KL(p_cols || q_cols)) / 2`` averaged over rows (columns), with ``q = softmax(scale * cosine)`` and the teacher
    ``p = softmax(scale * scores)`` of the exact ``[B, B]`` scores at the same temperature; the teacher (scores and
    scale) is detached, so the exact scorer is trained by its own hinge loss only.
    """

    def __init__(self, kind: str = "infonce", margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown first-stage loss {kind!r}; choose one of {', '.join(KINDS)}")
        self.terms = set(kind.split("+"))
        self.hinge = ContrastiveLoss(margin, max_violation)

    @property
    def needs_scores(self) -> bool:
        return "distill" in self.terms

    def forward(self, cosine: Tensor, scale: Tensor, max_violation: bool | None = None,
                scores: Tensor | None = None) -> Tensor:
        loss = cosine.new_zeros(())
        if "hinge" in self.terms:
            loss = loss + self.hinge(cosine, max_violation)
        logits = scale * cosine
        if "infonce" in self.terms:
            target = torch.arange(cosine.size(0), device=cosine.device)
            loss = loss + (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        if "distill" in self.terms:
            if scores is None:
                raise ValueError("the distill term needs the exact scores of the batch")
            teacher = scale.detach() * scores.detach()
            loss = loss + (_kl(teacher, logits, 1) + _kl(teacher, logits, 0)) / 2
        return loss


def _kl(teacher: Tensor, student: Tensor, dim: int) -> Tensor:
    """Mean over rows (dim 1) or columns (dim 0) of KL(softmax(teacher) || softmax(student)) along ``dim``."""
    log_p, log_q = teacher.log_softmax(dim), student.log_softmax(dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim).mean()
