"""Images and captions as PyG graphs, relational edges chosen by name, and the collate functions.

An image is a graph of region nodes (``x [R, D]`` float32, ``pos [R, 4]`` boxes when the data has them); a caption is a
graph of word nodes (``x [L]`` token ids). Edges come from a builder named by a spec string:

=============  ==========================================================================================================
``full``       complete graph with self-loops, ``N * N`` edges (the HSC default)
``knn:K``      each node receives edges from its K nearest nodes by feature cosine, plus a self-loop: ``N * (K + 1)``
               edges (K is clamped to ``N - 1``); region graphs only
``spatial``    regions that overlap or whose centres are near (within 1.5 x the mean box size), self-loops included;
               ``edge_attr [E, 5]``, the geometry of source j relative to target i (boxes x1, y1, x2, y2; centre
               ``c``, width ``w``, height ``h``): ``(cx_j - cx_i) / w_i``, ``(cy_j - cy_i) / h_i``,
               ``log(w_j / w_i)``, ``log(h_j / h_i)``, ``IoU(i, j)``; kept in the ``Data`` / ``Batch``; needs boxes
               (asking for it on data without boxes is a DataError); region graphs only
``window:K``   nodes at most K positions apart, self-loops included: ``N * (2K + 1) - K * (K + 1)`` edges when N > K
``none``       no edges (``E = 0``)
=============  ==========================================================================================================

Edge convention (PyG's ``source_to_target`` flow): ``edge_index[0]`` is the source j, ``edge_index[1]`` the target i,
and edges are sorted by target, then by source. For ``full`` this is row-major over (target, source): edge ``e = i * N +
j``, so per-edge weights reshaped to ``[N, N]`` give ``w[i, j]`` with i the target (receiving) node.

Edge features reach a layer only when the model config asks for them (``img_edge_features`` / ``txt_edge_features``);
their width is :func:`edge_feature_size` (the builder's ``edge_attr`` capability for region graphs), which the config
passes to the layer's constructor as ``edge_dim``. Word graphs get their relation features from word order, whatever
the builder: :func:`word_relations` (``[E, 2]``: ``(j - i) / L`` and ``clip(j - i, -4, 4) / 4`` for the edge from
word j to word i of a caption of L words), computed by the word-graph encoder from the batch (no data to carry).

Whether the layers may take their dense path is read from the edges by :func:`collate_graphs`, never from the spec:
on complete graphs the adjacency is implicit; on other graphs whose every node has one self-loop and no edge repeats
(``knn``, ``spatial``, ``window``) it is :func:`dense_adjacency`, and :func:`edge_values` reads per-edge weights back
from the dense ``[B, N, N]`` layout.

Edge tensors of ``full``, ``window:K`` and ``none`` depend only on the node count: they are built once per count and
cached, so many ``Data`` objects share one tensor. Do not modify an ``edge_index`` in place.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data
from torch_geometric.utils import to_dense_adj

from ..errors import ConfigError, DataError
from ..registry import Registry

#: A region pair is "near" for ``spatial`` when its centre distance is at most this many times the mean box size
#: (the mean of the two boxes' sqrt(w * h)). 1.5 joins a grid cell to its 8 neighbours.
SPATIAL_NEAR = 1.5


#: Word offsets beyond this many positions are clipped in the second column of :func:`word_relations`.
WORD_OFFSET_CLIP = 4
#: Columns of :func:`word_relations`: the relative offset ``(j - i) / L`` and the clipped offset.
WORD_RELATION_FEATURES = 2
#: Columns of :func:`box_geometry`.
BOX_GEOMETRY_FEATURES = 4

#: Edge builders by name: ``fn(num_nodes, x, pos, k) -> (edge_index [2, E], edge_attr [E, F] | None)``, with the
#: capabilities ``takes_k`` (the spec is ``name:K`` with a positive integer K), ``needs_x`` / ``needs_pos`` (the builder
#: needs node features / boxes, so it applies to region graphs only) and ``edge_attr`` (features per edge it returns).
EDGE_BUILDERS: Registry[Callable[..., tuple[Tensor, Tensor | None]]] = Registry("edge builder")


def register_edge_builder(name: str, *, takes_k: bool = False, needs_x: bool = False, needs_pos: bool = False,
                          edge_attr: int = 0):
    """Register ``fn(num_nodes, x, pos, k) -> (edge_index [2, E], edge_attr [E, edge_attr] | None)`` under ``name``."""
    return EDGE_BUILDERS.register(name, takes_k=takes_k, needs_x=needs_x, needs_pos=needs_pos, edge_attr=edge_attr)


def _valid_specs() -> str:
    return ", ".join(f"{n}:K" if EDGE_BUILDERS.capability(n, "takes_k") else n for n in EDGE_BUILDERS)


@functools.lru_cache(maxsize=None)
def parse_edge_spec(spec: str) -> tuple[str, int | None]:
    """``"knn:8"`` -> ``("knn", 8)``, ``"full"`` -> ``("full", None)``; ConfigError on an unknown name or a bad K."""
    name, sep, arg = str(spec).partition(":")
    if name not in EDGE_BUILDERS:
        raise ConfigError(f"edge spec {spec!r} is unknown; valid: {_valid_specs()}")
    if not EDGE_BUILDERS.capability(name, "takes_k"):
        if sep:
            raise ConfigError(f"edge spec {spec!r}: {name} takes no :K; write {name!r}")
        return name, None
    # ASCII digits only: "²".isdigit() is True but int("²") fails
    if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:
        raise ConfigError(f"edge spec {spec!r}: {name} needs a positive integer K, e.g. {name}:8; found {arg!r}")
    return name, int(arg)


def check_edge_spec(spec: str, *, graph: str, has_pos: bool = True) -> None:
    """Fail early (ConfigError / DataError) if ``spec`` cannot build ``graph`` ("image" or "caption") edges."""
    name, _ = parse_edge_spec(spec)
    needs_x, needs_pos = (EDGE_BUILDERS.capability(name, key) for key in ("needs_x", "needs_pos"))
    if graph == "caption" and (needs_x or needs_pos):
        raise ConfigError(f"txt_edges={spec!r} applies to region graphs only (it needs region features or boxes); "
                          "for captions use full, window:K or none")
    if needs_pos and not has_pos:
        raise DataError(f"img_edges={spec!r} needs region boxes ({{split}}_boxes.npy [N, R, 4]) but the data has none; "
                        "add the boxes file or use img_edges=full or knn:K")


def edge_feature_size(spec: str, *, graph: str) -> int:
    """Columns of the edge features of ``graph`` ("image" or "caption") graphs built by ``spec``: the builder's
    ``edge_attr`` for region graphs (0: it builds none), :data:`WORD_RELATION_FEATURES` for word graphs."""
    name, _ = parse_edge_spec(spec)
    return WORD_RELATION_FEATURES if graph == "caption" else EDGE_BUILDERS.capability(name, "edge_attr")


def word_relations(edge_index: Tensor, batch: Tensor) -> Tensor:
    """Relation features of word-graph edges, ``[E, 2]`` float32: for the edge from word j to word i of a caption of
    L words, ``(j - i) / L`` (in (-1, 1)) and ``clip(j - i, -4, 4) / 4`` (the order of near words).

    ``edge_index`` and ``batch [num_nodes]`` (node -> caption) of a batch of word graphs: nodes are in word order
    within each graph, so node index differences are word offsets.
    """
    source, target = edge_index
    offset = (source - target).float()
    length = torch.bincount(batch)[batch[target]].float()
    return torch.stack([offset / length, offset.clamp(-WORD_OFFSET_CLIP, WORD_OFFSET_CLIP) / WORD_OFFSET_CLIP], dim=1)


def box_geometry(target: Tensor, source: Tensor) -> Tensor:
    """Relative geometry of boxes ``[..., 4]`` (x1, y1, x2, y2; broadcast), ``[..., 4]``: the log-ratio features of
    Relation Networks (Hu et al., CVPR 2018) and the Object Relation Transformer (Herdade et al., NeurIPS 2019),
    ``log(|cx_j - cx_i| / w_i)``, ``log(|cy_j - cy_i| / h_i)``, ``log(w_j / w_i)``, ``log(h_j / h_i)`` for source j
    and target i. Centre offsets are clamped at 1e-3 of the box size (``log`` >= -6.9, also for j = i) and sizes at
    1e-6 (so zero boxes, e.g. padding, stay finite)."""
    def parts(box: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x1, y1, x2, y2 = box.unbind(-1)
        return (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1).clamp_min(1e-6), (y2 - y1).clamp_min(1e-6)

    cx_i, cy_i, w_i, h_i = parts(target)
    cx_j, cy_j, w_j, h_j = parts(source)
    return torch.stack([
        torch.log(((cx_j - cx_i).abs() / w_i).clamp_min(1e-3)),
        torch.log(((cy_j - cy_i).abs() / h_i).clamp_min(1e-3)),
        torch.log(w_j / w_i),
        torch.log(h_j / h_i),
    ], dim=-1)


def make_edges(spec: str, num_nodes: int, x: Tensor | None = None, pos: Tensor | None = None,
               ) -> tuple[Tensor, Tensor | None]:
    """Edges of a graph of ``num_nodes`` nodes: ``(edge_index [2, E] long, edge_attr [E, F] or None)``.

    ``x [N, D]`` node features (for ``knn``), ``pos [N, 4]`` boxes x1, y1, x2, y2 (for ``spatial``).
    """
    name, k = parse_edge_spec(spec)
    if EDGE_BUILDERS.capability(name, "needs_x") and x is None:
        raise ConfigError(f"edge spec {spec!r} needs node features x; it applies to region graphs only")
    if EDGE_BUILDERS.capability(name, "needs_pos") and pos is None:
        raise DataError(f"edge spec {spec!r} needs region boxes (pos [N, 4]) but none were given; "
                        "add {split}_boxes.npy to the data or use full or knn:K")
    return EDGE_BUILDERS.get(name)(num_nodes, x, pos, k)


# ---- builders ----------------------------------------------------------------------------------------------------

def _from_mask(mask: Tensor) -> Tensor:
    """``mask[i, j]`` (target i, source j) -> edge_index sorted by target then source."""
    target, source = mask.nonzero(as_tuple=True)
    return torch.stack([source, target])


@functools.lru_cache(maxsize=None)
def complete_edges(num_nodes: int) -> Tensor:
    """Complete graph with self-loops, ``[2, N * N]``, edge ``i * N + j`` = source j -> target i (cached)."""
    nodes = torch.arange(num_nodes)
    return torch.stack([nodes.repeat(num_nodes), nodes.repeat_interleave(num_nodes)])


@functools.lru_cache(maxsize=None)
def window_edges(num_nodes: int, k: int) -> Tensor:
    """Edges between nodes at most ``k`` positions apart, self-loops included (cached)."""
    nodes = torch.arange(num_nodes)
    return _from_mask((nodes[:, None] - nodes[None, :]).abs() <= k)


@functools.lru_cache(maxsize=None)
def _no_edges() -> Tensor:
    return torch.empty(2, 0, dtype=torch.long)


@register_edge_builder("full")
def _full(num_nodes, x, pos, k):
    return complete_edges(num_nodes), None


@register_edge_builder("knn", takes_k=True, needs_x=True)
def _knn(num_nodes, x, pos, k):
    k = max(0, min(k, num_nodes - 1))
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = xn @ xn.t()
    sim.fill_diagonal_(-math.inf)
    neighbours = sim.topk(k, dim=1).indices
    nodes = torch.arange(num_nodes)
    source = torch.cat([nodes[:, None], neighbours], dim=1)  # [N, K + 1], self-loop first, then nearest first
    target = nodes[:, None].expand_as(source)
    return torch.stack([source.reshape(-1), target.reshape(-1)]), None


@register_edge_builder("spatial", needs_pos=True, edge_attr=5)
def _spatial(num_nodes, x, pos, k):
    box = pos.float()
    if box.shape != (num_nodes, 4):
        raise DataError(f"spatial edges need boxes of shape [{num_nodes}, 4] (x1, y1, x2, y2), found {list(box.shape)}")
    x1, y1, x2, y2 = box.unbind(-1)
    w, h = (x2 - x1).clamp_min(1e-6), (y2 - y1).clamp_min(1e-6)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # pairwise [target i, source j]
    iw = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :])).clamp_min(0)
    ih = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :])).clamp_min(0)
    inter = iw * ih
    area = w * h
    iou = inter / (area[:, None] + area[None, :] - inter)
    size = area.sqrt()
    dist = torch.hypot(cx[None, :] - cx[:, None], cy[None, :] - cy[:, None])
    near = dist <= SPATIAL_NEAR * (size[:, None] + size[None, :]) / 2
    mask = (inter > 0) | near | torch.eye(num_nodes, dtype=torch.bool)
    edge_index = _from_mask(mask)
    j, i = edge_index
    edge_attr = torch.stack([
        (cx[j] - cx[i]) / w[i],       # source centre relative to the target box
        (cy[j] - cy[i]) / h[i],
        torch.log(w[j] / w[i]),
        torch.log(h[j] / h[i]),
        iou[i, j],
    ], dim=1)
    return edge_index, edge_attr


@register_edge_builder("window", takes_k=True)
def _window(num_nodes, x, pos, k):
    return window_edges(num_nodes, k), None


@register_edge_builder("none")
def _none(num_nodes, x, pos, k):
    return _no_edges(), None


# ---- graphs --------------------------------------------------------------------------------------------------------

def image_graph(features: Tensor, boxes: Tensor | None = None, edges: str = "full") -> Data:
    """Region graph of one image: ``Data(x [R, D] float32, pos [R, 4] (when boxes), edge_index, edge_attr?)``."""
    if features.dim() != 2:
        raise DataError(f"image features must be [regions, dim], found shape {list(features.shape)}")
    x = features.float()
    num_nodes = x.shape[0]
    data = Data(x=x)
    if boxes is not None:
        if tuple(boxes.shape) != (num_nodes, 4):
            raise DataError(f"image boxes must be [{num_nodes}, 4] to match the {num_nodes} regions, "
                            f"found shape {list(boxes.shape)}")
        data.pos = boxes.float()
    data.edge_index, edge_attr = make_edges(edges, num_nodes, x=x, pos=data.pos if boxes is not None else None)
    if edge_attr is not None:
        data.edge_attr = edge_attr
    return data


def caption_graph(token_ids: Sequence[int] | Tensor, edges: str = "full") -> Data:
    """Word graph of one caption: ``Data(x [L] token ids (long), edge_index, num_nodes=L)``."""
    x = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    edge_index, _ = make_edges(edges, x.numel())
    return Data(x=x, edge_index=edge_index, num_nodes=x.numel())


# ---- collate -------------------------------------------------------------------------------------------------------

def is_complete(edge_index: Tensor, num_nodes: int) -> bool:
    """Whether ``edge_index`` is exactly the ``full`` builder's complete graph with self-loops, in its edge order
    (target-major), which the layers' dense paths assume. The cached tensor is recognised without comparing."""
    if edge_index.size(1) != num_nodes * num_nodes:
        return False
    full = complete_edges(num_nodes)
    return edge_index is full or torch.equal(edge_index.cpu(), full)


def is_looped(edge_index: Tensor, num_nodes: int) -> bool:
    """Whether every node has exactly one self-loop and no edge repeats: the graphs on which a layer's dense path
    over :func:`dense_adjacency` equals its message passing (PyG's dense layers add the self-loop these already
    have, and a repeated edge would count once in the dense adjacency's softmax but twice in the sparse one's)."""
    source, target = edge_index
    if int((source == target).sum()) != num_nodes:
        return False
    key = target * num_nodes + source
    return key.unique().numel() == key.numel()


def dense_adjacency(batch: Batch) -> Tensor:
    """``[B, N, N]`` float32 adjacency of a collated batch, target-major: ``adj[b, i, j] = 1`` for the edge ``j -> i``
    of graph b (``N = batch.max_nodes``; padding rows and columns zero)."""
    return to_dense_adj(batch.edge_index.flip(0), batch.batch, max_num_nodes=batch.max_nodes,
                        batch_size=batch.num_graphs)


def edge_values(dense: Tensor, batch: Batch) -> Tensor:
    """Per-edge values ``[E]`` (in ``batch.edge_index``'s order) from a target-major ``[B, N, N]`` layout."""
    source, target = batch.edge_index
    graph = batch.batch[target]
    offset = batch.ptr[graph]
    return dense[graph, target - offset, source - offset]


def collate_graphs(data_list: Sequence[Data]) -> Batch:
    """``Batch.from_data_list`` plus three plain attributes for the dense paths of the layers.

    ``batch.max_nodes`` (int): nodes of the largest graph, the ``max_num_nodes`` of ``to_dense_batch``;
    ``batch.complete`` (bool): every graph's edges are the complete graph with self-loops (read from the edges, see
    :func:`is_complete`), so layers may use batched matmul with an implicit all-ones adjacency;
    ``batch.looped`` (bool): complete, or every node has one self-loop and no edge repeats (:func:`is_looped`), so
    layers may use batched matmul over :func:`dense_adjacency`. Edge features (``edge_attr``, e.g. of ``spatial``) are
    batched with the edges. The attributes survive ``batch.to(device)``, ``clone()`` and pickling (DataLoader workers).
    """
    batch = Batch.from_data_list(list(data_list))
    batch.max_nodes = max((int(d.num_nodes) for d in data_list), default=0)
    batch.complete = all(is_complete(d.edge_index, int(d.num_nodes)) for d in data_list)
    batch.looped = batch.complete or is_looped(batch.edge_index, int(batch.num_nodes))
    return batch


@dataclass
class PairBatch:
    """A training minibatch: B captions and the distinct images they belong to.

    ``images``: Batch of the distinct images (first-appearance order); ``captions``: Batch of the B captions;
    ``img_index [B]``: row in ``images`` of each caption's image; ``img_ids [n_img]``: dataset index of each image
    graph; ``cap_ids [B]``: dataset index of each caption.
    """

    images: Batch
    captions: Batch
    img_index: Tensor
    img_ids: Tensor
    cap_ids: Tensor

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        return PairBatch(
            images=self.images.to(device, non_blocking=non_blocking),
            captions=self.captions.to(device, non_blocking=non_blocking),
            img_index=self.img_index.to(device, non_blocking=non_blocking),
            img_ids=self.img_ids.to(device, non_blocking=non_blocking),
            cap_ids=self.cap_ids.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.cap_ids.numel())


def collate_pairs(items: Sequence[tuple[Data, Data, int, int]]) -> PairBatch:
    """Collate ``(image Data, caption Data, image index, caption index)`` items; each distinct image is one graph."""
    rows: dict[int, int] = {}
    images: list[Data] = []
    img_index = []
    for image, _, i, _ in items:
        i = int(i)
        if i not in rows:
            rows[i] = len(images)
            images.append(image)
        img_index.append(rows[i])
    return PairBatch(
        images=collate_graphs(images),
        captions=collate_graphs([item[1] for item in items]),
        img_index=torch.tensor(img_index, dtype=torch.long),
        img_ids=torch.tensor(list(rows), dtype=torch.long),
        cap_ids=torch.tensor([int(item[3]) for item in items], dtype=torch.long),
    )
