"""Relations on the edges: edge features change what the layers compute and reach them through the config with the
width the edge builder declares; hsc_geo's geometry bias; the word graph's relation features; clear errors for
configurations and data that cannot give a layer what it needs; the encoders' choice between dense and sparse paths."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.utils import to_dense_batch

from hsc_pyg.config import Config, ModelConfig, model_config_from_dict
from hsc_pyg.data.graphs import (
    EDGE_BUILDERS, WORD_RELATION_FEATURES, box_geometry, caption_graph, collate_graphs, image_graph, word_relations,
)
from hsc_pyg.data.precomp import CaptionDataset, PrecompSplit
from hsc_pyg.data.vocab import Vocabulary
from hsc_pyg.engine.scoring import check_features
from hsc_pyg.errors import ConfigError, DataError
from hsc_pyg.nn.encoders import RelationalStack
from hsc_pyg.nn.layers import build_layer
from hsc_pyg.nn.model import build_model

SMALL = dict(img_dim=10, vocab_size=30, embed_size=16, word_dim=16, sim_dim=8, num_regions=6)


def random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    corner, size = torch.rand(n, 2, generator=g), 0.1 + 0.4 * torch.rand(n, 2, generator=g)
    return torch.cat([corner, corner + size], dim=1)


def spatial_batch(sizes=(5, 4), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    graphs = [image_graph(torch.randn(n, dim, generator=g), random_boxes(n, seed + k), edges="spatial")
              for k, n in enumerate(sizes)]
    return collate_graphs(graphs)


# --------------------------------------------------------------------------- layers with edge_dim
@pytest.mark.parametrize("name", ["gat", "gatv2", "transformer", "gine"])
def test_edge_features_change_the_output_and_equal_the_pyg_convolution(name):
    torch.manual_seed(0)
    batch = spatial_batch()
    layer = build_layer(name, 8, edge_dim=5).double().eval()
    x, attr = batch.x.double(), batch.edge_attr.double()
    out, _ = layer(x, batch.edge_index, batch.batch, edge_attr=attr)
    torch.testing.assert_close(out, x + layer.conv(x, batch.edge_index, edge_attr=attr), atol=1e-12, rtol=0)
    other, _ = layer(x, batch.edge_index, batch.batch, edge_attr=2 * attr + 1)
    assert (other - out).abs().max() > 1e-3


def test_gine_is_its_formula():
    torch.manual_seed(0)
    batch = spatial_batch((4,))
    layer = build_layer("gine", 8, edge_dim=5).double().eval()
    with torch.no_grad():
        layer.conv.eps.fill_(0.3)
    x, attr = batch.x.double(), batch.edge_attr.double()
    out, _ = layer(x, batch.edge_index, batch.batch, edge_attr=attr)
    source, target = batch.edge_index.tolist()
    expected = []
    for i in range(4):
        total = 1.3 * x[i]
        for e, (j, t) in enumerate(zip(source, target)):
            if t == i:
                total = total + torch.relu(x[j] + layer.conv.lin(attr[e]))
        expected.append(x[i] + layer.conv.nn(total))
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- hsc_geo
def test_box_geometry_is_the_log_ratio_geometry():
    target = torch.tensor([0.0, 0.0, 0.2, 0.4])   # centre (0.1, 0.2), 0.2 x 0.4
    source = torch.tensor([0.5, 0.1, 0.6, 0.3])   # centre (0.55, 0.2), 0.1 x 0.2
    expected = torch.tensor([math.log(0.45 / 0.2), math.log(1e-3), math.log(0.5), math.log(0.5)])
    torch.testing.assert_close(box_geometry(target, source), expected)
    assert torch.isfinite(box_geometry(torch.zeros(4), torch.zeros(4))).all()   # padding stays finite


def test_hsc_geo_edge_weight_is_affinity_plus_geometry_bias():
    torch.manual_seed(0)
    layer = build_layer("hsc_geo", 8, geometry_hidden=5).double().eval()
    torch.nn.init.normal_(layer.geometry[2].weight)
    boxes = random_boxes(4).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    edge_index = collate_graphs([image_graph(x)]).edge_index
    _, w = layer(x, edge_index, None, return_weights=True, pos=boxes)
    a, p = layer.theta_mix(layer.theta(x)), layer.phi_mix(layer.phi(x))
    w1, b1 = layer.geometry[0].weight, layer.geometry[0].bias
    w2, b2 = layer.geometry[2].weight[0], layer.geometry[2].bias[0]
    expected = []
    for j, i in zip(*edge_index.tolist()):
        (x1, y1, x2, y2), (u1, v1, u2, v2) = boxes[i].tolist(), boxes[j].tolist()
        wi, hi = x2 - x1, y2 - y1
        gamma = torch.tensor([math.log(max(abs((u1 + u2) / 2 - (x1 + x2) / 2) / wi, 1e-3)),
                              math.log(max(abs((v1 + v2) / 2 - (y1 + y2) / 2) / hi, 1e-3)),
                              math.log((u2 - u1) / wi), math.log((v2 - v1) / hi)], dtype=torch.float64)
        expected.append((a[i] @ p[j] + w2 @ torch.relu(w1 @ gamma + b1) + b2) / 4)
    torch.testing.assert_close(w, torch.stack(expected))


def test_hsc_geo_starts_as_hsc_and_its_boxes_change_the_output():
    torch.manual_seed(0)
    geo = build_layer("hsc_geo", 8).double().eval()
    hsc = build_layer("hsc", 8).double().eval()
    hsc.load_state_dict({k: v for k, v in geo.state_dict().items() if not k.startswith("geometry.")})
    torch.nn.init.uniform_(geo.norm.weight, 0.5, 1.5)
    hsc.norm.weight.data.copy_(geo.norm.weight)
    batch = spatial_batch()
    x, pos = batch.x.double(), batch.pos.double()
    out, _ = geo(x, batch.edge_index, batch.batch, pos=pos)
    torch.testing.assert_close(out, hsc(x, batch.edge_index, batch.batch)[0], atol=1e-12, rtol=0)
    torch.nn.init.normal_(geo.geometry[2].weight)
    moved, _ = geo(x, batch.edge_index, batch.batch, pos=pos)
    shifted, _ = geo(x, batch.edge_index, batch.batch, pos=pos * torch.tensor([1.0, 1.0, 1.5, 2.0]))
    assert (moved - out).abs().max() > 1e-3 and (shifted - moved).abs().max() > 1e-3


def test_hsc_geo_without_boxes_is_a_data_error():
    layer = build_layer("hsc_geo", 8)
    batch = collate_graphs([image_graph(torch.randn(4, 8))])
    called = r"^layer 'hsc_geo' reads the regions' boxes: call it with pos \[num_nodes, 4\] "
    with pytest.raises(DataError, match=called):
        layer(batch.x, batch.edge_index, batch.batch)
    with pytest.raises(DataError, match=called):
        RelationalStack("hsc_geo", 8, 1)(batch.x, batch)
    message = (r"^img_gnn='hsc_geo' needs region boxes \(\{split\}_boxes\.npy \[N, R, 4\]\) but the data has none; "
               r"add the boxes file or use img_gnn=hsc$")
    split = PrecompSplit("/nowhere", "tiny_precomp", "test", np.zeros((2, 6, 10), np.float32), ["a b"] * 10)
    model = build_model(ModelConfig(**SMALL, img_gnn="hsc_geo"))
    with pytest.raises(DataError, match=message):
        check_features(model, split)
    ModelConfig(**SMALL).check_boxes(False)   # the default layer reads no boxes: no error


def test_spatial_edges_on_data_without_boxes_are_a_data_error():
    split = PrecompSplit("/nowhere", "tiny_precomp", "train", np.zeros((2, 6, 10), np.float32), ["a b"] * 10)
    vocab = Vocabulary.from_dict({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},
                                  "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>"}, "idx": 4})
    with pytest.raises(DataError, match=r"^img_edges='spatial' needs region boxes .* but the data has none; add the "
                                        r"boxes file or use img_edges=full or knn:K$"):
        CaptionDataset(split, vocab, img_edges="spatial")


# --------------------------------------------------------------------------- word relations
def test_word_relations_are_relative_and_clipped_offsets():
    batch = collate_graphs([caption_graph([1, 5, 2]), caption_graph([1, 4, 5, 6, 7, 8, 9, 10, 11, 2])])
    rel = word_relations(batch.edge_index, batch.batch)
    assert rel.shape == (9 + 100, WORD_RELATION_FEATURES)
    source, target = batch.edge_index
    # caption 1 (3 words): edge from word 2 to word 0
    e = int(((source == 2) & (target == 0)).nonzero())
    torch.testing.assert_close(rel[e], torch.tensor([2 / 3, 2 / 4]))
    # caption 2 (10 words, nodes 3..12): edge from word 0 to word 9 (offset -9, clipped at -4)
    e = int(((source == 3) & (target == 12)).nonzero())
    torch.testing.assert_close(rel[e], torch.tensor([-9 / 10, -1.0]))


# --------------------------------------------------------------------------- through the config
def test_edge_dim_comes_from_the_edge_builder_and_features_reach_the_model():
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, img_gnn="gat", img_edges="spatial", img_edge_features=True, txt_gnn="transformer",
                      txt_edge_features=True)
    model = build_model(cfg).eval()
    assert [layer.conv.lin_edge.in_channels for layer in model.image_encoder.stack.layers] == \
        [EDGE_BUILDERS.capability("spatial", "edge_attr")] * 4
    assert [layer.conv.lin_edge.in_channels for layer in model.text_encoder.stack.layers] == \
        [WORD_RELATION_FEATURES] * 4
    batch = spatial_batch((6, 6), dim=10)
    with torch.no_grad():
        before = model.image_encoder(batch).levels["higher"]
        batch.edge_attr = batch.edge_attr.flip(0)
        after = model.image_encoder(batch).levels["higher"]
    assert (before - after).abs().max() > 1e-4
    # without the switch the same layers have no edge parameters and ignore the features
    plain = build_model(ModelConfig(**SMALL, img_gnn="gat", img_edges="spatial"))
    assert all(layer.conv.lin_edge is None for layer in plain.image_encoder.stack.layers)


@pytest.mark.parametrize("values, message", [
    (dict(img_gnn="gcn", img_edges="spatial", img_edge_features=True),
     r"^img_edge_features=True but img_gnn='gcn' takes no edge features; use one of gat, gatv2, gine, transformer or "
     r"set img_edge_features=false$"),
    (dict(txt_edge_features=True),
     r"^txt_edge_features=True but txt_gnn='hsc_text' takes no edge features; use one of gat, gatv2, gine, "
     r"transformer or set txt_edge_features=false$"),
    (dict(img_gnn="gat", img_edge_features=True),
     r"^img_edge_features=True but img_edges='full' builds no edge features; use img_edges=spatial \(boxes needed\) "
     r"or set img_edge_features=false$"),
    (dict(img_gnn="gine"), r"^img_gnn='gine' needs edge features; set img_edge_features=true with img_edges=spatial$"),
    (dict(txt_gnn="gine"), r"^txt_gnn='gine' needs edge features; set txt_edge_features=true \(relative word "
                           r"positions\)$"),
    (dict(txt_gnn="hsc_geo"), r"^txt_gnn='hsc_geo' needs region boxes, so it applies to region graphs only; use "
                              r"txt_gnn=hsc_text or another layer without boxes$"),
])
def test_configurations_a_layer_cannot_serve_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**SMALL, **values)


def test_configs_written_before_edge_features_still_load():
    old = {k: v for k, v in Config(**SMALL, img_gnn="gat").model.__dict__.items()
           if k not in ("img_edge_features", "txt_edge_features")}
    cfg = model_config_from_dict(old)
    assert (cfg.img_edge_features, cfg.txt_edge_features) == (False, False)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    assert not any("lin_edge" in k or "att_edge" in k for k in state)


# --------------------------------------------------------------------------- dense or sparse
@pytest.mark.parametrize("edges", ["full", "knn:2"])
@pytest.mark.parametrize("name", ["gcn", "gat", "sage", "graphconv", "gin"])
def test_the_stack_takes_the_dense_path_on_graphs_with_self_loops(name, edges, monkeypatch):
    torch.manual_seed(0)
    stack = RelationalStack(name, 8, 2).double().eval()
    g = torch.Generator().manual_seed(1)
    batch = collate_graphs([image_graph(torch.randn(n, 8, generator=g), edges=edges) for n in (5, 3)])
    x = batch.x.double()
    reference = x
    for layer in stack.layers:
        reference, _ = layer(reference, batch.edge_index, batch.batch)
    calls = []
    for layer in stack.layers:
        dense = layer.forward_dense
        monkeypatch.setattr(layer, "forward_dense", lambda *a, _dense=dense, **k: calls.append(1) or _dense(*a, **k))
    states, mask, weights = stack(x, batch)
    assert len(calls) == 2
    torch.testing.assert_close(states[-1][mask], reference, atol=1e-12, rtol=0)
    # learned weights asked of a layer whose dense path has none: the sparse path gives them
    states, _, weights = stack(x, batch, return_weights=True)
    assert len(calls) == (2 if name == "gat" else 4)
    torch.testing.assert_close(states[-1][mask], reference, atol=1e-12, rtol=0)
    if name == "gat":
        assert all(w.shape == (batch.edge_index.size(1),) for w in weights)


def test_edge_features_take_the_sparse_path_on_complete_graphs():
    torch.manual_seed(0)
    stack = RelationalStack("gat", 8, 1, {"edge_dim": 2}).double().eval()
    batch = collate_graphs([caption_graph([1, 5, 6, 2]), caption_graph([1, 7, 2])])
    assert batch.complete
    x = torch.randn(batch.num_nodes, 8, dtype=torch.float64)
    rel = word_relations(batch.edge_index, batch.batch)
    states, mask, _ = stack(x, batch, edge_attr=rel)
    expected, _ = stack.layers[0](x, batch.edge_index, batch.batch, edge_attr=rel.double())
    torch.testing.assert_close(states[-1], to_dense_batch(expected, batch.batch)[0])
    with pytest.raises(DataError, match=r"^the layers were built for edge features but the graphs have none"):
        stack(x, batch)


def test_similarity_matrix_takes_the_boxes_of_models_that_read_them():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, img_gnn="hsc_geo", img_layers=1, txt_layers=1))
    images = torch.randn(2, 6, 10)
    boxes = torch.stack([random_boxes(6, 0), random_boxes(6, 1)])
    scores = model.similarity_matrix(images, [[1, 5, 2], [1, 6, 7, 2]], boxes=boxes)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    with pytest.raises(DataError, match=r"^img_gnn='hsc_geo' needs region boxes"):
        model.similarity_matrix(images, [[1, 5, 2]])


def test_gatv2_takes_the_dense_path_only_where_the_padded_layout_has_no_more_pairs_than_edges():
    # its dense path builds [B, heads, N, N, C]: slower than the edges' messages on knn / spatial / padded graphs
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = collate_graphs([image_graph(torch.randn(4, 8, generator=g)) for _ in range(3)])    # complete, one size
    knn = collate_graphs([image_graph(torch.randn(4, 8, generator=g), edges="knn:1") for _ in range(3)])
    words = collate_graphs([caption_graph([1, 5, 2]), caption_graph([1, 5, 6, 7, 2])])            # complete, padded
    stack = RelationalStack("gatv2", 8, 2).double().eval()
    assert [stack.takes_dense_path(b) for b in (images, knn, words)] == [True, False, False]
    gat = RelationalStack("gat", 8, 2)
    assert [gat.takes_dense_path(b) for b in (images, knn, words)] == [True, True, True]
    assert not gat.takes_dense_path(images, return_weights=True)   # its dense path returns no attention
    for batch in (images, knn, words):
        x = torch.randn(batch.num_nodes, 8, generator=g, dtype=torch.float64)
        states, mask, _ = stack(x, batch)
        expected = x
        for layer in stack.layers:
            expected, _ = layer(expected, batch.edge_index, batch.batch)
        torch.testing.assert_close(states[-1][mask], expected, atol=1e-12, rtol=0)
