"""The dense, chunked, broadcast scorer equals a one-pair-at-a-time reference written here from MODEL.md §2."""
from __future__ import annotations

import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.engine import blocking
from hsc_pyg.engine.scoring import pair_scores
from hsc_pyg.nn.model import CaptionEncoding, ImageEncoding, build_model

D, M_DIM, R = 16, 8, 6


def l2(x, dim=-1):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + 1e-8)


def reference_pair(sim, regions, img_glo, words, cap_glo):
    """One image ``regions [R, d]`` against one caption ``words [L, d]`` (real words only), plain loops where the
    definition has them."""
    n_reg, n_words = regions.size(0), words.size(0)
    raw = torch.empty(n_reg, n_words, dtype=regions.dtype)
    for r in range(n_reg):
        for w in range(n_words):
            v = float(regions[r] @ words[w])
            raw[r, w] = v if v > 0 else 0.1 * v
    raw = l2(raw, dim=1)                                   # over the word axis
    context = []
    for w in range(n_words):
        e = torch.exp(sim.lambda_softmax * raw[:, w])
        a = e / e.sum()                                    # softmax over regions
        context.append(l2((a.unsqueeze(1) * regions).sum(0)))
    context = torch.stack(context)
    local = l2(sim.loc_proj((context - words) ** 2))
    glob = l2(sim.glo_proj((img_glo - cap_glo) ** 2))
    nodes = torch.cat([glob.unsqueeze(0), local])         # [L+1, m]
    head = sim.head
    if hasattr(head, "gate"):                             # SAF
        bn = head.norm
        t = head.gate(nodes).squeeze(-1)
        t = (t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        t = torch.sigmoid(t)
        t = t / (t.abs().sum() + 1e-8)
        vec = l2((t.unsqueeze(1) * nodes).sum(0))
    else:                                                 # SGR
        x = nodes
        for step in head.steps:
            logits = step.query(x) @ step.key(x).T
            edges = torch.exp(logits - logits.max(1, keepdim=True)[0])
            edges = edges / edges.sum(1, keepdim=True)
            x = torch.relu(step.update(edges @ x))
        vec = x[0]
    return torch.sigmoid(sim.score_proj(vec)).squeeze()


def random_model(head: str, levels: str):
    cfg = Config(preset="sgraf_" + head, img_dim=10, vocab_size=20, embed_size=D, word_dim=8, sim_dim=M_DIM,
                 num_regions=R, align_levels=levels)
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # randomise BatchNorm statistics so that they matter
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return model


def random_encodings(n_img: int, lengths: list[int], levels: int):
    g = torch.Generator().manual_seed(1)
    regions = l2(torch.randn(n_img, levels, R, D, generator=g, dtype=torch.float64))
    img_glo = l2(torch.randn(n_img, levels, D, generator=g, dtype=torch.float64))
    words = l2(torch.randn(sum(lengths), levels, D, generator=g, dtype=torch.float64))
    cap_glo = l2(torch.randn(len(lengths), levels, D, generator=g, dtype=torch.float64))
    return ImageEncoding(regions, img_glo), CaptionEncoding.back_to_back(words, torch.tensor(lengths), cap_glo)


def reference_matrix(model, img, cap):
    out = torch.empty(len(img), len(cap), dtype=torch.float64)
    for i in range(len(img)):
        for j in range(len(cap)):
            first, n = int(cap.starts[j]), int(cap.lengths[j])
            per_level = [reference_pair(model.similarity, img.regions[i, v], img.glo[i, v],
                                        cap.words[first:first + n, v], cap.glo[j, v]) for v in range(img.regions.size(1))]
            out[i, j] = sum(per_level) / len(per_level)
    return out


LENGTHS = [3, 7, 5, 12, 2, 9, 4]


@pytest.mark.parametrize("head", ["saf", "sgr"])
@pytest.mark.parametrize("levels", ["higher", "object,relational,higher"])
def test_dense_chunked_scores_equal_one_pair_reference(head, levels, device):
    model = random_model(head, levels)
    n_levels = len(levels.split(","))
    img, cap = random_encodings(5, LENGTHS, n_levels)
    with torch.no_grad():
        expected = reference_matrix(model, img, cap)                # float64, on the CPU
        model, img, cap = model.to(device), img.to(device=device), cap.to(device=device)
        for chunk_mb in (1e-6, 0.002, 0.02, 512):   # one pair per block ... everything in one block
            got = blocking.score(model, img, cap, chunk_mb=chunk_mb).cpu()
            assert got.shape == (5, len(LENGTHS))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        g = torch.Generator().manual_seed(0)
        pairs_i = torch.cat([torch.tensor([0, 4, 2, 2, 1, 1]), torch.randint(0, 5, (30,), generator=g)])
        pairs_j = torch.cat([torch.tensor([6, 0, 3, 1, 1, 1]), torch.randint(0, len(LENGTHS), (30,), generator=g)])
        for kernels in ("auto", "reference"):            # given pairs: packed words, in pieces of 1 pair ... all
            model.set_kernels(kernels)
            for chunk_mb in (1e-6, 0.002, 512):
                paired = torch.from_numpy(pair_scores(model, img, cap, pairs_i.numpy(), pairs_j.numpy(),
                                                      chunk_mb=chunk_mb))
                torch.testing.assert_close(paired.to(expected.dtype), expected[pairs_i, pairs_j], atol=1e-5, rtol=0)


def test_given_pairs_of_one_image_need_not_be_adjacent():
    """SimilarityModule.score_pairs treats each run of one image's pairs as one product; runs split apart give the
    same scores."""
    model = random_model("saf", "higher")
    img, cap = random_encodings(3, LENGTHS, 1)
    images, captions = torch.tensor([2, 0, 2, 2, 1, 0]), torch.tensor([1, 3, 0, 6, 2, 5])
    with torch.no_grad():
        got = model.score_pairs(img, cap[captions], images)
        expected = blocking.score(model, img, cap)[images, captions]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_score_of_a_pair_does_not_depend_on_the_other_captions():
    model = random_model("saf", "higher")
    img, cap = random_encodings(3, LENGTHS, 1)
    with torch.no_grad():
        full = blocking.score(model, img, cap)
        alone = blocking.score(model, img, cap[3:4])
    torch.testing.assert_close(full[:, 3:4], alone, atol=1e-12, rtol=0)


def test_training_mode_saf_norm_uses_per_caption_statistics():
    """In training the original normalises the SAF gate of each caption over (images x its L+1 nodes) and updates
    the running statistics once per caption; the closed form here must match that sequential definition."""
    model = random_model("saf", "higher")
    model.train()
    norm = model.similarity.head.norm
    t = torch.randn(4, 3, 6, dtype=torch.float64)
    mask = torch.ones(1, 3, 6, dtype=torch.bool)
    mask[0, 1, 4:] = False
    start_mean, start_var = norm.running_mean.clone(), norm.running_var.clone()
    out = norm(t, mask)
    mean_run, var_run = start_mean.clone(), start_var.clone()
    for c in range(3):
        vals = t[:, c][mask[0, c].expand(4, -1)]
        mu, var = vals.mean(), vals.var(unbiased=False)
        expected = (t[:, c] - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
        valid = mask[0, c].expand(4, -1)
        torch.testing.assert_close(out[:, c][valid], expected[valid])
        mean_run = 0.9 * mean_run + 0.1 * mu
        var_run = 0.9 * var_run + 0.1 * vals.var(unbiased=True)
    torch.testing.assert_close(norm.running_mean, mean_run)
    torch.testing.assert_close(norm.running_var, var_run)
    assert int(norm.num_batches_tracked) == 3


def test_bf16_autocast_scores_stay_float32_and_close(device):
    model = random_model("saf", "higher").float().to(device)
    img, cap = random_encodings(4, LENGTHS, 1)
    img, cap = img.to(device=device, dtype=torch.float32), cap.to(device=device, dtype=torch.float32)
    with torch.no_grad():
        exact = blocking.score(model, img, cap)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = blocking.score(model, img, cap)
    assert low.dtype == torch.float32
    assert (low - exact).abs().max() < 2e-2
    assert low.unique().numel() == low.numel()  # no ties from a bf16 output
