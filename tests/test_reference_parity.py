"""Exact parity with the original SGRAF and HSC code: the official-layout fixtures in ../shared/fixtures/reference."""
from __future__ import annotations

import re

import pytest
import torch

from hsc_pyg import load_checkpoint
from hsc_pyg.engine.checkpoint import allow_namespace, read_checkpoint, save_checkpoint

FIXTURES = {"sgraf_saf": ("sgraf_saf", "saf", 0), "sgraf_sgr": ("sgraf_sgr", "sgr", 0), "lhsc": ("hsc", "saf", 4)}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_official_checkpoint_reproduces_original_scores(shared_dir, name):
    ref = shared_dir / "fixtures" / "reference"
    model = load_checkpoint(ref / f"{name}.pth.tar", map_location="cpu")
    case = torch.load(ref / f"{name}.case.pt", weights_only=True)
    preset, head, layers = FIXTURES[name]
    assert (model.config.preset, model.config.head, model.config.img_layers, model.config.txt_layers) == \
        (preset, head, layers, layers)
    assert (model.config.img_dim, model.config.embed_size, model.config.word_dim, model.config.sim_dim) == (64, 32, 16, 8)
    sims = model.similarity_matrix(case["images"], case["captions"])
    expected = case["expected_sims"]
    assert sims.shape == expected.shape
    assert (sims.double() - expected).abs().max().item() < 1e-4


def test_converted_checkpoint_roundtrips_through_our_format(shared_dir, tmp_path):
    ref = shared_dir / "fixtures" / "reference"
    model = load_checkpoint(ref / "lhsc.pth.tar")
    save_checkpoint(tmp_path / "lhsc.pth", model, epoch=7)
    again = load_checkpoint(tmp_path / "lhsc.pth")
    case = torch.load(ref / "lhsc.case.pt", weights_only=True)
    torch.testing.assert_close(again.similarity_matrix(case["images"], case["captions"]),
                               model.similarity_matrix(case["images"], case["captions"]), atol=0, rtol=0)
    assert read_checkpoint(tmp_path / "lhsc.pth")["epoch"] == 7


def test_other_sizes_come_from_the_checkpoint_opt(shared_dir, tmp_path):
    """A checkpoint of the same layout with other sizes (here: HSC rebuilt at embed 48, 2 blocks) converts the same way."""
    ref = shared_dir / "fixtures" / "reference"
    with allow_namespace():
        raw = torch.load(ref / "lhsc.pth.tar", weights_only=True)
    opt = raw["opt"]
    opt.embed_size, opt.img_dim = 48, 20
    img_sd, txt_sd, sim_sd = raw["model"]
    img_sd = {k: v for k, v in img_sd.items() if not k.startswith(("IM_GCN_3", "IM_GCN_4"))}
    txt_sd = {k: v for k, v in txt_sd.items() if not k.startswith(("W_att3", "W_att4"))}

    def resize(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("num_batches_tracked"):
                out[k] = v
                continue
            shape = [{32: 48, 64: 20, 96: 144}.get(s, s) for s in v.shape]
            if re.search(r"\.(theta|phi)\d?\.", k):
                shape[0] = 12
            out[k] = torch.rand(shape) + 0.5 if "running_var" in k else torch.randn(shape) * 0.1
        return out

    raw["model"] = [resize(img_sd), resize(txt_sd), resize(sim_sd)]
    with open(tmp_path / "resized.pth.tar", "wb") as f:
        torch.save(raw, f)
    model = load_checkpoint(tmp_path / "resized.pth.tar")
    assert (model.config.embed_size, model.config.img_dim, model.config.img_layers, model.config.txt_layers) == (48, 20, 2, 2)
    sims = model.similarity_matrix(torch.randn(2, 36, 20), [[1, 5, 6, 2], [1, 7, 2]])
    assert sims.shape == (2, 2) and torch.isfinite(sims).all()
