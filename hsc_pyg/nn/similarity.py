"""The per-pair part of the model (MODEL.md §2), the reference for every scorer of the project.

Read top to bottom, as MODEL.md §2: the global vectors (:class:`VisualSA`, :class:`TextSA`, computed once per item),
then per pair: :func:`cross_attention` (words attend to regions), :func:`attended_context`, :func:`local_alignment`,
:func:`global_alignment`, the nodes of the similarity graph (:func:`similarity_nodes`), a head (:class:`SAFHead` or
:class:`SGRHead`, registered by name in :data:`HEADS`) and the final score. :meth:`SimilarityModule.forward` scores
every image of a block against every caption; scoring, training, re-ranking and the pictures all go through it (the
pictures show :func:`cross_attention`).

The functions work on dense padded tensors whose leading axes broadcast: ``regions [A, 1, R, d]`` with
``words [1, C, L, d]`` are the A x C pairs of a block. Padded words are masked out of every normalisation, softmax and
mean, so a pair's score does not depend on the pairs it is computed with.

:mod:`hsc_pyg.nn.kernels` holds faster versions of these steps (one matrix product for all pairs, fused local
alignment, ...) that compute the same numbers; the module's ``kernels`` switch (``"auto"`` or ``"reference"``) picks
them or the plain formulas here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import Registry
from .functional import l2norm, masked_mean, masked_softmax
from .kernels import Kernels, image_runs
from .init import xavier_linear

#: Similarity heads by name (``head=name``): :class:`SimilarityHead` subclasses.
HEADS: Registry[type["SimilarityHead"]] = Registry("similarity head")
register_head = HEADS.register


# --------------------------------------------------------------------------- global vectors (once per item)
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


# --------------------------------------------------------------------------- per pair: steps 1-4
def cross_attention(regions: Tensor, words: Tensor, mask: Tensor, lambda_softmax: float,
                    kernels: Kernels | None = None) -> Tensor:
    """Step 1, words attend to regions (SCAN text-to-image): ``regions [..., R, d]``, ``words [..., L, d]``,
    ``mask [..., L]`` -> attention ``[..., L, R]`` (each word's row sums to 1 over the regions).

    ``s = LeakyReLU_0.1(regions @ words^T)`` ``[..., R, L]`` over the real words, l2-normalised over the words, then
    ``softmax_regions(lambda * s)``. With fused ``kernels`` and every image against every caption
    (``regions [A, 1, R, d]``, ``words [1, C, L, d]``), the products are one matrix product
    (:meth:`Kernels.pair_products`); the rest is the same.
    """
    if kernels is not None and kernels.fused:
        s = kernels.pair_products(regions, words)
    else:
        s = regions @ words.transpose(-1, -2)
    s = F.leaky_relu(s, 0.1) * mask.unsqueeze(-2).to(s.dtype)
    s = l2norm(s, dim=-1)
    return torch.softmax(lambda_softmax * s.transpose(-1, -2), dim=-1)


def pad_words(words: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Captions' words back to back ``[T, d]`` (caption p has ``lengths[p]``) -> padded ``[P, L, d]`` (zero at
    padding) and the mask ``[P, L]``, L the longest caption."""
    longest = int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(longest, device=lengths.device)[None] < lengths[:, None]
    padded = words.new_zeros(*mask.shape, words.size(-1))
    padded[mask] = words
    return padded, mask


def attended_context(attn: Tensor, regions: Tensor) -> Tensor:
    """Step 1, the attended regions per word: ``l2norm(attn @ regions)``, ``[..., L, R], [..., R, d] -> [..., L, d]``."""
    return l2norm(attn @ regions)


def local_alignment(context: Tensor, words: Tensor, proj: nn.Linear) -> Tensor:
    """Step 2: ``l2norm(proj((context - words)^2))``, ``[..., L, d]`` -> ``[..., L, m]``."""
    return l2norm(proj((context - words).square()))


def global_alignment(img_glo: Tensor, cap_glo: Tensor, proj: nn.Linear) -> Tensor:
    """Step 3: ``l2norm(proj((img_glo - cap_glo)^2))``, ``[..., d]`` -> ``[..., m]``."""
    return l2norm(proj((img_glo - cap_glo).square()))


def similarity_nodes(sim_glo: Tensor, sim_loc: Tensor) -> Tensor:
    """Step 4: the nodes of the similarity graph ``[sim_glo; sim_loc]``: ``[..., m], [..., L, m] -> [..., L+1, m]``
    (node 0 is the global alignment)."""
    return torch.cat([sim_glo.unsqueeze(-2).to(sim_loc.dtype), sim_loc], dim=-2)


def similarity_node_mask(mask: Tensor) -> Tensor:
    """The real nodes of the similarity graph of captions whose real words are ``mask [..., L]``: ``[..., L+1]``
    (the global node always, then the words)."""
    return torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)


# --------------------------------------------------------------------------- step 5: the heads
class CaptionwiseBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(1)`` of the SAF gate, with the original's training statistics.

    The original scores one caption at a time against all images, so in training mode each caption's gate values are
    normalised with their own statistics (over the images and the caption's L+1 nodes), and the running statistics
    take one momentum update per caption, in caption order. This reproduces that on the dense ``[A, C, K]`` layout
    (captions on axis -2) in closed form. In eval mode it is the ordinary affine map with the running statistics.
    """

    def __init__(self):
        super().__init__(1)
        self._pending: list[tuple[list, Tensor, Tensor]] | None = None
        self._next: list | None = None

    @contextlib.contextmanager
    def deferred_updates(self) -> Iterator[None]:
        """Collect the running-statistics updates of the training calls inside and apply them at the end, one
        momentum update per caption, ordered by the ``(level, position)`` that :meth:`next_captions` gives each.

        The scorer uses this to compute caption blocks in order of length (less padding) while the running statistics
        still see the captions in their batch order, as the original's per-caption loop does.
        """
        self._pending = []
        try:
            yield
            pending = self._pending
        finally:
            self._pending, self._next = None, None
        if pending:
            keys = [key for keys, _, _ in pending for key in keys]
            order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), device=pending[0][1].device)
            self._update_running(torch.cat([m for _, m, _ in pending])[order],
                                 torch.cat([v for _, _, v in pending])[order])

    def next_captions(self, level: int, positions: Tensor) -> None:
        """Inside :meth:`deferred_updates`: the captions of the next call are at ``positions`` (int ``[C]``) of the
        batch and at alignment level ``level``."""
        self._next = [(level, p) for p in positions.tolist()]

    def _update_running(self, mu: Tensor, unbiased: Tensor) -> None:
        """Sequential momentum updates with ``mu[0], mu[1], ...`` (and the variances), in closed form."""
        with torch.no_grad():
            steps = mu.numel()
            keep = (1 - self.momentum) ** torch.arange(steps - 1, -1, -1, device=mu.device, dtype=torch.float64)
            decay = (1 - self.momentum) ** steps
            dtype = self.running_mean.dtype
            self.running_mean.mul_(decay).add_((self.momentum * keep * mu.double()).sum().to(dtype))
            self.running_var.mul_(decay).add_((self.momentum * keep * unbiased.double()).sum().to(dtype))
            self.num_batches_tracked.add_(steps)

    def forward(self, t: Tensor, node_mask: Tensor) -> Tensor:
        """``t [..., C, K]`` (gate logits of C captions' K nodes), ``node_mask`` broadcast to it -> the same shape."""
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
                mu, n = mean.flatten().detach(), count.flatten()
                unbiased = var.flatten().detach() * n / (n - 1).clamp_min(1)
                if self._pending is None:
                    self._update_running(mu, unbiased)
                elif self._next is None or len(self._next) != mu.numel():
                    raise RuntimeError("CaptionwiseBatchNorm.deferred_updates: call next_captions before each call")
                else:
                    self._pending.append((self._next, mu, unbiased))
                    self._next = None
        return out


class SimilarityHead(nn.Module):
    """Step 5, a head: ``forward(sim_emb [..., K, m], node_mask [..., K], kernels) -> [..., m]``. Its constructor takes
    ``sim_dim`` and, by keyword, the head options it uses (``sgr_step``). :meth:`caption_norm` is the head's caption-wise
    BatchNorm, whose training statistics the scorer orders (None: the head has none)."""

    def caption_norm(self) -> CaptionwiseBatchNorm | None:
        return None


@register_head("saf")
class SAFHead(SimilarityHead):
    """Similarity attention filtration: gate each alignment node, l1-normalise the gates, pool, l2norm.

    ``t = l1norm(sigmoid(BN(Linear(sim_emb))))`` over the real nodes; ``vec = l2norm(sum_k t_k sim_emb_k)``.
    Shapes: ``sim_emb [..., K, m]``, ``node_mask [..., K]`` -> ``[..., m]``.
    """

    def __init__(self, sim_dim: int):
        super().__init__()
        self.gate = xavier_linear(nn.Linear(sim_dim, 1))
        self.norm = CaptionwiseBatchNorm()

    def caption_norm(self) -> CaptionwiseBatchNorm:
        return self.norm

    def forward(self, sim_emb: Tensor, node_mask: Tensor, kernels: Kernels) -> Tensor:
        gate = torch.sigmoid(self.norm(self.gate(sim_emb).squeeze(-1), node_mask)) * node_mask
        gate = gate / (gate.sum(-1, keepdim=True) + 1e-8)                               # l1norm (gates are > 0)
        return l2norm(torch.matmul(gate.unsqueeze(-2), sim_emb).squeeze(-2))


class SGRStep(nn.Module):
    """One similarity-graph reasoning step: ``E = softmax_rows(q(x) k(x)^T)``, ``x' = ReLU(W (E x))``."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.key = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.update = xavier_linear(nn.Linear(sim_dim, sim_dim))

    def forward(self, x: Tensor, node_mask: Tensor, kernels: Kernels) -> Tensor:
        if kernels.fused:
            logits = kernels.sgr_logits(x, self.query, self.key)
        else:
            logits = self.query(x) @ self.key(x).transpose(-1, -2)
        edges = masked_softmax(logits, node_mask.unsqueeze(-2), dim=-1)
        return F.relu(kernels.linear(edges @ x, self.update.weight, self.update.bias))


@register_head("sgr")
class SGRHead(SimilarityHead):
    """Similarity graph reasoning: ``sgr_step`` steps of dense message passing on the complete graph of the L+1
    alignment nodes (padded nodes masked out as sources); the reasoned global node is the similarity vector."""

    def __init__(self, sim_dim: int, sgr_step: int = 3):
        super().__init__()
        self.steps = nn.ModuleList(SGRStep(sim_dim) for _ in range(sgr_step))

    def forward(self, sim_emb: Tensor, node_mask: Tensor, kernels: Kernels) -> Tensor:
        x = sim_emb
        for step in self.steps:
            x = step(x, node_mask, kernels)
        return x[..., 0, :]


# --------------------------------------------------------------------------- the whole per-pair part
class SimilarityModule(nn.Module):
    """Cross attention, local and global alignment, a registered head and the final sigmoid score.

    ``kernels``: ``"auto"`` (the faster steps of :mod:`hsc_pyg.nn.kernels` where they apply) or ``"reference"`` (the
    plain functions of this file); both give the same scores. :meth:`set_kernels` changes it.
    """

    def __init__(self, embed_size: int, sim_dim: int, num_regions: int = 36, head: str = "saf", sgr_step: int = 3,
                 lambda_softmax: float = 9.0, sa_dropout: float = 0.4, kernels: str = "auto"):
        super().__init__()
        self.lambda_softmax = lambda_softmax
        self.visual_sa = VisualSA(embed_size, sa_dropout, num_regions)
        self.text_sa = TextSA(embed_size, sa_dropout)
        self.loc_proj = xavier_linear(nn.Linear(embed_size, sim_dim))
        self.glo_proj = xavier_linear(nn.Linear(embed_size, sim_dim))
        options = {"sgr_step": sgr_step}
        self.head = HEADS.build(head, sim_dim, **{k: v for k, v in options.items()
                                                   if k in HEADS.accepted_arguments(head, skip=1)})
        self.score_proj = xavier_linear(nn.Linear(sim_dim, 1))
        self.kernels = Kernels(kernels)

    def set_kernels(self, mode: str) -> None:
        """``"auto"`` or ``"reference"`` (see the class docstring)."""
        self.kernels = Kernels(mode)

    def forward(self, regions: Tensor, img_glo: Tensor, words: Tensor, mask: Tensor, cap_glo: Tensor) -> Tensor:
        """Every image against every caption (MODEL.md §2 steps 1-6): ``regions [A, R, d]``, ``img_glo [A, d]``,
        ``words [C, L, d]`` (zero at padding), ``mask [C, L]``, ``cap_glo [C, d]`` -> scores ``[A, C]``."""
        sim_glo = global_alignment(img_glo.unsqueeze(1), cap_glo.unsqueeze(0), self.glo_proj)     # [A, C, m]
        if self.kernels.fused:
            words = words.contiguous()       # (a trimmed block is a strided view; the kernels flatten it twice)
        attn = cross_attention(regions.unsqueeze(1), words.unsqueeze(0), mask.unsqueeze(0), self.lambda_softmax,
                               self.kernels)                                                      # [A, C, L, R]
        # the words of all captions as one axis: one product per image
        n_img, n_cap, length, n_reg = attn.shape
        attn, words = attn.reshape(n_img, n_cap * length, n_reg), words.reshape(n_cap * length, -1)
        if self.kernels.fuses_alignment(regions):
            sim_loc = self.kernels.local_alignment(attn, regions, words, self.loc_proj)
        else:
            sim_loc = local_alignment(attended_context(attn, regions), words, self.loc_proj)       # [A, C*L, m]
        nodes = similarity_nodes(sim_glo, sim_loc.view(n_img, n_cap, length, -1))                # [A, C, L+1, m]
        return self.final_score(self.head(nodes, similarity_node_mask(mask), self.kernels))

    def score_pairs(self, regions: Tensor, img_glo: Tensor, words: Tensor, lengths: Tensor, images: Tensor,
                    cap_glo: Tensor) -> Tensor:
        """Scores of P given pairs (eval mode, no autograd), the same numbers as :meth:`forward` at those pairs:
        ``regions [N, R, d]`` (all images), ``img_glo [P, d]`` (each pair's image), ``words [T, d]`` (each pair's
        caption's words, back to back), ``lengths [P]``, ``images [P]`` (each pair's image index into ``regions``;
        keep one image's pairs adjacent), ``cap_glo [P, d]`` -> ``[P]``."""
        sim_glo = global_alignment(img_glo, cap_glo, self.glo_proj)                              # [P, m]
        if self.kernels.fused:                 # each run of one image's pairs: one product, words kept packed
            runs = image_runs(images, lengths)
            attn = torch.cat([self._run_attention(regions[image], words[t0:t1], lengths[a:b])
                              for image, a, b, t0, t1 in runs])                                  # [T, R]
            sim_loc, mask = pad_words(self.kernels.packed_local_alignment(attn, regions, words, runs, self.loc_proj),
                                      lengths)                                                   # [P, L, m]
        else:                                    # the pairs padded, each with its own image: MODEL.md's formulas
            padded, mask = pad_words(words, lengths)
            attn = cross_attention(regions[images], padded, mask, self.lambda_softmax)
            sim_loc = local_alignment(attended_context(attn, regions[images]), padded, self.loc_proj)
        return self.final_score(self.head(similarity_nodes(sim_glo, sim_loc), similarity_node_mask(mask), self.kernels))

    def _run_attention(self, region: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """:func:`cross_attention` of one image ``region [R, d]`` with n captions, their words back to back
        ``[t, d]``, ``lengths [n]`` -> the real words' rows ``[t, R]``."""
        padded, mask = pad_words(words, lengths)
        attn = cross_attention(region[None, None], padded[None], mask[None], self.lambda_softmax, self.kernels)[0]
        return attn[mask]

    def final_score(self, vec: Tensor) -> Tensor:
        """Step 6: ``sigmoid(Linear(m -> 1)(vec))``, ``[..., m] -> [...]``, in float32 even under autocast: bf16 has ~3
        significant digits near 0.5, so reduced-precision scores would tie, and ties count against the query."""
        with torch.autocast(device_type=vec.device.type, enabled=False):
            return torch.sigmoid(self.score_proj(vec.to(self.score_proj.weight.dtype))).squeeze(-1)
