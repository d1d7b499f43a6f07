"""Images and captions as PyG graphs, relational edges chosen by name, and the collate functions.

An image is a graph of region nodes (``x [R, D]`` float32, ``pos [R, 4]`` boxes when the data has them); a caption is a
graph of word nodes (``x [L]`` token ids). Edges come from a builder named by a spec string:

=============  ==========================================================================================================
``full``       complete graph with self-loops, ``N * N`` edges (the HSC default)
``knn:K``      each node receives edges from its K nearest nodes by feature cosine, plus a self-loop: ``N * (K + 1)``
               edges (K is clamped to ``N - 1``); region graphs only
``spatial``    regions that overlap or whose centres are near (within 1.5 x the mean box size), self-loops included;
               ``edge_attr [E, 5]`` = relative geometry; needs boxes; region graphs only
``window:K``   nodes at most K positions apart, self-loops included: ``N * (2K + 1) - K * (K + 1)`` edges when N > K
``none``       no edges (``E = 0``)
=============  ==========================================================================================================

Edge convention (PyG's ``source_to_target`` flow): ``edge_index[0]`` is the source j, ``edge_index[1]`` the target i,
and edges are sorted by target, then by source. For ``full`` this is row-major over (target, source): edge ``e = i * N +
j``, so per-edge weights reshaped to ``[N, N]`` give ``w[i, j]`` with i the target (receiving) node.

Edge tensors of ``full``, ``window:K`` and ``none`` depend only on the node count: they are built once per count and
cached, so many ``Data`` objects share one tensor. Do not modify an ``edge_index`` in place.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from ..errors import ConfigError, DataError

#: A region pair is "near" for ``spatial`` when its centre distance is at most this many times the mean box size
#: (the mean of the two boxes' sqrt(w * h)). 1.5 joins a grid cell to its 8 neighbours.
SPATIAL_NEAR = 1.5


class EdgeBuilderInfo(NamedTuple):
    fn: Callable[..., tuple[Tensor, Tensor | None]]
    takes_k: bool
    needs_x: bool
    needs_pos: bool


EDGE_BUILDERS: dict[str, EdgeBuilderInfo] = {}


def register_edge_builder(name: str, *, takes_k: bool = False, needs_x: bool = False, needs_pos: bool = False):
    """Register ``fn(num_nodes, x, pos, k) -> (edge_index [2, E], edge_attr [E, F] | None)`` under ``name``.

    ``takes_k``: the spec is ``name:K`` with a positive integer K; ``needs_x`` / ``needs_pos``: the builder needs node
    features / boxes (so it applies to region graphs only).
    """

    def decorator(fn):
        if name in EDGE_BUILDERS:
            raise ValueError(f"edge builder {name!r} is already registered")
        EDGE_BUILDERS[name] = EdgeBuilderInfo(fn, takes_k, needs_x, needs_pos)
        return fn

    return decorator


def _valid_specs() -> str:
    return ", ".join(f"{n}:K" if info.takes_k else n for n, info in EDGE_BUILDERS.items())


@functools.lru_cache(maxsize=None)
def parse_edge_spec(spec: str) -> tuple[str, int | None]:
    """``"knn:8"`` -> ``("knn", 8)``, ``"full"`` -> ``("full", None)``; ConfigError on an unknown name or a bad K."""
    name, sep, arg = str(spec).partition(":")
    info = EDGE_BUILDERS.get(name)
    if info is None:
        raise ConfigError(f"edge spec {spec!r} is unknown; valid: {_valid_specs()}")
    if not info.takes_k:
        if sep:
            raise ConfigError(f"edge spec {spec!r}: {name} takes no :K; write {name!r}")
        return name, None
    if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:  # "²".isdigit() is true
        raise ConfigError(f"edge spec {spec!r}: {name} needs a positive integer K, e.g. {name}:8; found {arg!r}")
    return name, int(arg)


def check_edge_spec(spec: str, *, graph: str, has_pos: bool = True) -> None:
    """Fail early (ConfigError / DataError) if ``spec`` cannot build ``graph`` ("image" or "caption") edges."""
    name, _ = parse_edge_spec(spec)
    info = EDGE_BUILDERS[name]
    if graph == "caption" and (info.needs_x or info.needs_pos):
        raise ConfigError(f"txt_edges={spec!r} applies to region graphs only (it needs region features or boxes); "
                          "for captions use full, window:K or none")
    if info.needs_pos and not has_pos:
        raise DataError(f"img_edges={spec!r} needs region boxes ({{split}}_boxes.npy [N, R, 4]) but the data has none; "
                        "add the boxes file or use img_edges=full or knn:K")


def make_edges(spec: str, num_nodes: int, x: Tensor | None = None, pos: Tensor | None = None,
               ) -> tuple[Tensor, Tensor | None]:
    """Edges of a graph of ``num_nodes`` nodes: ``(edge_index [2, E] long, edge_attr [E, F] or None)``.

    ``x [N, D]`` node features (for ``knn``), ``pos [N, 4]`` boxes x1, y1, x2, y2 (for ``spatial``).
    """
    name, k = parse_edge_spec(spec)
    info = EDGE_BUILDERS[name]
    if info.needs_x and x is None:
        raise ConfigError(f"edge spec {spec!r} needs node features x; it applies to region graphs only")
    if info.needs_pos and pos is None:
        raise DataError(f"edge spec {spec!r} needs region boxes (pos [N, 4]) but none were given; "
                        "add {split}_boxes.npy to the data or use full or knn:K")
    return info.fn(num_nodes, x, pos, k)


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


@register_edge_builder("spatial", needs_pos=True)
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

def collate_graphs(data_list: Sequence[Data], edges_spec: str) -> Batch:
    """``Batch.from_data_list`` plus two plain attributes for the dense paths of the layers.

    ``batch.max_nodes`` (int): nodes of the largest graph, the ``max_num_nodes`` of ``to_dense_batch``;
    ``batch.complete`` (bool): every graph is complete (``edges_spec == "full"``), so layers may use batched matmul.
    Both survive ``batch.to(device)``, ``clone()`` and pickling (DataLoader workers).
    """
    batch = Batch.from_data_list(list(data_list))
    batch.max_nodes = max((int(d.num_nodes) for d in data_list), default=0)
    batch.complete = edges_spec == "full"
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


def collate_pairs(items: Sequence[tuple[Data, Data, int, int]], img_edges: str = "full", txt_edges: str = "full",
                  ) -> PairBatch:
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
        images=collate_graphs(images, img_edges),
        captions=collate_graphs([item[1] for item in items], txt_edges),
        img_index=torch.tensor(img_index, dtype=torch.long),
        img_ids=torch.tensor(list(rows), dtype=torch.long),
        cap_ids=torch.tensor([int(item[3]) for item in items], dtype=torch.long),
    )


class PairCollate:
    """Picklable ``collate_fn`` for ``CaptionDataset`` loaders (DataLoader workers).

    The edges are built per item by the dataset; the specs here only set ``complete`` and must be the dataset's
    (``CaptionDataset.collate_fn`` is this class with the right specs).
    """

    def __init__(self, img_edges: str = "full", txt_edges: str = "full") -> None:
        self.img_edges, self.txt_edges = img_edges, txt_edges

    def __call__(self, items) -> PairBatch:
        return collate_pairs(items, self.img_edges, self.txt_edges)


class GraphCollate:
    """Picklable ``collate_fn`` for ``ImageDataset`` / ``TextDataset`` loaders: a list of Data -> Batch (see
    :class:`PairCollate` about the spec; the datasets' ``collate_fn`` is this class with the right spec)."""

    def __init__(self, edges_spec: str = "full") -> None:
        self.edges_spec = edges_spec

    def __call__(self, data_list) -> Batch:
        return collate_graphs(data_list, self.edges_spec)
