"""The per-pair part (MODEL.md §2): global vectors, word-to-region attention, alignments and the similarity heads.

Everything here works on dense padded tensors whose leading axes *broadcast*: the scorer passes
``regions [A, 1, R, d]`` with ``words [1, C, L, d]`` to score A images against C captions at once (no loop over
captions, no repetition of a caption per image), or ``[P, R, d]`` with ``[P, L, d]`` to score P given pairs.
Padded words are masked out of every normalisation, softmax and mean, so a pair's score does not depend on the other
pairs it is computed with.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .functional import l2norm, masked_mean, masked_softmax
from .layers import xavier_linear

HEADS: dict[str, type[nn.Module]] = {}


# --------------------------------------------------------------------------- fast exact float32 GEMMs on the CPU
# On the CPU, ``F.linear`` / ``torch.mm`` in float32 go to MKL's sgemm, while oneDNN (``mkldnn``) has its own JIT
# kernels; on the AMD EPYC of the benchmarks oneDNN's float32 GEMM ran 2.0-2.2x faster than MKL's at the scorer's
# shapes, with the same float32 arithmetic (no reduced precision; see benchmarks/NOTES.md). ``linear`` below uses it for
# float32 CPU tensors outside autocast when it is available and passes a self-check, else ``F.linear``.
# HSC_ONEDNN_LINEAR=0 in the environment turns it off.
_ONEDNN: bool | None = None


def _onednn_available() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get("HSC_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise
                g = torch.Generator().manual_seed(0)
                x, w, b, c = (torch.randn(s, generator=g) for s in ((37, 70), (19, 70), (19,), (37, 19)))
                ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
                # strided (transposed) operands, as the backward pass gives them
                ok = ok and torch.allclose(op(x.t(), c.t(), None, "none", [], ""), x.t() @ c, atol=1e-5, rtol=1e-5)
                _ONEDNN = bool(ok)
            except (AttributeError, RuntimeError):
                _ONEDNN = False
    return _ONEDNN


def _mm_t(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b.T (+ bias)`` for 2-D float32 CPU tensors through oneDNN (strided operands are fine)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN GEMMs forward and backward (input ``[..., K]``, weight ``[M, K]``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return _mm_t(x2, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.size(0))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g2, weight.t()).view(ctx.in_shape)          # g @ W
        if ctx.needs_input_grad[1]:
            gw = _mm_t(g2.t(), x2.t())                             # g^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def _fast(*tensors: Tensor) -> bool:
    t = tensors[0]
    return (t.device.type == "cpu" and all(u.dtype == torch.float32 for u in tensors if u is not None)
            and not torch.is_autocast_enabled("cpu") and t.numel() > 0 and _onednn_available())


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN on the CPU in float32 (exact float32; see above)."""
    if weight.size(0) >= 16 and _fast(x, weight, bias):    # (a matrix-vector product gains nothing)
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def apply_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return linear(x, layer.weight, layer.bias)


class _LocalAlignment(torch.autograd.Function):
    """``loc_proj((l2norm(attn @ regions) - words)^2)`` (before the final l2norm), for training.

    ``attn [A, P, R]``, ``regions [A, R, d]``, ``words [P, d]`` (the same for every image), ``weight [m, d]``,
    ``bias [m]`` -> ``[A, P, m]``. Plain autograd would keep four ``[A, P, d]`` tensors per block until the backward
    pass (the context, its normalised form, the difference and its square); this keeps only the attention
    ``[A, P, R]`` and the norms, and recomputes the context in the backward pass (one product with K = R). The
    gradients are the analytic ones of the same formula (checked against autograd in float64).
    """

    @staticmethod
    def forward(ctx, attn: Tensor, regions: Tensor, words: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        context = torch.bmm(attn, regions)
        norm = torch.linalg.vector_norm(context, dim=-1, keepdim=True)
        inv = 1.0 / (norm + EPS)
        x = torch.addcmul(words, context, inv, value=-1, out=context).square_()     # (l2norm(context) - words)^2
        ctx.save_for_backward(attn, regions, words, weight, norm, inv)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        attn, regions, words, weight, norm, inv = ctx.saved_tensors
        c = torch.bmm(attn, regions).mul_(inv)                                         # l2norm(context)
        diff = c - words
        x = diff.square()
        n_img, n_pos, dim = c.shape
        g2 = grad.reshape(-1, grad.size(-1))
        g_weight = linear(g2.t(), x.reshape(-1, dim).t()) if ctx.needs_input_grad[3] else None
        g_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        del x
        g = linear(grad, weight.t()).mul_(diff).mul_(2)                                # d loss / d l2norm(context)
        del diff
        g_words = -g.sum(0) if ctx.needs_input_grad[2] else None
        # through the l2norm x / (|x| + eps): g_x = inv * (g - c * (c . g) * (|x| + eps) / |x|)
        scale = (c * g).sum(-1, keepdim=True) / (norm * inv)
        scale = torch.where(norm > 0, scale, torch.zeros_like(scale))
        g = g.addcmul_(c, scale, value=-1).mul_(inv)
        del c
        g_attn = torch.bmm(g, regions.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        g_regions = torch.bmm(attn.transpose(1, 2), g) if ctx.needs_input_grad[1] else None
        return g_attn, g_regions, g_words, g_weight, g_bias


class FastLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (oneDNN for float32 on the CPU). Same parameters and state dict;
    :func:`use_fast_linears` turns a model's plain ``nn.Linear`` modules into this class in place."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_fast_linears(module: nn.Module) -> nn.Module:
    """Make every plain ``nn.Linear`` inside ``module`` a :class:`FastLinear` (the class only: weights, names and
    hooks stay). The encoders' relational layers spend most of a training step in such products."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = FastLinear
    return module


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
        self._pending: list[tuple[Tensor, Tensor, Tensor]] | None = None
        self._keys: Tensor | None = None

    @contextlib.contextmanager
    def deferred_updates(self) -> Iterator[None]:
        """Collect the running-statistics updates of the training calls inside and apply them at the end, one
        momentum update per caption, in the order of the keys given by :meth:`set_keys` before each call.

        The scorer uses this to compute caption blocks in order of length (less padding) while the running statistics
        still see the captions in their batch order, as the original's per-caption loop does.
        """
        if self._pending is not None:     # nested: the outer context applies them
            yield
            return
        self._pending = []
        try:
            yield
            pending = self._pending
        finally:
            self._pending, self._keys = None, None
        if pending:
            keys = torch.cat([k for k, _, _ in pending])
            order = torch.argsort(keys, stable=True)
            self._update_running(torch.cat([m for _, m, _ in pending])[order],
                                 torch.cat([v for _, _, v in pending])[order])

    def set_keys(self, keys: Tensor) -> None:
        """Sort keys (int64, one per caption) of the captions of the next call inside :meth:`deferred_updates`."""
        self._keys = keys

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
                if self._pending is not None:
                    keys = self._keys
                    if keys is None:          # no keys: call order, then caption order
                        base = sum(k.numel() for k, _, _ in self._pending)
                        keys = torch.arange(base, base + mu.numel(), device=mu.device) + (1 << 62)
                    self._pending.append((keys.to(mu.device), mu, unbiased))
                    self._keys = None
                else:
                    self._update_running(mu, unbiased)
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
        gate = torch.sigmoid(self.norm(apply_linear(self.gate, sim_emb).squeeze(-1), node_mask)) * node_mask
        gate = gate / (gate.sum(-1, keepdim=True) + 1e-8)
        return l2norm(torch.matmul(gate.unsqueeze(-2), sim_emb).squeeze(-2))


class SGRStep(nn.Module):
    """One similarity-graph reasoning step: ``E = softmax_rows(q(x) k(x)^T)``, ``x' = ReLU(W (E x))``."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.key = xavier_linear(nn.Linear(sim_dim, sim_dim))
        self.update = xavier_linear(nn.Linear(sim_dim, sim_dim))

    def forward(self, x: Tensor, node_mask: Tensor) -> Tensor:
        # q_i . k_j = x_i^T Wq^T Wk x_j + (Wk^T bq) . x_j + (terms constant along row i, which the row softmax
        # cancels exactly), so the logits are z @ x^T with z = x (Wq^T Wk) + Wk^T bq: one m x m product per node
        # instead of two (SGR spends most of its time in these products)
        weight = (self.query.weight.t() @ self.key.weight).t()
        bias = self.key.weight.t() @ self.query.bias
        z = linear(x, weight, bias)
        edges = masked_softmax(z @ x.transpose(-1, -2), node_mask.unsqueeze(-2), dim=-1)
        return F.relu(apply_linear(self.update, edges @ x))


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
        s = s / (torch.linalg.vector_norm(s, dim=-1, keepdim=True) + EPS)               # l2norm over the words
        return torch.softmax(self.lambda_softmax * s, dim=-2).transpose(-1, -2)

    def local_alignment(self, context: Tensor, words: Tensor) -> Tensor:
        """``l2norm(loc_proj((l2norm(context) - words)^2))``: ``[..., L, d]`` (broadcast) -> ``[..., L, m]``.

        The ``[..., L, d]`` tensors are the largest of the scorer; without autograd the normalisation, difference and
        square run in place on ``context`` (a temporary the caller hands over) and allocate nothing.
        """
        return _l2norm(apply_linear(self.loc_proj, self._squared_difference(context, words)))

    @staticmethod
    def _squared_difference(context: Tensor, words: Tensor) -> Tensor:
        """``(l2norm(context) - words)^2``; without autograd in place on ``context`` (two passes, no allocation)."""
        inv = 1.0 / (torch.linalg.vector_norm(context, dim=-1, keepdim=True) + EPS)
        if _no_grad(context, words):
            # words - context * inv = -(l2norm(context) - words), the same rounding; its square is the same number
            return torch.addcmul(words, context, inv, value=-1, out=context).square_()
        return (context * inv - words).square()

    def global_alignment(self, img_glo: Tensor, cap_glo: Tensor) -> Tensor:
        """``l2norm(glo_proj((img_glo - cap_glo)^2))`` (broadcast) -> ``[..., m]``."""
        return _l2norm(apply_linear(self.glo_proj, (img_glo - cap_glo).square()))

    @staticmethod
    def _nodes(glob: Tensor, local: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        sim_emb = torch.cat([glob.unsqueeze(-2).to(local.dtype), local], dim=-2)
        node_mask = torch.cat([mask.new_ones(mask.shape[:-1] + (1,)), mask], dim=-1).expand(sim_emb.shape[:-1])
        return sim_emb, node_mask

    def _final(self, sim_emb: Tensor, node_mask: Tensor) -> Tensor:
        vec = self.head(sim_emb, node_mask)
        # the final score in float32 even under autocast: bf16 has ~3 significant digits near 0.5, so reduced-precision
        # scores would tie and ties count against the query in the ranking
        with torch.autocast(device_type=vec.device.type, enabled=False):
            return torch.sigmoid(apply_linear(self.score_proj, vec.to(self.score_proj.weight.dtype))).squeeze(-1)

    def _local_nodes_cpu(self, regions: Tensor, attn: Tensor, words_2d: Tensor, glob: Tensor, n_cap: int,
                         length: int) -> Tensor:
        """CPU, no autograd: the nodes ``[A, C, L+1, m]`` of a block, one image at a time, in reused buffers.

        Per image the context ``[C*L, d]`` is written into one reused buffer, normalised, differenced and squared in
        place, projected, and its l2-normalised projection written straight into the node tensor (also reused): no
        stack, no concatenation, and no large allocation per image, whose page faults and heap trimming cost more
        than the arithmetic around them (NOTES.md).
        """
        n_img = regions.size(0)
        context = _workspace("context", (n_cap * length, regions.size(-1)), regions)
        sim_emb = _workspace("nodes", (n_img, n_cap, length + 1, glob.size(-1)), glob)
        sim_emb[:, :, 0] = glob
        for a in range(n_img):
            torch.mm(attn[a], regions[a], out=context)
            local = apply_linear(self.loc_proj, self._squared_difference(context, words_2d)).view(n_cap, length, -1)
            torch.div(local, torch.linalg.vector_norm(local, dim=-1, keepdim=True).add_(EPS), out=sim_emb[a, :, 1:])
        return sim_emb

    def score_outer(self, regions: Tensor, img_glo: Tensor, words: Tensor, mask: Tensor, cap_glo: Tensor) -> Tensor:
        """Every image against every caption: ``regions [A, R, d]``, ``img_glo [A, d]``, ``words [C, L, d]``,
        ``mask [C, L]``, ``cap_glo [C, d]`` -> ``[A, C]``; the same numbers as :meth:`forward` on the broadcast
        ``[A, 1, ...]`` x ``[1, C, ...]`` pairs, in matmul-friendly layouts.

        The word-region products of all pairs are ONE matrix product ``[A*R, d] @ [d, C*L]`` and the attended context
        one product ``[C*L, R] @ [R, d]`` per image, so no operand is expanded (copied) per pair. The only per-pair
        ``[C, L, d]`` tensors are the context and its squared difference with the words, which go straight into the
        ``loc_proj`` product: on the CPU one image at a time (they stay in cache), elsewhere for the whole block.
        """
        n_img, n_reg, dim = regions.shape
        n_cap, length = mask.shape
        words_2d = words.reshape(n_cap * length, dim)
        # scores s[a, r, c, l] = regions[a, r] . words[c, l]
        s = linear(regions.reshape(n_img * n_reg, dim), words_2d).view(n_img, n_reg, n_cap, length)
        s = F.leaky_relu(s, 0.1) * mask.to(s.dtype)
        s = s / (torch.linalg.vector_norm(s, dim=-1, keepdim=True) + EPS)             # l2norm over each caption's words
        attn = torch.softmax(self.lambda_softmax * s, dim=1)                            # over regions
        attn = attn.view(n_img, n_reg, n_cap * length).transpose(1, 2)                 # [A, C*L, R] (strided)
        if not torch.is_grad_enabled() and _fast(regions, words):
            glob = self.global_alignment(img_glo.unsqueeze(1), cap_glo.unsqueeze(0))     # [A, C, m]
            sim_emb = self._local_nodes_cpu(regions, attn, words_2d, glob, n_cap, length)
            node_mask = torch.cat([mask.new_ones(n_cap, 1), mask], dim=-1).unsqueeze(0).expand(sim_emb.shape[:-1])
        else:
            if torch.is_grad_enabled() and not torch.is_autocast_enabled(regions.device.type):
                local = _l2norm(_LocalAlignment.apply(attn, regions, words_2d, self.loc_proj.weight,
                                                      self.loc_proj.bias))                # [A, C*L, m]
                local = local.view(n_img, n_cap, length, -1)
            else:
                context = torch.bmm(attn, regions)                                       # [A, C*L, d]
                local = self.local_alignment(context.view(n_img, n_cap, length, dim), words.unsqueeze(0))
            glob = self.global_alignment(img_glo.unsqueeze(1), cap_glo.unsqueeze(0))     # [A, C, m]
            sim_emb, node_mask = self._nodes(glob, local, mask.unsqueeze(0))
        return self._final(sim_emb, node_mask)

EPS = 1e-8
_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A reused scratch tensor of ``shape`` (no autograd only; the scorer is not reentrant). Grows, never shrinks;
    :func:`release_workspace` frees it."""
    key = (name, like.dtype, like.device)
    numel = 1
    for n in shape:
        numel *= n
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free the scorer's reused CPU buffers (a few tens of MB at most)."""
    _WORKSPACE.clear()


def _l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """``x / (sqrt(sum x^2) + 1e-8)`` (MODEL.md's l2norm) with the norm taken in one pass."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + EPS)


def _no_grad(*tensors: Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
