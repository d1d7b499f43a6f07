"""Every kernel of hsc_pyg.nn.kernels equals the plain formula of hsc_pyg.nn.similarity it replaces (forward and
backward), ``kernels="auto"`` and ``"reference"`` score alike at full size, and two models score in two threads at
once as they do one after the other."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from hsc_pyg.config import Config
from hsc_pyg.engine import blocking
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn import kernels as K
from hsc_pyg.nn import similarity as S
from hsc_pyg.nn.functional import masked_softmax
from hsc_pyg.nn.kernels import Kernels, LocalAlignment, onednn_linear_works
from hsc_pyg.nn.model import CaptionEncoding, ImageEncoding, build_model

D, M_DIM, R = 1024, 256, 36                   # full size
LENGTHS = [5, 9, 12, 17, 7, 22, 11, 14, 3, 16]

needs_onednn = pytest.mark.skipif(not onednn_linear_works(), reason="this torch has no working oneDNN linear op")


def l2(x):
    return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)


def encodings(n_img: int, lengths: list[int], dim: int = D, dtype=torch.float32, seed: int = 1, levels: int = 1):
    """Random l2-normalised encodings: ``ImageEncoding [n_img, levels, R, dim]`` and ``CaptionEncoding`` of
    ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    regions = l2(torch.randn(n_img, levels, R, dim, generator=g, dtype=dtype))
    img_glo = l2(torch.randn(n_img, levels, dim, generator=g, dtype=dtype))
    mask = torch.arange(max(lengths)).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    words = l2(torch.randn(len(lengths), levels, max(lengths), dim, generator=g, dtype=dtype)) * mask[:, None, :, None]
    cap_glo = l2(torch.randn(len(lengths), levels, dim, generator=g, dtype=dtype))
    return ImageEncoding(regions, img_glo), CaptionEncoding.back_to_back(words.transpose(1, 2)[mask],
                                                                         torch.tensor(lengths), cap_glo)


def similarity_module(head: str = "saf", dtype=torch.float32, seed: int = 0) -> S.SimilarityModule:
    torch.manual_seed(seed)
    sim = S.SimilarityModule(D, M_DIM, R, head).to(dtype).eval()
    if head == "saf":
        with torch.no_grad():   # statistics that are not the identity
            sim.head.norm.running_mean.fill_(0.3)
            sim.head.norm.running_var.fill_(1.7)
    return sim


def block(img, cap):
    """The tensors of level 0, as SimilarityModule.forward takes them (the captions padded)."""
    words, mask = cap.padded()
    return img.regions[:, 0], img.glo[:, 0], words[:, 0], mask, cap.glo[:, 0]


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_linear_kernel_equals_f_linear_forward_and_backward(onednn):
    kernels = Kernels("auto", onednn=onednn)
    assert kernels.onednn is onednn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 70, generator=g, requires_grad=True)
    w = torch.randn(19, 70, generator=g, requires_grad=True)
    b = torch.randn(19, generator=g, requires_grad=True)
    up = torch.randn(3, 37, 19, generator=g)
    got = kernels.linear(x, w, b)
    grads = torch.autograd.grad((got * up).sum(), (x, w, b))
    expected = F.linear(x, w, b)
    expected_grads = torch.autograd.grad((expected * up).sum(), (x, w, b))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)


def test_reference_mode_uses_no_private_op_and_bad_modes_are_refused():
    assert Kernels("reference").onednn is False and Kernels("reference").fused is False
    with pytest.raises(ConfigError, match="kernels='fast' is unknown"):
        Kernels("fast")


# --------------------------------------------------------------------------- steps 1-4
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_attention_kernel_equals_reference(dtype):
    img, cap = encodings(3, LENGTHS, dim=64, dtype=dtype)
    regions, _, words, mask, _ = block(img, cap)
    pairs = (regions.unsqueeze(1), words.unsqueeze(0), mask.unsqueeze(0), 9.0)
    got = S.cross_attention(*pairs, kernels=Kernels())                                     # [A, C, L, R]
    expected = S.cross_attention(*pairs)
    assert got.shape == expected.shape == (3, len(LENGTHS), max(LENGTHS), R)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    products = Kernels().pair_products(regions.unsqueeze(1), words.unsqueeze(0))
    torch.testing.assert_close(products, regions.unsqueeze(1) @ words.unsqueeze(0).transpose(-1, -2), atol=1e-6, rtol=0)
    # one pair alone (as the pictures compute it) gives the same rows for its real words
    alone = S.cross_attention(regions[1:2], words[3:4, :LENGTHS[3]], mask[3:4, :LENGTHS[3]], 9.0)[0]
    torch.testing.assert_close(got[1, 3, :LENGTHS[3]], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone.sum(-1), torch.ones(LENGTHS[3], dtype=dtype))


def reference_local_alignment(sim, regions, words, mask):
    regions, words = regions.unsqueeze(1), words.unsqueeze(0)
    attn = S.cross_attention(regions, words, mask.unsqueeze(0), sim.lambda_softmax)
    return S.local_alignment(S.attended_context(attn, regions), words, sim.loc_proj), attn


@pytest.mark.parametrize("grad, images_per_step", [(False, 1), (False, 3), (False, 4), (True, None)],
                         ids=["in_place_1_image_a_step", "in_place_3_4_images", "in_place_4_images", "fused_backward"])
def test_local_alignment_kernel_equals_reference(grad, images_per_step, monkeypatch):
    """The in-place path at one image a step (a block of many words), at steps that do not divide the images, and at
    all images in one step (one query's words against a shortlist, CPU_STEP_BYTES)."""
    if images_per_step is not None:
        monkeypatch.setattr(K, "CPU_STEP_BYTES", images_per_step * max(LENGTHS) * len(LENGTHS) * D * 4)
    sim = similarity_module()
    img, cap = encodings(4, LENGTHS)
    regions, img_glo, words, mask, cap_glo = block(img, cap)
    regions = regions.clone().requires_grad_(grad)
    words = words.clone().requires_grad_(grad)
    kernels = Kernels()
    with torch.set_grad_enabled(grad):
        expected, attn = reference_local_alignment(sim, regions, words, mask)                 # [A, C, L, m]
        n_img, n_cap, length, n_reg = attn.shape
        got = kernels.local_alignment(attn.reshape(n_img, n_cap * length, n_reg), regions,
                                      words.reshape(n_cap * length, -1), sim.loc_proj).view(expected.shape)
    torch.testing.assert_close(got[:, mask], expected[:, mask], atol=2e-6, rtol=0)        # padded words are masked
    if grad:
        up = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
        params = (regions, words, sim.loc_proj.weight, sim.loc_proj.bias)
        # the weight and bias gradients are sums over every pair's words, whose terms cancel: rounding errors scale
        # with the largest entry, not with each entry
        for a, e in zip(torch.autograd.grad((got * up).sum(), params, retain_graph=True),
                        torch.autograd.grad((expected * up).sum(), params)):
            torch.testing.assert_close(a, e, atol=max(1e-5, 1e-6 * float(e.abs().max())), rtol=1e-4)


def test_fused_local_alignment_gradient():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), -1).requires_grad_()
    regions = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    words = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(LocalAlignment.apply, (attn, regions, words, weight, bias, Kernels()))


# --------------------------------------------------------------------------- SGR
@pytest.mark.parametrize("onednn", [False, pytest.param(True, marks=needs_onednn)])
def test_folded_sgr_logits_give_the_reference_edges(onednn):
    sim = similarity_module("sgr")
    step = sim.head.steps[0]
    with torch.no_grad():
        step.query.bias.uniform_(-0.5, 0.5)   # the folded form must also carry the bias terms
        step.key.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(3)
    x = l2(torch.randn(2, 3, 9, M_DIM, generator=g)).requires_grad_()        # nodes are l2-normalised
    node_mask = torch.rand(3, 9, generator=g) > 0.3
    node_mask[:, 0] = True
    got = masked_softmax(Kernels(onednn=onednn).sgr_logits(x, step.query, step.key), node_mask.unsqueeze(-2), -1)
    expected = masked_softmax(step.query(x) @ step.key(x).transpose(-1, -2), node_mask.unsqueeze(-2), -1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    up = torch.randn(got.shape, generator=g)
    params = (x, step.query.weight, step.query.bias, step.key.weight)
    for a, e in zip(torch.autograd.grad((got * up).sum(), params, retain_graph=True),
                    torch.autograd.grad((expected * up).sum(), params)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- the whole module
@pytest.mark.parametrize("head", ["saf", "sgr"])
def test_auto_and_reference_kernels_score_alike_at_full_size(head):
    sim = similarity_module(head)
    img, cap = encodings(6, LENGTHS)
    with torch.no_grad():
        sim.set_kernels("reference")
        expected = sim(*block(img, cap))
        sim.set_kernels("auto")
        got = sim(*block(img, cap))
    assert got.shape == (6, len(LENGTHS))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["saf", "sgr"])
def test_auto_and_reference_kernels_train_alike(head):
    """Training mode (per-caption BatchNorm statistics for SAF): the same scores and the same gradients."""
    img, cap = encodings(5, LENGTHS[:6])
    results = []
    for mode in ("reference", "auto"):
        sim = similarity_module(head).train()
        sim.head.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
        sim.set_kernels(mode)
        scores = sim(*block(img, cap))
        scores.pow(2).sum().backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in sim.named_parameters() if p.grad is not None}))
    (ref_scores, ref_grads), (scores, grads) = results
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
    # SGR's key bias adds a constant to each row of logits, which the row softmax cancels: its gradient is zero, and
    # the folded logits do not use it at all
    assert set(grads) <= set(ref_grads) and "loc_proj.weight" in grads
    top = max(float(g.abs().max()) for g in ref_grads.values())
    for name, ref in ref_grads.items():
        assert float((grads.get(name, torch.zeros_like(ref)) - ref).abs().max()) < 1e-4 * top, name


def test_model_switch_reaches_the_scorer():
    cfg = Config(preset="sgraf_saf", img_dim=10, vocab_size=20, embed_size=16, word_dim=8, sim_dim=8, num_regions=R)
    model = build_model(cfg).eval()
    model.set_kernels("reference")
    assert model.similarity.kernels.mode == "reference"
    img, cap = encodings(3, LENGTHS, dim=16)
    with torch.no_grad():
        expected = blocking.score(model, img, cap)
        model.set_kernels("auto")
        torch.testing.assert_close(blocking.score(model, img, cap), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- threads
def full_size_saf_model(seed: int):
    cfg = Config(preset="sgraf_saf", img_dim=2048, vocab_size=100)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_two_models_in_two_threads_score_as_one_after_the_other():
    """Two full-size SGRAF-SAF models, 8 images x 40 captions each: scored at the same time in two threads (several
    rounds, started together) they give the scores they give one after the other. Scratch buffers shared between
    models made these differ by up to 0.04."""
    lengths = [5 + (7 * k) % 19 for k in range(40)]
    jobs = [(full_size_saf_model(seed), *encodings(8, lengths, seed=seed + 10)) for seed in (0, 1)]
    with torch.no_grad():
        alone = [blocking.score(model, img, cap) for model, img, cap in jobs]
    rounds = 4
    together: list[list] = [[None] * rounds for _ in jobs]
    start = threading.Barrier(len(jobs))

    def run(k):
        model, img, cap = jobs[k]
        with torch.no_grad():
            for r in range(rounds):
                start.wait()
                together[k][r] = blocking.score(model, img, cap)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(jobs)):
        for r in range(rounds):
            torch.testing.assert_close(together[k][r], alone[k], atol=1e-6, rtol=0)
