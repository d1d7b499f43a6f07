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


class ImageTextContrastive(nn.Module):
    """The first stage's in-batch contrastive loss on ``[B, B]`` cosines (``cosine[i, j]`` = image of caption i
    against caption j; matching pairs on the diagonal).

    ``infonce`` (CLIP / ALBEF): ``(CE(scale * cosine, diag) + CE(scale * cosine^T, diag)) / 2`` with the model's learned
    inverse temperature ``scale``; ``hinge``: :class:`ContrastiveLoss` on the cosine matrix itself (the scale unused);
    ``infonce+hinge``: the sum of the two.
    """

    KINDS = ("infonce", "hinge", "infonce+hinge")

    def __init__(self, kind: str = "infonce", margin: float = 0.2, max_violation: bool = True):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown contrastive loss {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.kind = kind
        self.hinge = ContrastiveLoss(margin, max_violation)

    def forward(self, cosine: Tensor, scale: Tensor, max_violation: bool | None = None) -> Tensor:
        loss = cosine.new_zeros(())
        if "hinge" in self.kind:
            loss = loss + self.hinge(cosine, max_violation)
        if "infonce" in self.kind:
            logits = scale * cosine
            target = torch.arange(cosine.size(0), device=cosine.device)
            loss = loss + (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return loss
