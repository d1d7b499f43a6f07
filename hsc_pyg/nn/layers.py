"""Relational message-passing layers, chosen by name.

Every layer maps node states ``x [num_nodes, channels]`` on a (batched) graph to new states of the same size and can
return the learned weight of each edge (affinity or attention) for visualisation. The registry :data:`LAYERS` (a
:class:`~hsc_pyg.registry.Registry`) maps a name to a class; ``img_gnn`` / ``txt_gnn`` in the model config pick one and
``img_layer_*`` / ``txt_layer_*`` give its keyword arguments, which must be ones its constructor takes.

Each class declares what it can do, as PyG's convolutions do: ``has_edge_weights`` (returns learned per-edge weights),
``supports_dense`` (a batched-matmul path for graphs whose every node has a self-loop, with the same weights as the
sparse path: a model trained on one is evaluated with the other), ``dense_weights`` (that path also returns the edge
weights), ``dense_pair_vectors`` (that path builds a vector per node pair, so it pays only where the padded layout has
no more pairs than the graphs have edges), ``supports_edge_attr`` (its constructor takes ``edge_dim`` and its
``forward`` then takes ``edge_attr [E, edge_dim]``, e.g. the ``spatial`` builder's relative geometry; the config
passes ``edge_dim`` from the edge builder when
``img_edge_features`` / ``txt_edge_features`` is set, and the encoders pass ``edge_attr`` only to layers built with
it), ``needs_edge_attr`` (it cannot run without edge features) and ``needs_pos`` (its ``forward`` takes the region
boxes ``pos [num_nodes, 4]``; region graphs with boxes only).

Edge convention (PyG's ``source_to_target`` flow): ``edge_index[0]`` is the source ``j``, ``edge_index[1]`` the target
``i``; a message travels ``j -> i``.

*Dense* paths: on graphs of at most a few dozen nodes the sum over the sources is a batched matrix product over the
``[B, N, N]`` adjacency (target-major, ``adj[b, i, j] = 1`` for the edge ``j -> i``), which never materialises the
``[E, d]`` message tensor. The stack takes it on complete graphs (the ``full`` builder; the adjacency is then the
all-ones block of each graph) and on any other graph whose every node has one self-loop and no edge repeats
(``knn``, ``spatial``, ``window``; :func:`~hsc_pyg.data.graphs.dense_adjacency`). HSC's own layers (MODEL.md §3) and
``hsc_geo`` compute it themselves; the layers that wrap a PyG convolution run a dense module beside it, on its
own parameters (:mod:`hsc_pyg.nn.dense`: PyG's dense convolutions for ``gcn``, ``gat``, ``sage``, ``graphconv`` and
``gin``; :class:`~hsc_pyg.nn.dense.DenseGATv2` and :class:`~hsc_pyg.nn.dense.DenseTransformer`, written there, for
``gatv2`` and ``transformer``). The graphs' own self-loops make the dense layers' ``add_loop`` change nothing: it sets
the diagonal to 1 in ``DenseGCNConv`` / ``DenseGATConv``, and adds the ``(1 + eps) x`` root term in ``DenseGINConv``
that ``GINConv`` adds too. ``gine`` has no dense path, and edge features always take the sparse path: a dense path
with them builds a vector for every node pair (``[B, N, N, C]``), which measured 2-6x slower than message passing over
the edges on ``spatial`` region graphs and on padded word graphs (README, layer types). ``tests/test_layers.py``
checks that every dense path gives the plain message passing's states and gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import (
    GATConv,
    GATv2Conv,
    GCNConv,
    GINConv,
    GINEConv,
    GraphConv,
    MessagePassing,
    SAGEConv,
    TransformerConv,
)
from torch_geometric.utils import degree

from ..data.graphs import BOX_GEOMETRY_FEATURES, box_geometry
from ..errors import ConfigError, DataError
from ..registry import Registry
from .dense import DenseGAT, DenseGATv2, DenseGCN, DenseGIN, DenseGraph, DenseSAGE, DenseTransformer, SharedDense
from .init import xavier_linear

LAYERS: Registry[type["RelationalLayer"]] = Registry("layer")
register_layer = LAYERS.register


def build_layer(name: str, channels: int, **kwargs) -> "RelationalLayer":
    """``LAYERS[name](channels, **kwargs)``; ConfigError for an unknown name or an argument the layer cannot take."""
    return LAYERS.build(name, channels, **kwargs)


def graph_sizes(batch: Tensor | None, x: Tensor) -> Tensor:
    """Node count of each node's own graph, ``[num_nodes, 1]``, in ``x``'s dtype and device."""
    if batch is None:
        return x.new_full((x.size(0), 1), float(x.size(0)))
    return degree(batch, dtype=x.dtype)[batch].unsqueeze(-1)


def _head_split(channels: int, heads: int, name: str) -> int:
    if heads < 1 or channels % heads:
        raise ConfigError(f"{name} layer: channels {channels} must be a multiple of heads {heads} (heads >= 1)")
    return channels // heads


def adjacency(mask: Tensor, adj: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``adj`` in ``dtype``, or for None the complete graphs' ``[B, N, N]`` adjacency: every real node pair."""
    return (mask.unsqueeze(2) & mask.unsqueeze(1)).to(dtype) if adj is None else adj.to(dtype)


class RelationalLayer(MessagePassing):
    """Base class: a residual relational layer on node states of a fixed width.

    Subclasses declare ``has_edge_weights`` (whether :meth:`forward` can return learned per-edge weights),
    ``supports_dense`` (whether :meth:`forward_dense` exists) and ``supports_edge_attr`` (whether
    :meth:`forward` takes ``edge_attr``). Constructors take ``channels`` and explicit keyword arguments only.
    """

    registry_name = "?"
    has_edge_weights = True
    supports_dense = False
    dense_weights = True
    dense_pair_vectors = False
    supports_edge_attr = False
    needs_edge_attr = False
    needs_pos = False
    #: width of the edge features this instance was built for (None: it takes none)
    edge_dim: int | None = None

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor | None = None,
                return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """``x [num_nodes, C]`` -> ``(x' [num_nodes, C], edge weights [E] or None)``; layers built with ``edge_dim``
        also take ``edge_attr [E, edge_dim]``, layers that declare ``needs_pos`` take ``pos [num_nodes, 4]``."""
        raise NotImplementedError

    def forward_dense(self, x: Tensor, mask: Tensor, return_weights: bool = False,
                      adj: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Dense form: ``x [B, N, C]``, ``mask [B, N]``, ``adj [B, N, N]`` (``adj[b, i, j] = 1`` for the edge ``j ->
        i``; None: each graph complete) -> ``(x' [B, N, C], weights [B, N, N] or None)``; layers that declare
        ``needs_pos`` also take ``pos [B, N, 4]``.

        ``weights[b, i, j]`` is the weight of the edge ``j -> i``, zero where there is no edge.
        """
        raise NotImplementedError(f"layer {self.registry_name!r} has no dense path")


@register_layer("none")
class IdentityLayer(RelationalLayer):
    """No relation: ``x' = x`` (SGRAF's encoders are HSC's with no relational layers)."""

    has_edge_weights = False
    supports_dense = True

    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x, edge_index, batch=None, return_weights=False):
        return x, None

    def forward_dense(self, x, mask, return_weights=False, adj=None):
        return x, None


@register_layer("hsc")
class HSCRegionBlock(RelationalLayer):
    r"""HSC's image relational block (MODEL.md §3) on the region graph.

    .. math::
        e_{ij} = \frac{A_i \cdot P_j}{N}, \quad
        x'_i = x_i + \mathrm{BN}\Big(W \sum_{j \in \mathcal{N}(i)} e_{ij}\, g(x_j)\Big)

    with ``A = Linear(concat_h theta_h(x))``, ``P = Linear(concat_h phi_h(x))`` (``heads`` projections of
    ``channels / heads`` each, stored stacked as one ``Linear``), ``N`` the node count of the node's graph, and the
    BatchNorm's weight and bias initialised to zero so that the block starts as the identity. No softmax, no
    sparsification; self-edges included.

    Args:
        channels (int): node state size ``d``.
        heads (int, optional): number of affinity projections (default: ``4``).
    Shapes: ``x [num_nodes, d]`` -> ``[num_nodes, d]``; weights ``[E]``.
    """

    supports_dense = True

    def __init__(self, channels: int, heads: int = 4):
        super().__init__(aggr="add")
        _head_split(channels, heads, "hsc")
        self.channels = channels
        self.message_proj = nn.Linear(channels, channels)   # g
        self.theta = nn.Linear(channels, channels)          # heads x (channels / heads), stacked
        self.phi = nn.Linear(channels, channels)
        self.theta_mix = nn.Linear(channels, channels)
        self.phi_mix = nn.Linear(channels, channels)
        self.update_proj = nn.Linear(channels, channels)    # W
        self.norm = nn.BatchNorm1d(channels)
        HSCRegionBlock.reset_parameters(self)   # this class's own: a subclass resets its own once it has built them

    def reset_parameters(self):
        for lin in (self.message_proj, self.theta, self.phi, self.theta_mix, self.phi_mix, self.update_proj):
            lin.reset_parameters()
        self.norm.reset_parameters()
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.theta_mix(self.theta(x)), self.phi_mix(self.phi(x)), self.message_proj(x)

    def forward(self, x, edge_index, batch=None, return_weights=False):
        a, p, g = self._heads(x)
        weight = self.edge_updater(edge_index, a=a, p=p, count=graph_sizes(batch, x))
        return self._aggregate(x, edge_index, g, weight, return_weights)

    def edge_update(self, a_i: Tensor, p_j: Tensor, count_i: Tensor) -> Tensor:
        return (a_i * p_j).sum(-1) / count_i.squeeze(-1)

    def message(self, g_j: Tensor, weight: Tensor) -> Tensor:
        return weight.unsqueeze(-1) * g_j

    def _aggregate(self, x: Tensor, edge_index: Tensor, g: Tensor, weight: Tensor,
                   return_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``x + BN(W sum_j weight_ij g_j)`` from the edge weights ``[E]``."""
        y = self.propagate(edge_index, g=g, weight=weight)
        out = x + self.norm(self.update_proj(y))
        return out, (weight if return_weights else None)

    def forward_dense(self, x, mask, return_weights=False, adj=None):
        a, p, g = self._heads(x)
        return self._aggregate_dense(x, mask, adj, a @ p.transpose(1, 2), g, return_weights)

    def _aggregate_dense(self, x: Tensor, mask: Tensor, adj: Tensor | None, affinity: Tensor, g: Tensor,
                         return_weights: bool) -> tuple[Tensor, Tensor | None]:
        """:meth:`_aggregate` from the unscaled affinity ``[B, N(target), N(source)]``."""
        size = mask.sum(-1, keepdim=True).unsqueeze(-1).to(x.dtype)          # [B, 1, 1]
        weight = affinity / size * adjacency(mask, adj, x.dtype)             # [B, N(target), N(source)]
        y = weight @ g
        if bool(mask.all()):     # no padding (images): the BatchNorm's rows are all the nodes, no gather / scatter
            upd = self.norm(self.update_proj(y.flatten(0, 1))).view_as(x)
        else:
            upd = torch.zeros_like(x)
            upd[mask] = self.norm(self.update_proj(y[mask]))
        return x + upd, (weight if return_weights else None)


@register_layer("hsc_geo")
class HSCGeometryBlock(HSCRegionBlock):
    r"""HSC's image block with a learned bias from the relative geometry of the two regions (an attention bias as in
    Relation Networks, Hu et al. CVPR 2018, and the Object Relation Transformer, Herdade et al. NeurIPS 2019).

    .. math::
        e_{ij} = \frac{A_i \cdot P_j + w_2^\top \mathrm{ReLU}(W_1 \gamma_{ij} + b_1) + b_2}{N}, \quad
        x'_i = x_i + \mathrm{BN}\Big(W \sum_{j \in \mathcal{N}(i)} e_{ij}\, g(x_j)\Big)

    with everything as in ``hsc`` and :math:`\gamma_{ij}` the log-ratio geometry of box j relative to box i
    (:func:`~hsc_pyg.data.graphs.box_geometry`: ``log(|dx| / w_i)``, ``log(|dy| / h_i)``, ``log(w_j / w_i)``,
    ``log(h_j / h_i)``). ``w_2`` and ``b_2`` start at zero, so the block starts as ``hsc`` (and, with its zero
    BatchNorm, as the identity). Needs the region boxes (``{split}_boxes.npy``); any edge builder; dense path as
    ``hsc``.

    Args:
        channels (int): node state size ``d``.
        heads (int, optional): number of affinity projections (default: ``4``).
        geometry_hidden (int, optional): hidden size of the geometry map (default: ``64``).
    Shapes: ``x [num_nodes, d]``, ``pos [num_nodes, 4]`` -> ``[num_nodes, d]``; weights ``[E]``.
    """

    needs_pos = True

    def __init__(self, channels: int, heads: int = 4, geometry_hidden: int = 64):
        super().__init__(channels, heads)
        self.geometry = nn.Sequential(nn.Linear(BOX_GEOMETRY_FEATURES, geometry_hidden), nn.ReLU(),
                                      nn.Linear(geometry_hidden, 1))
        self._reset_geometry()

    def reset_parameters(self):
        super().reset_parameters()
        self._reset_geometry()

    def _reset_geometry(self) -> None:
        self.geometry[0].reset_parameters()
        nn.init.zeros_(self.geometry[2].weight)
        nn.init.zeros_(self.geometry[2].bias)

    def _boxes(self, pos: Tensor | None, x: Tensor) -> Tensor:
        if pos is None:
            raise DataError(f"layer {self.registry_name!r} reads the regions' boxes: call it with pos [num_nodes, 4] "
                            "(x1, y1, x2, y2; [B, N, 4] on the dense path)")
        return pos.to(x.dtype)

    def geometry_bias(self, target: Tensor, source: Tensor) -> Tensor:
        """Learned bias of boxes ``[..., 4]`` (broadcast) -> ``[...]``."""
        return self.geometry(box_geometry(target, source)).squeeze(-1)

    def forward(self, x, edge_index, batch=None, return_weights=False, pos=None):
        a, p, g = self._heads(x)
        weight = self.edge_updater(edge_index, a=a, p=p, box=self._boxes(pos, x), count=graph_sizes(batch, x))
        return self._aggregate(x, edge_index, g, weight, return_weights)

    def edge_update(self, a_i: Tensor, p_j: Tensor, box_i: Tensor, box_j: Tensor, count_i: Tensor) -> Tensor:
        return ((a_i * p_j).sum(-1) + self.geometry_bias(box_i, box_j)) / count_i.squeeze(-1)

    def forward_dense(self, x, mask, return_weights=False, adj=None, pos=None):
        a, p, g = self._heads(x)
        box = self._boxes(pos, x)
        affinity = a @ p.transpose(1, 2) + self.geometry_bias(box.unsqueeze(2), box.unsqueeze(1))
        return self._aggregate_dense(x, mask, adj, affinity, g, return_weights)


@register_layer("hsc_text")
class HSCWordBlock(RelationalLayer):
    r"""HSC's word self-attention block (MODEL.md §3) on the word graph.

    .. math::
        e_{ij} = \frac{l_i \cdot k_j}{L}, \quad x'_i = x_i + \sum_{j \in \mathcal{N}(i)} e_{ij}\, v_j

    with ``l, k, v = Dropout(Tanh(Linear(x)))`` (three Linears, Xavier-uniform, zero bias) and ``L`` the caption's own
    word count (the original divides by the padded batch length, which makes a caption's encoding depend on its batch;
    the two agree on unpadded batches).

    Args:
        channels (int): word state size ``w``.
        dropout (float, optional): dropout after each Tanh (default: ``0.0``, the original's ``drop_out``).
    Shapes: ``x [num_nodes, w]`` -> ``[num_nodes, w]``; weights ``[E]``.
    """

    supports_dense = True

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__(aggr="add")
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.query, self.key, self.value):
            xavier_linear(lin)

    def _project(self, lin: nn.Linear, x: Tensor) -> Tensor:
        return self.dropout(torch.tanh(lin(x)))

    def forward(self, x, edge_index, batch=None, return_weights=False):
        q, k, v = (self._project(lin, x) for lin in (self.query, self.key, self.value))
        size = graph_sizes(batch, x)
        weight = self.edge_updater(edge_index, q=q, k=k, count=size)
        out = x + self.propagate(edge_index, v=v, weight=weight)
        return out, (weight if return_weights else None)

    def edge_update(self, q_i: Tensor, k_j: Tensor, count_i: Tensor) -> Tensor:
        return (q_i * k_j).sum(-1) / count_i.squeeze(-1)

    def message(self, v_j: Tensor, weight: Tensor) -> Tensor:
        return weight.unsqueeze(-1) * v_j

    def forward_dense(self, x, mask, return_weights=False, adj=None):
        q, k, v = (self._project(lin, x) for lin in (self.query, self.key, self.value))
        size = mask.sum(-1, keepdim=True).unsqueeze(-1).to(x.dtype)
        weight = (q @ k.transpose(1, 2)) / size * adjacency(mask, adj, x.dtype)
        out = x + (weight @ v) * mask.unsqueeze(-1)
        return out, (weight if return_weights else None)


class PyGConvLayer(RelationalLayer):
    """A PyG convolution as a residual relational layer: ``x' = x + conv(x, edge_index[, edge_attr])``.

    Subclasses only build their convolution in ``__init__`` (with their own explicit arguments) and say whether it
    returns attention weights, the way PyG's ``BasicGNN`` subclasses only override ``init_conv``. A subclass with a
    dense path names its module in ``dense_class`` (:mod:`hsc_pyg.nn.dense`): the layer builds it as ``dense``, on
    the convolution's own parameters, which the state dict holds once, under ``conv``.
    """

    has_edge_weights = False
    dense_class: type[SharedDense] | None = None

    def __init__(self, conv: MessagePassing, edge_dim: int | None = None):
        super().__init__()
        self.conv = conv
        self.edge_dim = edge_dim
        self.dense = None if self.dense_class is None else self.dense_class(conv)

    def reset_parameters(self):
        self.conv.reset_parameters()

    def forward(self, x, edge_index, batch=None, return_weights=False, edge_attr=None):
        extra = {} if self.edge_dim is None else {"edge_attr": edge_attr}
        if self.has_edge_weights:
            y, (att_index, alpha) = self.conv(x, edge_index, return_attention_weights=True, **extra)
            # the convolutions keep the edge order when they add no self-loops; average the heads
            weight = alpha.mean(-1) if return_weights else None
            return x + y, weight
        return x + self.conv(x, edge_index, **extra), None

    def forward_dense(self, x, mask, return_weights=False, adj=None):
        return x + self.dense(x, adjacency(mask, adj, x.dtype), mask), None


@register_layer("gcn")
class GCNLayer(PyGConvLayer):
    """``GCNConv`` (symmetric-normalised, fixed edge weights: nothing learned per edge); dense: ``DenseGCNConv``."""

    supports_dense = True
    dense_class = DenseGCN

    def __init__(self, channels: int):
        super().__init__(GCNConv(channels, channels, add_self_loops=False))


class AttentionConvLayer(PyGConvLayer):
    """An attention convolution with ``heads`` heads concatenated (``channels / heads`` each), ``dropout`` on its
    attention coefficients and, with ``edge_dim``, edge features in the attention; returns the attention averaged
    over heads. Subclasses name the PyG class."""

    has_edge_weights = True
    supports_edge_attr = True
    conv_class: type[MessagePassing]
    conv_options: dict = {}

    def __init__(self, channels: int, heads: int = 4, dropout: float = 0.0, edge_dim: int | None = None):
        out = _head_split(channels, heads, self.registry_name)
        super().__init__(self.conv_class(channels, out, heads=heads, dropout=dropout, edge_dim=edge_dim,
                                         **self.conv_options), edge_dim)


@register_layer("gat")
class GATLayer(AttentionConvLayer):
    """``GATConv`` (no added self-loops: the edge builders decide them); dense: ``DenseGATConv`` (without edge
    features; it returns no attention, so asking for the edge weights takes the sparse path)."""

    conv_class = GATConv
    conv_options = {"add_self_loops": False}
    supports_dense = True
    dense_weights = False
    dense_class = DenseGAT


@register_layer("gatv2")
class GATv2Layer(AttentionConvLayer):
    """``GATv2Conv`` (no added self-loops: the edge builders decide them); dense: :class:`DenseGATv2` (without edge
    features; asking for the attention takes the sparse path, and so do graphs that are not complete or are padded,
    where the sparse path is faster)."""

    conv_class = GATv2Conv
    conv_options = {"add_self_loops": False}
    supports_dense = True
    dense_weights = False
    dense_pair_vectors = True     # its [B, heads, N, N, C] pre-activations
    dense_class = DenseGATv2


@register_layer("transformer")
class TransformerLayer(AttentionConvLayer):
    """``TransformerConv`` (graph transformer attention); dense: :class:`DenseTransformer` (without edge features;
    asking for the attention takes the sparse path)."""

    conv_class = TransformerConv
    supports_dense = True
    dense_weights = False
    dense_class = DenseTransformer


@register_layer("sage")
class SAGELayer(PyGConvLayer):
    """``SAGEConv`` with mean aggregation (no learned edge weights); dense: ``DenseSAGEConv``."""

    supports_dense = True
    dense_class = DenseSAGE

    def __init__(self, channels: int):
        super().__init__(SAGEConv(channels, channels))


@register_layer("graphconv")
class GraphConvLayer(PyGConvLayer):
    """``GraphConv`` (Morris et al.), sum aggregation (no learned edge weights); dense: ``DenseGraphConv``."""

    supports_dense = True
    dense_class = DenseGraph

    def __init__(self, channels: int):
        super().__init__(GraphConv(channels, channels))


def _gin_mlp(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))


@register_layer("gin")
class GINLayer(PyGConvLayer):
    """``GINConv`` with a two-layer MLP (no learned edge weights); dense: ``DenseGINConv``."""

    supports_dense = True
    dense_class = DenseGIN

    def __init__(self, channels: int):
        super().__init__(GINConv(_gin_mlp(channels), train_eps=True))


@register_layer("gine")
class GINELayer(PyGConvLayer):
    r"""``GINEConv`` (Hu et al., 2020): GIN whose messages carry the edge features,
    ``x'_i = MLP((1 + eps) x_i + sum_j ReLU(x_j + W e_ji))``, with ``W`` a Linear ``edge_dim -> channels`` and the
    two-layer MLP of ``gin``. Needs edge features (``img_edge_features`` / ``txt_edge_features``); PyG has no dense
    version. No learned edge weights."""

    supports_edge_attr = True
    needs_edge_attr = True

    def __init__(self, channels: int, edge_dim: int):
        super().__init__(GINEConv(_gin_mlp(channels), train_eps=True, edge_dim=edge_dim), edge_dim)
