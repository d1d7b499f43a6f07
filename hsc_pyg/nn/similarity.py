"""The per-pair part (MODEL.md §2): global vectors, word-to-region attention, alignments and the similarity heads.

Everything here works on dense padded tensors whose leading axes *broadcast*: the scorer passes
``regions [A, 1, R, d]`` with ``words [1, C, L, d]`` to score A images against C captions at once (no loop over
captions, no repetition of a caption per image), or ``[P, R, d]`` with ``[P, L, d]`` to score P given pairs.
Padded words are masked out of every normalisation, softmax and mean, so a pair's score does not depend on the other
pairs it is computed with.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .functional import l2norm, masked_mean, masked_softmax
from .layers import xavier_linear

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        HEADS[name] = cls
        return cls

    return wrap


class VisualSA(nn.Module):
    """Global image vector by self-attention over regions: ``[N, R, d] -> [N, d]`` (l2-normalised).

    ``l = Dropout(Tanh(BN_R(Linear(regions))))`` (the BatchNorm's channels are the R regions),
    ``h = Dropout(Tanh(BN_d(Linear(mean_r regions))))``, ``a = softmax_r(Linear(l * h))``, output
    ``l2norm(sum_r a_r regions_r)``.
    """

    def __init__(self, embed_size: int, dropout: float, num_regions: int):
        super().__init__()
        self.num_regions = num_regions
        self.local_embed = nn.Sequential(xavier_linear(nn.Linear(embed_size, embed_size)), nn.BatchNorm1d(num_regions),
                                         nn.Tanh(), nn.Dropout(dropout))
        self.global_embed = nn.Sequential(xavier_linear(nn.Linear(embed_size, embed_size)), nn.BatchNorm1d(embed_size),
                                          nn.Tanh(), nn.Dropout(dropout))
        self.attn_score = xavier_linear(nn.Linear(embed_size, 1))

    def forward(self, regions: Tensor) -> Tensor:
        if regions.size(1) != self.num_regions:
            raise ConfigError(f"images have {regions.size(1)} regions but the model was built for num_regions="
                              f"{self.num_regions} (VisualSA normalises over the region axis); use matching data")
        local = self.local_embed(regions)
        glob = self.global_embed(regions.mean(1))
        weights = torch.softmax(self.attn_score(local * glob.unsqueeze(1)).squeeze(-1), dim=1)
        return l2norm((weights.unsqueeze(-1) * regions).sum(1))


class TextSA(nn.Module):
    """Global caption vector by self-attention over its real words: ``[M, L, d], mask [M, L] -> [M, d]``."""

    def __init__(self, embed_size: int, dropout: float):
        super().__init__()
        self.local_embed = nn.Sequential(xavier_linear(nn.Linear(embed_size, embed_size)), nn.Tanh(), nn.Dropout(dropout))
        self.global_embed = nn.Sequential(xavier_linear(nn.Linear(embed_size, embed_size)), nn.Tanh(), nn.Dropout(dropout))
        self.attn_score = xavier_linear(nn.Linear(embed_size, 1))

    def forward(self, words: Tensor, mask: Tensor) -> Tensor:
        local = self.local_embed(words)
        glob = self.global_embed(masked_mean(words, mask, 1))
        weights = masked_softmax(self.attn_score(local * glob.unsqueeze(1)).squeeze(-1), mask, dim=1)
        return l2norm((weights.unsqueeze(-1) * words).sum(1))


class CaptionwiseBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(1)`` of the SAF gate, with the original's training statistics.

    The original scores one caption at a time against all images, so in training mode each caption's gate values are
    normalised with their own statistics (over the images and the caption's L+1 nodes), and the running statistics
    take one momentum update per caption, in caption order. This reproduces that on the dense ``[A, C, K]`` layout
    (captions on axis -2) in closed form. In eval mode it is the ordinary affine map with the running statistics.
    """

    def __init__(self):
        super().__init__(1)

    def forward(self, t: Tensor, node_mask: Tensor) -> Tensor:
        if not self.training:
            scale = self.weight / torch.sqrt(self.running_var + self.eps)
            return (t - self.running_mean) * scale + self.bias
        if t.dim() < 2:
            raise RuntimeError("CaptionwiseBatchNorm needs the [images, captions, nodes] layout in training mode")
        m = node_mask.expand_as(t).to(t.dtype)
        dims = [d for d in range(t.dim()) if d != t.dim() - 2]
        count = m.sum(dims, keepdim=True)
        mean = (t * m).sum(dims, keepdim=True) / count
        var = ((t - mean).pow(2) * m).sum(dims, keepdim=True) / count
        out = (t - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                mu, n = mean.flatten(), count.flatten()
                unbiased = var.flatten() * n / (n - 1).clamp_min(1)
                steps = mu.numel()
                keep = (1 - self.momentum) ** torch.arange(steps - 1, -1, -1, device=t.device, dtype=torch.float64)
                decay = (1 - self.momentum) ** steps
                self.running_mean.mul_(decay).add_((self.momentum * keep * mu.double()).sum().to(t.dtype))
                self.running_var.mul_(decay).add_((self.momentum * keep * unbiased.double()).sum().to(t.dtype))
                self.num_batches_tracked.add_(steps)
        return out


@register_head("saf")
class SAFHead(nn.Module):
    """Similarity attention filtration: gate each alignment node, l1-normalise the gates, pool, l2norm.

    ``t = l1norm(sigmoid(BN(Linear(sim_emb))))`` over the real nodes; ``vec = l2norm(sum_k t_k sim_emb_k)``.
    Shapes: ``sim_emb [..., K, m]``, ``node_mask [..., K]`` -> ``[..., m]``.
    """

    def __init__(self, sim_dim: int, sgr_step: int = 3):
        super().__init__()
        self.gate = xavier_linear(nn.Linear(sim_dim, 1))
        self.norm = CaptionwiseBatchNorm()

    def forward(self, sim_emb: Tensor, node_mask: Tensor) -> Tensor:
        gate = torch.sigmoid(self.norm(self.gate(sim_emb).squeeze(-1), node_mask)) * node_mask
        gate = gate / (gate.sum(-1, keepdim=True) + 1e-8)
        return l2norm((gate.unsqueeze(-1) * sim_emb).sum(-2))


class SGRStep(nn.Module):
    """One similarity-graph reasoning step: ``E = softmax_rows(q(x) k(x)^T)``, ``x' = ReLU(W (E x))``."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.key = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.update = xavier_linear(nn.Linear(sim_dim, sim_dim))

    def forward(self, x: Tensor, node_mask: Tensor) -> Tensor:
        edges = masked_softmax(self.query(x) @ self.key(x).transpose(-1, -2), node_mask.unsqueeze(-2), dim=-1)
        return F.relu(self.update(edges @ x))


@register_head("sgr")
class SGRHead(nn.Module):
    """Similarity graph reasoning: ``sgr_step`` steps of dense message passing on the complete graph of the L+1
    alignment nodes (padded nodes masked out as sources); the reasoned global node is the similarity vector."""

    def __init__(self, sim_dim: int, sgr_step: int = 3):
        super().__init__()
        self.steps = nn.ModuleList(SGRStep(sim_dim) for _ in range(sgr_step))

    def forward(self, sim_emb: Tensor, node_mask: Tensor) -> Tensor:
        x = sim_emb
        for step in self.steps:
            x = step(x, node_mask)
        return x[..., 0, :]


class SimilarityModule(nn.Module):
    """Cross attention, local and global alignment, a registered head, and the final sigmoid score."""

    def __init__(self, embed_size: int, sim_dim: int, num_regions: int = 36, head: str = "saf", sgr_step: int = 3,
                 lambda_softmax: float = 9.0, sa_dropout: float = 0.4):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown similarity head {head!r}; choose one of {', '.join(sorted(HEADS))}")
        self.lambda_softmax = lambda_softmax
        self.visual_sa = VisualSA(embed_size, sa_dropout, num_regions)
        self.text_sa = TextSA(embed_size, sa_dropout)
        self.loc_proj = xavier_linear(nn.Linear(embed_size, sim_dim))
        self.glo_proj = xavier_linear(nn.Linear(embed_size, sim_dim))
        self.head = HEADS[head](sim_dim, sgr_step)
        self.score_proj = xavier_linear(nn.Linear(sim_dim, 1))

    def cross_attention(self, regions: Tensor, words: Tensor, mask: Tensor) -> Tensor:
        """Word-to-region attention (SCAN t2i, MODEL.md §2 step 1): ``[..., R, d], [..., L, d] -> [..., L, R]``."""
        s = F.leaky_relu(regions @ words.transpose(-1, -2), 0.1) * mask.unsqueeze(-2)   # [..., R, L]
        s = l2norm(s, dim=-1)
        return torch.softmax(self.lambda_softmax * s, dim=-2).transpose(-1, -2)

    def align(self, regions: Tensor, img_glo: Tensor, words: Tensor, mask: Tensor, cap_glo: Tensor) -> tuple[Tensor, Tensor]:
        """Alignment nodes ``[..., L+1, m]`` (node 0 global) and their mask ``[..., L+1]``."""
        attn = self.cross_attention(regions, words, mask)
        context = l2norm(attn @ regions)                                              # [..., L, d]
        local = l2norm(self.loc_proj((context - words).pow(2)))
        glob = l2norm(self.glo_proj((img_glo - cap_glo).pow(2)))
        sim_emb = torch.cat([glob.unsqueeze(-2), local], dim=-2)
        node_mask = torch.cat([mask.new_ones(mask.shape[:-1] + (1,)), mask], dim=-1).expand(sim_emb.shape[:-1])
        return sim_emb, node_mask

    def forward(self, regions: Tensor, img_glo: Tensor, words: Tensor, mask: Tensor, cap_glo: Tensor) -> Tensor:
        """Scores of broadcast pairs: ``regions [..., R, d]``, ``img_glo [..., d]``, ``words [..., L, d]``,
        ``mask [..., L]``, ``cap_glo [..., d]`` -> ``[...]`` in (0, 1)."""
        sim_emb, node_mask = self.align(regions, img_glo, words, mask, cap_glo)
        vec = self.head(sim_emb, node_mask)
        # the final score in float32 even under autocast: bf16 has ~3 significant digits near 0.5, so reduced-precision
        # scores would tie and ties count against the query in the ranking
        with torch.autocast(device_type=vec.device.type, enabled=False):
            return torch.sigmoid(self.score_proj(vec.to(self.score_proj.weight.dtype))).squeeze(-1)
