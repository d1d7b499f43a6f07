"""Relational layers: the dense path equals plain message passing (complete graphs and any graph with self-loops),
every registered type trains, layer arguments are explicit, edge features reach the layers that declare them,
completeness comes from the edges."""
from __future__ import annotations

import pytest
import torch

from torch_geometric.utils import to_dense_batch

from hsc_pyg.config import Config, ModelConfig
from hsc_pyg.data.graphs import PairBatch, caption_graph, collate_graphs, dense_adjacency, edge_values, image_graph
from hsc_pyg.engine.blocking import BatchScores
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn.encoders import RelationalStack
from hsc_pyg.nn.dense import SharedDense
from hsc_pyg.nn.layers import LAYERS, PyGConvLayer, RelationalLayer, build_layer, register_layer
from hsc_pyg.nn.model import build_model


def complete_batch(sizes, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return collate_graphs([image_graph(torch.randn(n, dim, generator=g)) for n in sizes])


def grid_boxes(count: int, side: int = 3) -> torch.Tensor:
    cell = torch.arange(count)
    r, c = cell.div(side, rounding_mode="floor").float(), (cell % side).float()
    return torch.stack([c, r, c + 1, r + 1], dim=1) / side


DENSE = sorted(n for n in LAYERS if LAYERS.capability(n, "supports_dense") and n != "none")
#: region edge builders with self-loops: the complete graph (implicit adjacency) and two that are not complete
LOOPED_EDGES = ["full", "knn:2", "spatial"]


def dense_inputs(batch, x):
    """``(dense x, mask, adjacency or None for complete graphs)`` as the stack builds them."""
    dense_x, mask = to_dense_batch(x, batch.batch)
    adj = None if batch.complete else dense_adjacency(batch).to(x.dtype)
    return dense_x, mask, adj


@pytest.mark.parametrize("edges", LOOPED_EDGES)
@pytest.mark.parametrize("name", DENSE)
def test_dense_path_equals_message_passing(name, edges):
    torch.manual_seed(0)
    layer = build_layer(name, 12).double()
    if name.startswith("hsc"):  # the zero-initialised BatchNorm (and geometry map) would hide the aggregation
        for norm in [m for m in layer.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.uniform_(norm.bias, -0.5, 0.5)
    if name == "hsc_geo":
        torch.nn.init.normal_(layer.geometry[2].weight)
    layer.eval()
    g = torch.Generator().manual_seed(0)
    batch = collate_graphs([image_graph(torch.randn(n, 12, generator=g), grid_boxes(n), edges) for n in (5, 3, 7)])
    assert batch.looped and batch.complete == (edges == "full")
    x = batch.x.double()
    boxes = {"pos": batch.pos.double()} if layer.needs_pos else {}
    sparse, w_sparse = layer(x, batch.edge_index, batch.batch, return_weights=True, **boxes)
    dense_x, mask, adj = dense_inputs(batch, x)
    boxes = {"pos": to_dense_batch(batch.pos.double(), batch.batch)[0]} if layer.needs_pos else {}
    dense, w_dense = layer.forward_dense(dense_x, mask, return_weights=True, adj=adj, **boxes)
    torch.testing.assert_close(dense[mask], sparse, atol=1e-12, rtol=0)
    assert (sparse - x).abs().max() > 0.1   # the layer did something
    if layer.has_edge_weights and layer.dense_weights:
        torch.testing.assert_close(edge_values(w_dense, batch), w_sparse, atol=1e-12, rtol=0)
        assert w_sparse.shape == (batch.edge_index.size(1),)
        # no weight where there is no edge, padding included
        assert int((w_dense != 0).sum()) == int((w_sparse != 0).sum())
    else:
        assert w_dense is None


@pytest.mark.parametrize("edges", ["full", "knn:2"])
@pytest.mark.parametrize("name", DENSE)
def test_dense_path_trains_as_message_passing(name, edges):
    """Training takes the dense path on graphs with self-loops: in training mode, with graphs of different sizes
    (padding), its gradients equal the sparse path's, for the parameters and the input, and none is NaN."""
    torch.manual_seed(0)
    layer = build_layer(name, 12).double().train()
    for p in layer.parameters():  # the zero-initialised ones (BatchNorm, geometry map) would hide a path
        if not p.detach().any():
            torch.nn.init.uniform_(p, -0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    batch = collate_graphs([image_graph(torch.randn(n, 12, generator=g), grid_boxes(n), edges) for n in (5, 3, 7)])
    target = torch.randn(batch.num_nodes, 12, generator=g).double()

    def gradients(dense: bool):
        layer.zero_grad()
        x = batch.x.double().requires_grad_()
        if dense:
            dense_x, mask, adj = dense_inputs(batch, x)
            boxes = {"pos": to_dense_batch(batch.pos.double(), batch.batch)[0]} if layer.needs_pos else {}
            out = layer.forward_dense(dense_x, mask, adj=adj, **boxes)[0][mask]
        else:
            out = layer(x, batch.edge_index, batch.batch, **({"pos": batch.pos.double()} if layer.needs_pos else {}))[0]
        (out * target).sum().backward()
        return [x.grad] + [p.grad.clone() for p in layer.parameters()]

    sparse, dense = gradients(False), gradients(True)
    assert all(torch.isfinite(g).all() for g in dense)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)
    assert sparse[0].abs().max() > 0.1


@pytest.mark.parametrize("name", [n for n in DENSE if issubclass(LAYERS.get(n), PyGConvLayer)])
def test_a_dense_module_runs_on_its_convolution_parameters_and_adds_none_to_the_state(name):
    """The dense module of a layer that wraps a PyG convolution is a submodule without parameters of its own: the
    state dict holds the sparse convolution's once, under ``conv.``, and the dense path runs on whatever replaces them
    (``load_state_dict(assign=True)`` puts new tensors in) and follows the layer's mode."""
    torch.manual_seed(0)
    layer = build_layer(name, 12).double()
    assert isinstance(layer.dense, SharedDense) and list(layer.dense.parameters()) == []
    assert list(layer.state_dict()) == ["conv." + key for key in layer.conv.state_dict()]
    assert not layer.eval().dense.training and layer.train().dense.training
    before_reset = [p.clone() for p in layer.parameters()]
    layer.dense.reset_parameters()     # a walk over every module (PyG's reset) leaves the convolution to its layer
    assert all(torch.equal(a, b) for a, b in zip(before_reset, layer.parameters()))
    layer.eval()
    batch = complete_batch([5, 3], 12)
    x = batch.x.double()
    dense_x, mask, adj = dense_inputs(batch, x)
    before = layer.forward_dense(dense_x, mask, adj=adj)[0]
    layer.load_state_dict({key: 2 * value for key, value in layer.state_dict().items()}, assign=True)
    after = layer.forward_dense(dense_x, mask, adj=adj)[0]
    torch.testing.assert_close(after[mask], layer(x, batch.edge_index, batch.batch)[0], atol=1e-12, rtol=0)
    assert (after - before).abs().max() > 1e-3


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
    with pytest.raises(ConfigError, match=r"^unknown layer 'gcnn'; choose one of .*gat.*hsc"):
        build_layer("gcnn", 8)


TRAINABLE = sorted(set(LAYERS) - {"none"})


def layer_options(name: str) -> dict:
    """Config of a small model with ``name`` on the region graph and, where it can, on the word graph."""
    text_name = {"hsc": "hsc_text", "hsc_text": "hsc", "hsc_geo": "hsc_text"}.get(name, name)
    needs = LAYERS.capability(name, "needs_edge_attr")
    return dict(img_gnn=name, txt_gnn=text_name, img_edges="spatial" if needs else "full", img_edge_features=needs,
                txt_edge_features=needs)


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_layer_type_trains_on_both_graphs(name):
    torch.manual_seed(0)
    cfg = Config(img_dim=10, vocab_size=30, embed_size=16, word_dim=16, sim_dim=8, num_regions=6, img_layers=2,
                 txt_layers=2, **layer_options(name))
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    images = [image_graph(torch.randn(6, 10, generator=g), grid_boxes(6), cfg.img_edges) for _ in range(3)]
    captions = [caption_graph(torch.randint(4, 30, (n,), generator=g)) for n in (5, 3, 8, 4)]
    pairs = PairBatch(images=collate_graphs(images), captions=collate_graphs(captions),
                      img_index=torch.tensor([0, 1, 2, 0]), img_ids=torch.arange(3), cap_ids=torch.arange(4))
    out = BatchScores(model)(pairs)
    assert out.scores.shape == out.cosine.shape == (4, 4)
    (out.scores.sum() + (out.scale * out.cosine).sum()).backward()   # the hinge's and the first stage's inputs
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient with layer {name}"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient with layer {name}"
    states = model.image_encoder(pairs.images, ("higher",), return_weights=True)
    for layer, w in zip(model.image_encoder.stack.layers, states.edge_weights):
        if layer.has_edge_weights:
            assert w.shape == (pairs.images.edge_index.size(1),)
        else:
            assert w is None


# --------------------------------------------------------------------------- explicit layer arguments
def test_layer_arguments_are_explicit_and_reach_every_layer():
    cfg = ModelConfig(img_dim=10, vocab_size=30, embed_size=16, word_dim=16, sim_dim=8, num_regions=6,
                      img_gnn="gat", txt_gnn="transformer", img_layer_heads=2, txt_layer_heads=8,
                      txt_layer_dropout=0.25)
    model = build_model(cfg)
    assert [layer.conv.heads for layer in model.image_encoder.stack.layers] == [2] * 4
    assert [(layer.conv.heads, layer.conv.dropout) for layer in model.text_encoder.stack.layers] == [(8, 0.25)] * 4
    hsc = build_model(ModelConfig(img_dim=10, vocab_size=30, embed_size=16, word_dim=16, sim_dim=8, num_regions=6,
                                  txt_layer_dropout=0.3))
    assert [layer.dropout.p for layer in hsc.text_encoder.stack.layers] == [0.3] * 4


@pytest.mark.parametrize("values, message", [
    (dict(txt_gnn="gcn", txt_layer_dropout=0.1),
     r"^txt_gnn='gcn', txt_layer_dropout=0\.1: layer 'gcn' cannot take dropout; it accepts no arguments$"),
    (dict(txt_layer_heads=2), r"^txt_gnn='hsc_text', txt_layer_heads=2: layer 'hsc_text' cannot take heads; "
                              r"it accepts dropout$"),
    (dict(img_layer_dropout=0.1), r"^img_gnn='hsc', img_layer_dropout=0\.1: layer 'hsc' cannot take dropout; "
                                  r"it accepts heads$"),
])
def test_an_argument_the_layer_cannot_take_is_an_error(values, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)
    with pytest.raises(ConfigError, match=r"^layer 'sage' cannot take heads; it accepts no arguments$"):
        build_layer("sage", 8, heads=2)


# --------------------------------------------------------------------------- edge features and completeness
class _EdgeAttrProbe(RelationalLayer):
    """Test layer: adds the mean edge feature it receives to every node (so its output proves what it got)."""

    supports_edge_attr = True
    has_edge_weights = False

    def __init__(self, channels: int, edge_dim: int | None = None):
        super().__init__()
        self.edge_dim = edge_dim
        self.received = []

    def forward(self, x, edge_index, batch=None, return_weights=False, edge_attr=None):
        self.received.append(edge_attr)
        return x + (0.0 if edge_attr is None else edge_attr.mean()), None


def test_edge_features_reach_the_layers_that_declare_them():
    register_layer("edge_attr_probe")(_EdgeAttrProbe)
    try:
        boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.4, 0.9, 0.9], [0.0, 0.6, 0.2, 0.8]])
        graphs = [image_graph(torch.randn(3, 4), boxes, edges="spatial") for _ in range(2)]
        batch = collate_graphs(graphs)
        assert batch.edge_attr.shape == (batch.edge_index.size(1), 5)
        probe = RelationalStack("edge_attr_probe", 4, 2, {"edge_dim": 5})
        probe(batch.x, batch, edge_attr=batch.edge_attr)
        assert all(torch.equal(got, batch.edge_attr) for got in (layer.received[0] for layer in probe.layers))
        # built without edge_dim, it gets none; layers that do not declare it run on the same batch without it
        unused = RelationalStack("edge_attr_probe", 4, 1)
        unused(batch.x, batch, edge_attr=batch.edge_attr)
        assert unused.layers[0].received == [None]
        plain = RelationalStack("hsc", 4, 1)
        states, _, _ = plain(batch.x, batch, edge_attr=batch.edge_attr)
        assert states[-1].shape == (2, 3, 4)
    finally:
        LAYERS.unregister("edge_attr_probe")


def test_knn_graphs_take_the_dense_path_over_their_own_edges_whatever_the_caller_calls_them():
    # bug of the spec-based flag: knn graphs collated as "full" took the complete graph's adjacency (states off by 0.23)
    torch.manual_seed(0)
    stack = RelationalStack("hsc", 8, 2).double().eval()
    for layer in stack.layers:   # non-zero BatchNorm so that the layers change the states
        torch.nn.init.ones_(layer.norm.weight)
    graphs = [image_graph(torch.randn(n, 8), edges="knn:2") for n in (5, 4)]
    batch = collate_graphs(graphs)
    assert batch.complete is False and batch.looped is True
    states, mask, weights = stack(batch.x.double(), batch, return_weights=True)
    x, reference_weights = batch.x.double(), []
    for layer in stack.layers:   # the plain message passing over the knn edges
        x, w = layer(x, batch.edge_index, batch.batch, return_weights=True)
        reference_weights.append(w)
    dense_reference, _ = to_dense_batch(x, batch.batch)
    torch.testing.assert_close(states[-1], dense_reference, atol=1e-12, rtol=0)
    for w, reference in zip(weights, reference_weights):   # per edge, in the batch's edge order
        torch.testing.assert_close(w, reference, atol=1e-12, rtol=0)
    complete = collate_graphs([image_graph(g.x, edges="full") for g in graphs])
    assert complete.complete is True
    assert (stack(complete.x.double(), complete)[0][-1] - states[-1]).abs().max() > 1e-3
