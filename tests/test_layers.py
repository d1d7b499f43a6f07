"""Relational layers: the dense complete-graph path equals plain message passing, and every registered type trains."""
from __future__ import annotations

import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.graphs import PairBatch, caption_graph, collate_graphs, image_graph
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn.layers import LAYERS, build_layer
from hsc_pyg.nn.model import build_model


def complete_batch(sizes, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return collate_graphs([image_graph(torch.randn(n, dim, generator=g)) for n in sizes], "full")


@pytest.mark.parametrize("name", ["hsc", "hsc_text"])
def test_dense_path_equals_message_passing(name):
    torch.manual_seed(0)
    layer = build_layer(name, 12).double()
    if name == "hsc":  # the zero-initialised BatchNorm would hide the aggregation: give it weight
        torch.nn.init.uniform_(layer.norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(layer.norm.bias, -0.5, 0.5)
    layer.eval()
    batch = complete_batch([5, 3, 7], 12)
    x = batch.x.double()
    sparse, w_sparse = layer(x, batch.edge_index, batch.batch, return_weights=True)
    from torch_geometric.utils import to_dense_batch
    dense_x, mask = to_dense_batch(x, batch.batch)
    dense, w_dense = layer.forward_dense(dense_x, mask, return_weights=True)
    torch.testing.assert_close(dense[mask], sparse, atol=1e-12, rtol=0)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    torch.testing.assert_close(w_dense[pair], w_sparse, atol=1e-12, rtol=0)
    assert w_sparse.shape == (5 * 5 + 3 * 3 + 7 * 7,)


def test_hsc_edge_weight_is_scaled_bilinear_affinity():
    torch.manual_seed(0)
    layer = build_layer("hsc", 8).double().eval()
    batch = complete_batch([4], 8)
    x = batch.x.double()
    _, w = layer(x, batch.edge_index, batch.batch, return_weights=True)
    a = layer.theta_mix(layer.theta(x))
    p = layer.phi_mix(layer.phi(x))
    src, dst = batch.edge_index
    expected = torch.stack([a[i] @ p[j] / 4 for j, i in zip(src.tolist(), dst.tolist())])
    torch.testing.assert_close(w, expected)


def test_hsc_block_starts_as_identity():
    layer = build_layer("hsc", 8).train()
    batch = complete_batch([4, 4], 8)
    out, _ = layer(batch.x, batch.edge_index, batch.batch)
    torch.testing.assert_close(out, batch.x)


def test_unknown_layer_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown layer type 'gcnn'; choose one of .*gat.*hsc"):
        build_layer("gcnn", 8)


TRAINABLE = sorted(set(LAYERS) - {"none"})


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_layer_type_trains_on_both_graphs(name):
    torch.manual_seed(0)
    text_name = "hsc_text" if name == "hsc" else ("hsc" if name == "hsc_text" else name)
    cfg = Config(img_dim=10, vocab_size=30, embed_size=16, word_dim=16, sim_dim=8, num_regions=6,
                 img_gnn=name, txt_gnn=text_name, img_layers=2, txt_layers=2)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    images = [image_graph(torch.randn(6, 10, generator=g)) for _ in range(3)]
    captions = [caption_graph(torch.randint(4, 30, (n,), generator=g)) for n in (5, 3, 8, 4)]
    pairs = PairBatch(images=collate_graphs(images, "full"), captions=collate_graphs(captions, "full"),
                      img_index=torch.tensor([0, 1, 2, 0]), img_ids=torch.arange(3), cap_ids=torch.arange(4))
    scores = model(pairs)
    assert scores.shape == (4, 4)
    scores.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient with layer {name}"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient with layer {name}"
    states = model.image_encoder(pairs.images, ("higher",), return_weights=True)
    for layer, w in zip(model.image_encoder.stack.layers, states.edge_weights):
        if layer.has_edge_weights:
            assert w.shape == (pairs.images.edge_index.size(1),)
        else:
            assert w is None
