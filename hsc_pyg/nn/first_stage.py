"""The first stage of retrieval: one vector per image and one per caption, compared by cosine.

The exact scorer (:mod:`hsc_pyg.nn.similarity`) costs about 10 MFLOP per image-caption pair; a gallery search can only
afford it on a shortlist. The shortlist comes from the global vectors the model already computes for its global
alignment (VisualSA / TextSA, MODEL.md §2, averaged over the aligned levels), optionally through a small linear
projection, trained with an in-batch contrastive loss next to the hinge loss (``--itc_weight``; ALBEF / BLIP's
image-text contrastive loss, a CLIP-style learned temperature).

``trained`` is a buffer (saved in the state dict) that training sets once the contrastive loss has taken a step: a
model that was never trained that way (an official checkpoint, or ``--itc_weight 0``) still has a first stage, the raw
cosine of its global vectors, and the re-rankers say so.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import l2norm
from .init import xavier_linear

#: CLIP's initial temperature 0.07 and its cap on the inverse temperature (100).
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


class FirstStage(nn.Module):
    """Global vectors ``glo [N, V, d]`` (V aligned levels) -> l2-normalised retrieval vectors ``[N, k]``.

    ``v = l2norm(P(mean_V glo))`` with ``P`` the identity (``dim == 0``: ``k = d``) or ``Linear(d -> dim)``, one
    projection per modality. ``logit_scale`` is the log of the contrastive loss's inverse temperature.
    """

    def __init__(self, embed_size: int, dim: int = 0):
        super().__init__()
        self.dim = dim
        self.image_proj = xavier_linear(nn.Linear(embed_size, dim)) if dim else nn.Identity()
        self.caption_proj = xavier_linear(nn.Linear(embed_size, dim)) if dim else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.register_buffer("trained", torch.tensor(False))

    def image_vectors(self, glo: Tensor) -> Tensor:
        """``[N, V, d]`` image global vectors -> ``[N, k]`` float32, unit length."""
        return l2norm(self.image_proj(glo.float().mean(1)))

    def caption_vectors(self, glo: Tensor) -> Tensor:
        """``[M, V, d]`` caption global vectors -> ``[M, k]`` float32, unit length."""
        return l2norm(self.caption_proj(glo.float().mean(1)))

    def scale(self) -> Tensor:
        """The inverse temperature ``exp(logit_scale)``, capped at :data:`MAX_LOGIT_SCALE` (as CLIP)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
