"""Small tensor functions shared by the encoders and the similarity module (MODEL.md notation)."""
from __future__ import annotations

import torch
from torch import Tensor


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """``x / (sqrt(sum x^2) + eps)`` along ``dim`` (the original's form, eps outside the root)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def masked_softmax(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` over the entries where ``mask`` is true; masked entries get exactly 0."""
    x = x.masked_fill(~mask, float("-inf"))
    return torch.softmax(x, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` along ``dim`` over the positions where ``mask`` (broadcast on the last axis) is true."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1)
