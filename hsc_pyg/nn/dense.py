r"""Dense paths of the PyG convolutions that the relational layers wrap, as modules in the way of PyG's
``torch_geometric.nn.dense``: ``forward(x [B, N, C], adj [B, N, N], mask [B, N])``, ``adj[b, i, j] != 0`` for the edge
``j -> i``.

Each runs on the parameters of one sparse convolution and holds none of its own (:class:`SharedDense`): a layer
registers its convolution (so its parameters sit in the state dict once, under the sparse names that checkpoints
use) and its dense module beside it. ``gcn``, ``gat``, ``sage``, ``graphconv`` and ``gin`` run PyG's dense
convolutions (:class:`DenseGCN` is a ``DenseGCNConv`` ...); ``gatv2`` and ``transformer``, which PyG has no dense
version of, are written here (:class:`DenseGATv2`, :class:`DenseTransformer`). ``tests/test_layers.py`` checks that
each gives its sparse convolution's states and gradients.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.dense import DenseGATConv, DenseGCNConv, DenseGINConv, DenseGraphConv, DenseSAGEConv


class SharedDense(nn.Module):
    """A dense module over a sparse convolution's parameters, read at each call (so whatever replaces them --
    ``.to()``, ``load_state_dict(assign=True)`` -- is what it runs on). The convolution is kept unregistered: its
    layer registers it. An attribute this module does not have is the convolution's, under the name ``renames``
    gives (default: the same name)."""

    renames: dict[str, str] = {}

    def __init__(self, conv: MessagePassing):
        nn.Module.__init__(self)       # not a PyG dense class's __init__, which would make parameters of its own
        self.__dict__["_conv"] = conv  # not Module.__setattr__, which would register it a second time

    def reset_parameters(self) -> None:
        """Nothing: the parameters are the convolution's, which its layer resets (once)."""

    def __getattr__(self, name: str):  # only for what normal lookup misses: it holds no parameters, buffers, modules
        conv = self.__dict__.get("_conv")
        if conv is None:               # while unpickling, before __dict__ is filled
            raise AttributeError(name)
        return getattr(conv, self.renames.get(name, name))


class DenseGCN(SharedDense, DenseGCNConv):
    """``DenseGCNConv`` on a ``GCNConv``'s ``lin`` and ``bias``."""


class DenseGAT(SharedDense, DenseGATConv):
    """``DenseGATConv`` on a ``GATConv``'s ``lin``, ``att_src``, ``att_dst`` and ``bias``."""


class DenseSAGE(SharedDense, DenseSAGEConv):
    """``DenseSAGEConv`` on a ``SAGEConv``: its ``lin_rel`` (the neighbour mean) and ``lin_root`` (the node) are
    ``SAGEConv``'s ``lin_l`` and ``lin_r``; the bias sits on the other Linear, which adds the same sum."""

    renames = {"lin_rel": "lin_l", "lin_root": "lin_r"}


class DenseGraph(SharedDense, DenseGraphConv):
    """``DenseGraphConv`` on a ``GraphConv``'s ``lin_rel`` and ``lin_root``."""


class DenseGIN(SharedDense, DenseGINConv):
    """``DenseGINConv`` on a ``GINConv``'s MLP and ``eps``."""


def _attention(logits: Tensor, adj: Tensor) -> Tensor:
    """Softmax of ``logits [B, H, N, N]`` over the sources ``j`` of each target ``i`` with ``adj[b, i, j] != 0``. A node
    without neighbours (a padding row) attends to itself, as PyG's dense layers do, so nothing becomes NaN."""
    adj = adj.clone()
    diagonal = torch.arange(adj.size(-1), device=adj.device)
    adj[:, diagonal, diagonal] = 1
    return logits.masked_fill(adj.unsqueeze(1) == 0, float("-inf")).softmax(dim=-1)


def _concat_heads(out: Tensor) -> Tensor:
    """``[B, H, N, C]`` -> ``[B, N, H * C]``: the heads concatenated."""
    return out.transpose(1, 2).flatten(2)


class DenseGATv2(SharedDense):
    r"""``GATv2Conv`` on dense adjacencies, on a ``GATv2Conv``'s ``lin_l``, ``lin_r``, ``att`` and ``bias``, as
    ``gatv2`` builds it (heads concatenated, no residual): :math:`\alpha_{ij} = \mathrm{softmax}_j\, a^\top
    \mathrm{LeakyReLU}(W_r x_i + W_l x_j)` over the ``j`` with ``adj[b, i, j] != 0``, :math:`x'_i = \sum_j
    \alpha_{ij} W_l x_j + b` per head. No edge features."""

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None) -> Tensor:
        (B, N, _), H, C = x.shape, self.heads, self.out_channels
        x_l = self.lin_l(x).view(B, N, H, C).transpose(1, 2)                          # [B, H, N, C]
        x_r = self.lin_r(x).view(B, N, H, C).transpose(1, 2)                          # (lin_l itself if shared)
        pair = nn.functional.leaky_relu(x_r.unsqueeze(3) + x_l.unsqueeze(2), self.negative_slope)  # [B, H, i, j, C]
        logits = (pair @ self.att.view(1, H, 1, C, 1)).squeeze(-1)                    # [B, H, i, j]
        alpha = nn.functional.dropout(_attention(logits, adj), p=self.dropout, training=self.training)
        out = _concat_heads(alpha @ x_l) + self.bias
        return out if mask is None else out * mask.unsqueeze(-1).to(out.dtype)


class DenseTransformer(SharedDense):
    r"""``TransformerConv`` on dense adjacencies, on a ``TransformerConv``'s ``lin_query``, ``lin_key``,
    ``lin_value`` and ``lin_skip``, as ``transformer`` builds it (heads concatenated, root weight, no ``beta``):
    :math:`\alpha_{ij} = \mathrm{softmax}_j\, (W_q x_i)^\top (W_k x_j) / \sqrt{C}` over the ``j`` with
    ``adj[b, i, j] != 0``, :math:`x'_i = W_s x_i + \sum_j \alpha_{ij} W_v x_j` per head. No edge features."""

    def forward(self, x: Tensor, adj: Tensor, mask: Tensor | None = None) -> Tensor:
        (B, N, _), H, C = x.shape, self.heads, self.out_channels

        def heads(linear: nn.Module) -> Tensor:
            return linear(x).view(B, N, H, C).transpose(1, 2)                          # [B, H, N, C]

        logits = heads(self.lin_query) @ heads(self.lin_key).transpose(2, 3) / math.sqrt(C)
        alpha = nn.functional.dropout(_attention(logits, adj), p=self.dropout, training=self.training)
        out = _concat_heads(alpha @ heads(self.lin_value)) + self.lin_skip(x)
        return out if mask is None else out * mask.unsqueeze(-1).to(out.dtype)
