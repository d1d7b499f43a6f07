"""Graphs of images and captions: edge builders, batching without padding, pair collation."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch_geometric.data import Batch

from hsc_pyg.data import graphs
from hsc_pyg.data.graphs import (
    EDGE_BUILDERS, PairBatch, caption_graph, collate_graphs, collate_pairs, complete_edges, dense_adjacency,
    edge_values, image_graph, is_complete, is_looped, make_edges, parse_edge_spec, register_edge_builder,
)
from hsc_pyg.errors import ConfigError, DataError


def grid_boxes(side: int = 6) -> torch.Tensor:
    r, c = torch.arange(side * side).div(side, rounding_mode="floor"), torch.arange(side * side) % side
    return torch.stack([c, r, c + 1, r + 1], dim=1).float() / side


def test_full_graph_of_five_images():
    images = [image_graph(torch.randn(36, 16)) for _ in range(5)]
    batch = collate_graphs(images)
    assert batch.num_nodes == 180 and batch.x.shape == (180, 16)
    assert batch.edge_index.shape == (2, 5 * 36 * 36)
    assert batch.max_nodes == 36 and batch.complete is True
    # second image's edges are offset by 36
    assert batch.edge_index[:, 1296:2592].min() == 36 and batch.edge_index[:, 1296:2592].max() == 71


def test_full_edge_order_is_row_major_by_target():
    n = 4
    edge_index, edge_attr = make_edges("full", n)
    assert edge_attr is None
    source, target = edge_index
    assert target.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert source.tolist() == [0, 1, 2, 3] * 4
    # weights per edge reshaped [N, N] are w[target, source]
    w = (10 * target + source).float().reshape(n, n)
    assert w[2, 3] == 23


def test_edge_indices_are_cached_per_node_count():
    assert complete_edges(36) is complete_edges(36)
    assert make_edges("full", 36)[0] is complete_edges(36)
    assert make_edges("window:2", 9)[0] is make_edges("window:2", 9)[0]
    a, b = image_graph(torch.randn(36, 8)), image_graph(torch.randn(36, 8))
    assert a.edge_index is b.edge_index
    c1, c2 = caption_graph([1, 5, 6, 2]), caption_graph([1, 7, 8, 2])
    assert c1.edge_index is c2.edge_index


def test_knn_edges():
    # nodes on a line: 0 at 0 deg, 1 at 10 deg, 2 at 30 deg, 3 at 90 deg, 4 at 100 deg
    angles = torch.tensor([0.0, 10.0, 30.0, 90.0, 100.0]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], dim=1) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])
    edge_index, attr = make_edges("knn:2", 5, x=x)
    assert attr is None and edge_index.shape == (2, 5 * 3)
    source, target = edge_index.view(2, 5, 3)
    assert target.tolist() == [[i] * 3 for i in range(5)]
    assert source.tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 2], [4, 3, 2]]  # self, then nearest by cosine
    assert make_edges("knn:50", 5, x=x)[0].shape == (2, 25)  # K clamped to N - 1
    assert image_graph(torch.randn(36, 8), edges="knn:8").edge_index.shape == (2, 36 * 9)


@pytest.mark.parametrize("n, k, edges", [(10, 2, 44), (3, 1, 7), (2, 5, 4), (1, 3, 1)])
def test_window_edges(n, k, edges):
    edge_index, _ = make_edges(f"window:{k}", n)
    assert edge_index.shape == (2, edges)
    source, target = edge_index
    assert (source - target).abs().max() <= k
    assert len(set(zip(source.tolist(), target.tolist()))) == edges  # no duplicates
    if n > k:
        assert edges == n * (2 * k + 1) - k * (k + 1)


def test_spatial_edges_on_a_grid():
    graph = image_graph(torch.randn(36, 8), grid_boxes(), edges="spatial")
    # 8-neighbourhood plus self: 16 inner cells x 9 + 16 border cells x 6 + 4 corners x 4
    assert graph.edge_index.shape == (2, 256) and graph.edge_attr.shape == (256, 5)
    assert torch.equal(graph.pos, grid_boxes())
    source, target = graph.edge_index
    attr = {(int(j), int(i)): a for j, i, a in zip(source, target, graph.edge_attr)}
    assert set(int(j) for j, i in attr if i == 7) == {0, 1, 2, 6, 7, 8, 12, 13, 14}
    assert torch.allclose(attr[(7, 7)], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(attr[(8, 7)], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-6)  # source one cell to the right
    assert torch.allclose(attr[(1, 7)], torch.tensor([0.0, -1.0, 0.0, 0.0, 0.0]), atol=1e-6)  # one cell above


def test_spatial_overlap_and_geometry():
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.2, 0.2, 0.6, 0.6], [0.9, 0.9, 1.0, 1.0]])
    edge_index, attr = make_edges("spatial", 3, pos=boxes)
    assert edge_index.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 1, 2]]  # 0 and 1 overlap, 2 is far and small
    iou = 0.04 / (0.16 + 0.16 - 0.04)
    assert torch.allclose(attr[1], torch.tensor([0.5, 0.5, 0.0, 0.0, iou]), atol=1e-6)


def test_no_edges():
    edge_index, attr = make_edges("none", 7)
    assert edge_index.shape == (2, 0) and edge_index.dtype == torch.long and attr is None
    batch = collate_graphs([caption_graph([1, 4, 2], "none"), caption_graph([1, 2], "none")])
    assert batch.edge_index.shape == (2, 0) and batch.num_nodes == 5 and batch.complete is False
    assert batch.looped is False   # no self-loops: the dense layers would add them


def test_caption_batch_has_no_padding():
    captions = [caption_graph([1, 5, 6, 2]), caption_graph([1, 4, 5, 6, 7, 8, 2]), caption_graph([1, 2])]
    batch = collate_graphs(captions)
    assert batch.x.tolist() == [1, 5, 6, 2, 1, 4, 5, 6, 7, 8, 2, 1, 2]  # 13 nodes = 4 + 7 + 2
    assert torch.bincount(batch.batch).tolist() == [4, 7, 2]
    assert batch.ptr.tolist() == [0, 4, 11, 13]
    assert batch.edge_index.shape == (2, 16 + 49 + 4)
    assert batch.max_nodes == 7 and batch.complete is True
    assert collate_graphs([caption_graph(c.x, "window:1") for c in captions]).complete is False


def test_caption_graph_accepts_tensors():
    g = caption_graph(torch.tensor([1, 9, 2]), edges="window:1")
    assert g.x.dtype == torch.long and g.num_nodes == 3 and g.edge_index.shape == (2, 7)


def test_batch_attributes_survive_to_clone_and_pickle():
    batch = collate_graphs([image_graph(torch.randn(5, 4)), image_graph(torch.randn(3, 4))])
    moved = batch.to("cpu")
    assert (moved.max_nodes, moved.complete) == (5, True)
    assert (batch.clone().max_nodes, batch.clone().complete) == (5, True)
    restored = pickle.loads(pickle.dumps(batch))
    assert isinstance(restored, Batch) and (restored.max_nodes, restored.complete) == (5, True)
    assert restored.num_graphs == 2 and restored.num_nodes == 8


def _item(i, k, regions=4, words=3, img_edges="full", txt_edges="full"):
    image = image_graph(torch.full((regions, 2), float(i)) + 0.01 * torch.randn(regions, 2), edges=img_edges)
    caption = caption_graph([1] + [k + 4] * (words - 2) + [2], edges=txt_edges)
    return image, caption, i, k


def test_collate_pairs_deduplicates_images():
    items = [_item(3, 15), _item(1, 5), _item(3, 16), _item(2, 10), _item(1, 9)]
    pb = collate_pairs(items)
    assert isinstance(pb, PairBatch) and len(pb) == 5
    assert pb.img_ids.tolist() == [3, 1, 2]
    assert pb.img_index.tolist() == [0, 1, 0, 2, 1]
    assert pb.cap_ids.tolist() == [15, 5, 16, 10, 9]
    assert pb.images.num_graphs == 3 and pb.images.num_nodes == 12
    assert pb.images.x[::4, 0].round().tolist() == [3.0, 1.0, 2.0]
    assert pb.captions.num_graphs == 5 and pb.captions.num_nodes == 15
    moved = pb.to("cpu")
    assert isinstance(moved, PairBatch) and moved.images.max_nodes == 4 and moved.img_index.tolist() == [0, 1, 0, 2, 1]


def test_collate_reads_completeness_from_the_edges():
    # the collate functions take no spec: knn / window graphs are never mistaken for complete ones
    pb = pickle.loads(pickle.dumps(collate_pairs))(
        [_item(0, 0, img_edges="knn:2", txt_edges="window:1"), _item(1, 1, img_edges="knn:2", txt_edges="window:1")])
    assert pb.images.edge_index.shape == (2, 2 * 4 * 3) and pb.images.complete is False
    assert pb.captions.edge_index.shape == (2, 2 * 7) and pb.captions.complete is False
    g = collate_graphs([caption_graph([1, 2]), caption_graph([1, 5, 2])])
    assert g.max_nodes == 3 and g.complete is True
    # one incomplete graph makes the batch incomplete; N * N edges in another order are not the dense path's order
    assert collate_graphs([caption_graph([1, 2]), caption_graph([1, 5, 2], "window:1")]).complete is False
    full = complete_edges(3)
    assert is_complete(full.clone(), 3) and not is_complete(full.flip(1), 3) and not is_complete(full, 4)
    # the builders with self-loops take the dense path over their own adjacency; "none" does not
    assert pb.images.looped is True and pb.captions.looped is True and g.looped is True
    assert collate_graphs([caption_graph([1, 2]), caption_graph([1, 5, 2], "none")]).looped is False


def test_is_looped_needs_one_self_loop_per_node_and_no_repeated_edge():
    loops = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert is_looped(loops, 3) and is_looped(torch.cat([loops, torch.tensor([[0], [2]])], 1), 3)
    assert not is_looped(loops[:, :2], 3)                                   # node 2 has no self-loop
    assert not is_looped(torch.cat([loops, torch.tensor([[1], [1]])], 1), 3)  # two self-loops on node 1
    assert not is_looped(torch.cat([loops, torch.tensor([[0, 0], [2, 2]])], 1), 3)  # the edge 0 -> 2 twice


def test_dense_adjacency_and_edge_values_are_target_major_and_inverse():
    # knn edges are directed: i receives from its nearest j, not always the other way round
    g = torch.Generator().manual_seed(0)
    batch = collate_graphs([image_graph(torch.randn(n, 4, generator=g), edges="knn:1") for n in (4, 3)])
    adj = dense_adjacency(batch)
    assert adj.shape == (2, 4, 4) and adj.dtype == torch.float32
    source, target = batch.edge_index
    for b, (lo, hi) in enumerate(zip(batch.ptr[:-1].tolist(), batch.ptr[1:].tolist())):
        inside = (target >= lo) & (target < hi)
        expected = torch.zeros(4, 4)
        expected[target[inside] - lo, source[inside] - lo] = 1
        torch.testing.assert_close(adj[b], expected)
    assert not torch.equal(adj, adj.transpose(1, 2))   # the direction matters here
    values = torch.arange(batch.edge_index.size(1), dtype=torch.float32) + 1
    dense = torch.zeros(2, 4, 4)
    graph = batch.batch[target]
    dense[graph, target - batch.ptr[graph], source - batch.ptr[graph]] = values
    assert torch.equal(edge_values(dense, batch), values)


def test_register_a_new_edge_builder():
    @register_edge_builder("chain_test")
    def chain(num_nodes, x, pos, k):
        return torch.stack([torch.arange(num_nodes - 1), torch.arange(1, num_nodes)]), None

    try:
        assert caption_graph([1, 5, 6, 2], edges="chain_test").edge_index.tolist() == [[0, 1, 2], [1, 2, 3]]
        with pytest.raises(ValueError, match="edge builder 'chain_test' is already registered"):
            register_edge_builder("chain_test")(chain)
    finally:
        EDGE_BUILDERS.unregister("chain_test")
        parse_edge_spec.cache_clear()


@pytest.mark.parametrize("spec, message", [
    ("grid", r"^edge spec 'grid' is unknown; valid: full, knn:K, none, spatial, window:K$"),
    ("knn:²", r"^edge spec 'knn:²': knn needs a positive integer K, e\.g\. knn:8; found '²'$"),
    ("knn", r"^edge spec 'knn': knn needs a positive integer K, e\.g\. knn:8; found ''$"),
    ("knn:0", r"^edge spec 'knn:0': knn needs a positive integer K, e\.g\. knn:8; found '0'$"),
    ("window:two", r"^edge spec 'window:two': window needs a positive integer K, e\.g\. window:8; found 'two'$"),
    ("full:3", r"^edge spec 'full:3': full takes no :K; write 'full'$"),
])
def test_bad_edge_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        make_edges(spec, 4, x=torch.randn(4, 2))


def test_builders_missing_inputs():
    with pytest.raises(DataError, match=r"^edge spec 'spatial' needs region boxes \(pos \[N, 4\]\) but none were given; "
                                        r"add \{split\}_boxes\.npy to the data or use full or knn:K$"):
        image_graph(torch.randn(36, 8), edges="spatial")
    with pytest.raises(ConfigError, match=r"^edge spec 'knn:2' needs node features x; it applies to region graphs only$"):
        caption_graph([1, 4, 2], edges="knn:2")


def test_image_graph_shape_errors():
    with pytest.raises(DataError, match=r"^image features must be \[regions, dim\], found shape \[2, 36, 8\]$"):
        image_graph(torch.randn(2, 36, 8))
    with pytest.raises(DataError, match=r"^image boxes must be \[36, 4\] to match the 36 regions, found shape \[36, 5\]$"):
        image_graph(torch.randn(36, 8), torch.zeros(36, 5))


def test_check_edge_spec():
    graphs.check_edge_spec("spatial", graph="image", has_pos=True)
    graphs.check_edge_spec("window:3", graph="caption")
    with pytest.raises(ConfigError, match=r"^txt_edges='spatial' applies to region graphs only"):
        graphs.check_edge_spec("spatial", graph="caption")
