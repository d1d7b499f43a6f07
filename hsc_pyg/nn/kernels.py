"""Faster versions of the per-pair steps of :mod:`hsc_pyg.nn.similarity`, computing the same numbers.

``similarity.py`` is the reference: MODEL.md §2 written on broadcast pairs. The functions here compute the same steps
for *every image against every caption* of a block in layouts that suit matrix products, one function per step:

* :meth:`Kernels.linear`: ``F.linear``; on the CPU in float32 through oneDNN's GEMM when the private op
  ``torch.ops.mkldnn._linear_pointwise`` exists and passes a self-check (exact float32 arithmetic; 2.0-2.2x MKL's
  speed on the AMD EPYC of benchmarks/NOTES.md, the same speed as MKL on Intel Xeons). Any torch without the op, or
  where it fails the check, gets ``F.linear``.
* :meth:`Kernels.pair_products`: the word-region products of cross attention for all pairs as ONE matrix product
  ``[A*R, d] @ [d, C*L]`` (no operand expanded per pair); ``similarity.cross_attention`` does the rest.
* :meth:`Kernels.local_alignment`: the attended context and the local alignment fused (the similarity graph's nodes
  are then made by ``similarity.similarity_nodes``, as without kernels). Without autograd, the images whose context
  fits :data:`CPU_STEP_BYTES` (CPU) or the whole block (elsewhere) at a time in buffers owned by the call, in place;
  with autograd (outside autocast, see :meth:`Kernels.fuses_alignment`), :class:`LocalAlignment`, which recomputes the
  context in the backward pass instead of keeping it. All three write ``(l2norm(context) - words)^2`` with one
  function, :func:`difference_squared_`.
* :meth:`Kernels.packed_local_alignment`: the same for a list of given pairs (re-ranking, re-scoring), the words of
  their captions back to back without padding: one product per image for the context, one for the projection of all
  words.
* :meth:`Kernels.sgr_logits`: SGR's edge logits with the two projections folded into one.

A :class:`Kernels` object is the switch: ``Kernels("auto")`` uses these, ``Kernels("reference")`` makes the similarity
module call the plain formulas of ``similarity.py`` instead. Its settings do not change after it is made; its scratch
buffers belong to it and to the calling thread, so two models, or one model in two threads, never share one.
``tests/test_kernels.py`` checks each function against the reference.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .functional import l2norm

EPS = 1e-8
MODES = ("auto", "reference")
#: On the CPU, :meth:`Kernels.local_alignment` takes as many images per step as fit about this many bytes of attended
#: context (at least one): a block of many captions (64 of 15 words at d = 256: 960 KiB an image) goes one image at a
#: time, in cache; one query's caption against a shortlist (12 words: 12 KiB an image) in one or two steps instead of
#: one small product per image (the scoring of 50 images: 16.5 -> 5.0 ms of CPU time a query, benchmarks/NOTES.md).
CPU_STEP_BYTES = 512 * 2**10


def onednn_linear_works() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and computes ``F.linear`` (a self-check on small
    random operands, also with the strided operands the backward pass gives it)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b, c = (torch.randn(s, generator=g) for s in ((37, 70), (19, 70), (19,), (37, 19)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        return ok and torch.allclose(op(x.t(), c.t(), None, "none", [], ""), x.t() @ c, atol=1e-5, rtol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def _onednn_mm_t(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b.T (+ bias)`` for 2-D float32 CPU tensors through oneDNN (strided operands are fine)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN GEMMs forward and backward: ``x [..., K]``, ``weight [M, K]``, ``bias [M]``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        x2 = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.in_shape = x.shape
        return _onednn_mm_t(x2, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.size(0))
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_mm_t(g2, weight.t()).view(ctx.in_shape)          # g @ W
        if ctx.needs_input_grad[1]:
            gw = _onednn_mm_t(g2.t(), x2.t())                             # g^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


class Kernels:
    """The fused steps, or none of them: ``mode`` is ``"auto"`` or ``"reference"``.

    ``onednn`` forces the oneDNN linear on or off (``None``: on where :func:`onednn_linear_works`); it is only used in
    ``"auto"`` mode. ``fused`` tells the similarity module whether to call the methods below or its plain formulas.
    """

    def __init__(self, mode: str = "auto", onednn: bool | None = None):
        if mode not in MODES:
            raise ConfigError(f"kernels={mode!r} is unknown; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.fused = mode == "auto"
        self.onednn = self.fused and (onednn_linear_works() if onednn is None else bool(onednn))
        self._scratch = threading.local()

    def __getstate__(self) -> dict:      # copies and pickles carry the settings, not the buffers
        return {"mode": self.mode, "fused": self.fused, "onednn": self.onednn}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scratch = threading.local()

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A scratch tensor of ``shape`` reused by this thread's later calls (grows, never shrinks). Fresh large
        allocations per block cost page faults: reused buffers gave 15.7k -> 16.9k pairs/s (NOTES.md, row 5)."""
        store = self._scratch.__dict__
        key = (name, like.dtype, like.device)
        numel = math.prod(shape)
        buf = store.get(key)
        if buf is None or buf.numel() < numel:
            buf = store[key] = like.new_empty(numel)
        return buf[:numel].view(shape)

    def __repr__(self) -> str:
        return f"Kernels({self.mode!r}, onednn={self.onednn})"

    # ------------------------------------------------------------------ products
    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.linear(x, weight, bias)``; through oneDNN for float32 CPU tensors outside autocast when enabled (a
        matrix-vector product, ``weight`` with fewer than 16 rows, gains nothing and stays on ``F.linear``)."""
        if (self.onednn and weight.size(0) >= 16 and x.device.type == "cpu" and x.numel() > 0
                and all(t.dtype == torch.float32 for t in (x, weight, bias) if t is not None)
                and not torch.is_autocast_enabled("cpu")):
            return OneDNNLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)

    # ------------------------------------------------------------------ MODEL.md §2 steps 1-4, all pairs of a block
    def pair_products(self, regions: Tensor, words: Tensor) -> Tensor:
        """``regions @ words^T`` of every image with every caption (the products of ``similarity.cross_attention``)
        as ONE matrix product ``[A*R, d] @ [d, C*L]``: ``regions [A, 1, R, d]``, ``words [1, C, L, d]`` ->
        ``[A, C, R, L]`` (a strided view of an ``[A, R, C, L]`` tensor, no operand expanded per pair)."""
        n_img, _, n_reg, dim = regions.shape
        _, n_cap, length, _ = words.shape
        s = self.linear(regions.reshape(n_img * n_reg, dim), words.reshape(n_cap * length, dim))
        return s.view(n_img, n_reg, n_cap, length).transpose(1, 2)

    def fuses_alignment(self, regions: Tensor) -> bool:
        """Whether :meth:`local_alignment` replaces the attended context and the local alignment for ``regions``:
        in fused mode without autograd (in place) or with autograd outside autocast (:class:`LocalAlignment`)."""
        return self.fused and not (torch.is_grad_enabled() and torch.is_autocast_enabled(regions.device.type))

    def local_alignment(self, attn: Tensor, regions: Tensor, words: Tensor, proj: nn.Linear) -> Tensor:
        """``similarity.local_alignment(similarity.attended_context(attn, regions), words, proj)`` of every pair of
        a block, the two steps fused: ``attn [A, P, R]`` (the cross attention of the P words of the block's captions,
        back to back), ``regions [A, R, d]``, ``words [P, d]`` (the same for every image) -> ``[A, P, m]``; without
        autograd a scratch tensor of this thread, valid until its next call (``similarity_nodes`` copies it)."""
        if not torch.is_grad_enabled():
            return self._local_alignment_in_place(attn, regions, words, proj, compute_dtype(regions))
        return l2norm(LocalAlignment.apply(attn, regions, words, proj.weight, proj.bias, self))

    def _local_alignment_in_place(self, attn: Tensor, regions: Tensor, words: Tensor, proj: nn.Linear,
                                  dtype: torch.dtype) -> Tensor:
        """No autograd: the context of a step of images (on the CPU as many as fit :data:`CPU_STEP_BYTES`, where it
        then stays in cache; all of them elsewhere) goes into a scratch buffer, is normalised, differenced and squared
        there, projected, and its l2-normalised projection written into the result (also scratch). Everything is
        computed in ``dtype`` (the inputs' own, or bf16 under autocast: the "out=" products do not autocast, so their
        operands are cast here)."""
        attn, regions, words = (t.to(dtype) for t in (attn, regions, words))
        n_img, n_words, _ = attn.shape
        row_bytes = n_words * regions.size(-1) * regions.element_size()
        step = min(n_img, max(1, CPU_STEP_BYTES // row_bytes)) if regions.device.type == "cpu" else n_img
        out = self._buffer("local", (n_img, n_words, proj.out_features), regions)
        buffer = self._buffer("context", (step, n_words, regions.size(-1)), regions)
        for a0 in range(0, n_img, step):
            a1 = min(a0 + step, n_img)
            x = difference_squared_(torch.bmm(attn[a0:a1], regions[a0:a1], out=buffer[:a1 - a0]), words)
            local = self.linear(x, proj.weight, proj.bias)
            torch.div(local, torch.linalg.vector_norm(local, dim=-1, keepdim=True).add_(EPS), out=out[a0:a1])
        return out

    def packed_local_alignment(self, attn: Tensor, regions: Tensor, words: Tensor, runs: list[tuple[int, ...]],
                               proj: nn.Linear) -> Tensor:
        """:meth:`local_alignment` of given pairs, without padding: ``attn [T, R]`` the cross attention of every
        word of the pairs' captions (back to back), ``regions [N, R, d]`` (all images), ``words [T, d]``, ``runs``
        the runs of one image's pairs (:func:`image_runs`) -> ``[T, m]``. No autograd.

        Per run: the context ``attn @ regions`` and ``(words - l2norm(context))^2`` into one buffer; then the local
        alignment's projection of every word of every pair as one product."""
        x = self._buffer("packed", tuple(words.shape), words)
        for image, _, _, t0, t1 in runs:
            difference_squared_(torch.mm(attn[t0:t1].to(regions.dtype), regions[image], out=x[t0:t1]), words[t0:t1])
        return l2norm(self.linear(x, proj.weight, proj.bias))

    # ------------------------------------------------------------------ SGR
    def sgr_logits(self, x: Tensor, query: nn.Linear, key: nn.Linear) -> Tensor:
        """SGR's edge logits ``query(x) @ key(x)^T`` up to terms constant along each row (which the row softmax
        cancels exactly): ``x [..., K, m]`` -> ``[..., K, K]``.

        ``q_i . k_j = x_i^T Wq^T Wk x_j + (Wk^T bq) . x_j + (terms of i only)``, so the logits are ``z @ x^T`` with
        ``z = x (Wq^T Wk) + Wk^T bq``: one ``m x m`` product per node instead of two.
        """
        weight = (query.weight.t() @ key.weight).t()
        bias = key.weight.t() @ query.bias
        return self.linear(x, weight, bias) @ x.transpose(-1, -2)


class LocalAlignment(torch.autograd.Function):
    """``proj((l2norm(attn @ regions) - words)^2)`` (before the final l2norm), for training.

    ``attn [A, P, R]``, ``regions [A, R, d]``, ``words [P, d]`` (the same for every image), ``weight [m, d]``,
    ``bias [m]``, ``kernels`` (for its linear) -> ``[A, P, m]``. Plain autograd would keep four ``[A, P, d]`` tensors
    until the backward pass (the context, its normalised form, the difference and its square); this keeps only the
    attention ``[A, P, R]`` and the norms, and recomputes the context in the backward pass (one product with K = R).
    The gradients are the analytic ones of the same formula (tests/test_kernels.py checks them with gradcheck).
    """

    @staticmethod
    def forward(ctx, attn: Tensor, regions: Tensor, words: Tensor, weight: Tensor, bias: Tensor | None,
                kernels: Kernels) -> Tensor:
        context = torch.bmm(attn, regions)
        norm = torch.linalg.vector_norm(context, dim=-1, keepdim=True)
        inv = 1.0 / (norm + EPS)
        x = difference_squared_(context, words, inv)
        ctx.save_for_backward(attn, regions, words, weight, norm, inv)
        ctx.has_bias = bias is not None
        ctx.kernels = kernels
        return kernels.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        attn, regions, words, weight, norm, inv = ctx.saved_tensors
        linear = ctx.kernels.linear
        c = torch.bmm(attn, regions).mul_(inv)                                         # l2norm(context)
        diff = c - words
        dim = c.size(-1)
        g2 = grad.reshape(-1, grad.size(-1))
        g_weight = linear(g2.t(), diff.square().reshape(-1, dim).t()) if ctx.needs_input_grad[3] else None
        g_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
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
        return g_attn, g_regions, g_words, g_weight, g_bias, None


def difference_squared_(context: Tensor, words: Tensor, inv: Tensor | None = None) -> Tensor:
    """``(l2norm(context) - words)^2`` written over ``context`` (``similarity.attended_context``'s normalisation and
    the input of ``similarity.local_alignment``'s projection without a temporary): ``context [..., P, d]``,
    ``words [P, d]``; ``inv`` the context's ``1 / (|context| + eps)`` when known."""
    if inv is None:
        inv = 1.0 / (torch.linalg.vector_norm(context, dim=-1, keepdim=True) + EPS)
    # words - context * inv = -(l2norm(context) - words), the same rounding; its square is the same number
    return torch.addcmul(words, context, inv, value=-1, out=context).square_()


def image_runs(images: Tensor, lengths: Tensor) -> list[tuple[int, int, int, int, int]]:
    """The runs of adjacent pairs of one image: ``images [P]`` (each pair's image), ``lengths [P]`` (its caption's
    word count) -> ``(image, first pair, end pair, first word, end word)`` per run (words counted back to back)."""
    new_run = torch.ones(images.numel(), dtype=torch.bool, device=images.device)
    new_run[1:] = images[1:] != images[:-1]
    bounds = new_run.nonzero().flatten().tolist() + [images.numel()]
    ends = lengths.cumsum(0).tolist()
    starts = [end - n for end, n in zip(ends, lengths.tolist())]
    image_of = images.tolist()
    return [(image_of[a], a, b, starts[a], ends[b - 1]) for a, b in zip(bounds[:-1], bounds[1:])]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the products of ``x`` run in: the autocast dtype of its device when autocast is on there, else its
    own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
