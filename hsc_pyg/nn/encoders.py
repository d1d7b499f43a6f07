"""Per-item encoders: the region-graph encoder and the word-graph encoder.

Both take a PyG ``Batch`` (from :func:`hsc_pyg.data.graphs.collate_graphs`) and return dense padded node states
``[num_graphs, max_nodes, d]`` with a mask, for the per-pair similarity part. They keep the states of the three levels
of the paper: ``object`` (the input of the relational stack), ``relational`` (after its first layer) and ``higher``
(after its last layer). Layers with a dense path run as batched matrix products on graphs whose every node has a
self-loop (``batch.looped``, read from the edges by ``collate_graphs``: complete graphs, ``knn``, ``spatial``,
``window``), except that a layer whose dense path builds a vector per node pair (``dense_pair_vectors``: ``gatv2``)
takes it only where the padded ``[B, N, N]`` layout has no more pairs than the batch has edges (complete graphs of
one size, as images are); otherwise, or with edge features, as sparse message passing over ``batch.edge_index``.
Edge features go to the layers built with ``edge_dim``: the region graphs' ``batch.edge_attr`` (from the edge
builder), the word graphs' :func:`~hsc_pyg.data.graphs.word_relations`; region boxes (``batch.pos``) go to the layers
that declare ``needs_pos``.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch_geometric.utils import to_dense_batch

from ..data.graphs import dense_adjacency, edge_values, word_relations
from ..errors import DataError
from .functional import l2norm
from .init import xavier_linear
from .layers import adjacency, build_layer
from .model_config import LEVELS


@dataclass
class GraphStates:
    """What an encoder returns for a batch of graphs.

    ``levels[name]``: dense node states ``[B, N, d]`` (l2-normalised unless disabled), for each requested level;
    ``mask [B, N]``: real nodes; ``edge_weights``: one entry per relational layer, each ``[E]`` aligned with the
    batch's ``edge_index`` (only when asked for).
    """

    levels: dict[str, Tensor]
    mask: Tensor
    edge_weights: list[Tensor | None] | None = None


def level_index(level: str, num_layers: int) -> int:
    """Position in the stack's list of states (0 = input) that a level names."""
    return {"object": 0, "relational": min(1, num_layers), "higher": num_layers}[level]


class RelationalStack(nn.Module):
    """``num_layers`` layers of one registered type, run densely on graphs with self-loops and sparsely otherwise.

    ``layer_args``: keyword arguments of every layer (ConfigError for one the layer cannot take).
    """

    def __init__(self, layer: str, channels: int, num_layers: int, layer_args: dict[str, Any] | None = None):
        super().__init__()
        self.layers = nn.ModuleList(build_layer(layer, channels, **(layer_args or {})) for _ in range(num_layers))

    @property
    def dense_capable(self) -> bool:
        return all(layer.supports_dense for layer in self.layers)

    @property
    def uses_edge_attr(self) -> bool:
        return any(layer.edge_dim is not None for layer in self.layers)

    def takes_dense_path(self, batch, return_weights: bool = False) -> bool:
        """Whether :meth:`forward` runs the layers' dense paths on ``batch`` (see the module docstring)."""
        if not (getattr(batch, "looped", False) and self.dense_capable and not self.uses_edge_attr):
            return False
        # edge weights asked of a layer whose dense path computes none: the sparse path gives them
        if return_weights and any(layer.has_edge_weights and not layer.dense_weights for layer in self.layers):
            return False
        if any(layer.dense_pair_vectors for layer in self.layers):
            return batch.num_graphs * batch.max_nodes ** 2 <= batch.edge_index.size(1)
        return True

    def forward(self, x: Tensor, batch, return_weights: bool = False,
                edge_attr: Tensor | None = None) -> tuple[list[Tensor], Tensor, list]:
        """``x [num_nodes, C]`` -> (dense states of every depth ``[B, N, C]``, mask ``[B, N]``, weights per layer).

        ``edge_attr [E, F]``: the edge features of ``batch`` for the layers built with ``edge_dim`` (DataError if
        they need them and it is None).
        """
        max_nodes = getattr(batch, "max_nodes", None)
        if max_nodes is None:
            max_nodes = int((batch.ptr[1:] - batch.ptr[:-1]).max())
        if x.size(0) == batch.num_graphs * max_nodes:      # every graph has max_nodes nodes (images): a view
            dense = x.view(batch.num_graphs, max_nodes, x.size(-1))
            mask = x.new_ones(batch.num_graphs, max_nodes, dtype=torch.bool)
        else:
            dense, mask = to_dense_batch(x, batch.batch, max_num_nodes=max_nodes, batch_size=batch.num_graphs)
        states, weights = [dense], []
        extra: dict[str, Tensor] = {}
        if self.uses_edge_attr:
            if edge_attr is None:
                raise DataError("the layers were built for edge features but the graphs have none; build them with an "
                                "edge builder that has features (img_edges=spatial) or set img_edge_features=false")
            extra["edge_attr"] = edge_attr.to(x.dtype)
        pos = getattr(batch, "pos", None) if any(layer.needs_pos for layer in self.layers) else None
        if self.takes_dense_path(batch, return_weights):
            # built once for all the layers; complete graphs: every real node pair
            adj = adjacency(mask, None, x.dtype) if batch.complete else dense_adjacency(batch).to(x.dtype)
            if pos is not None:
                pos = to_dense_batch(pos, batch.batch, max_num_nodes=max_nodes, batch_size=batch.num_graphs)[0]
            for layer in self.layers:
                dense, w = layer.forward_dense(dense, mask, return_weights, adj=adj, **_boxes(layer, pos))
                states.append(dense)
                weights.append(edge_values(w, batch) if w is not None else None)
        else:
            for layer in self.layers:
                features = extra if layer.edge_dim is not None else {}
                x, w = layer(x, batch.edge_index, batch.batch, return_weights, **features, **_boxes(layer, pos))
                states.append(to_dense_batch(x, batch.batch, max_num_nodes=max_nodes, batch_size=batch.num_graphs)[0])
                weights.append(w)
        return states, mask, weights


def _boxes(layer, pos: Tensor | None) -> dict[str, Tensor | None]:
    return {"pos": pos} if layer.needs_pos else {}


class RegionGraphEncoder(nn.Module):
    """Region graph -> ``Linear(img_dim -> d)`` -> relational layers -> l2norm (MODEL.md §2-3).

    With ``num_layers = 0`` this is SGRAF's image encoder.
    """

    def __init__(self, img_dim: int, embed_size: int, layer: str = "hsc", num_layers: int = 4,
                 layer_args: dict[str, Any] | None = None, no_imgnorm: bool = False):
        super().__init__()
        self.fc = xavier_linear(nn.Linear(img_dim, embed_size))
        self.stack = RelationalStack(layer, embed_size, num_layers, layer_args)
        self.num_layers = num_layers
        self.no_imgnorm = no_imgnorm

    def forward(self, batch, levels: tuple[str, ...] = ("higher",), return_weights: bool = False) -> GraphStates:
        edge_attr = getattr(batch, "edge_attr", None) if self.stack.uses_edge_attr else None
        states, mask, weights = self.stack(self.fc(batch.x), batch, return_weights, edge_attr)
        out = {}
        for level in levels:
            h = states[level_index(level, self.num_layers)]
            out[level] = h if self.no_imgnorm else l2norm(h)
        return GraphStates(out, mask, weights if return_weights else None)


class WordGraphEncoder(nn.Module):
    """Word graph -> embedding -> dropout -> relational layers -> bi-GRU (directions averaged) -> l2norm.

    With ``num_layers = 0`` this is SGRAF's text encoder. Node features ``batch.x`` are token ids ``[num_nodes]``.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, layer: str = "hsc_text",
                 num_layers: int = 4, layer_args: dict[str, Any] | None = None, word_dropout: float = 0.4,
                 gru_layers: int = 1, no_txtnorm: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(word_dropout)
        self.stack = RelationalStack(layer, word_dim, num_layers, layer_args)
        self.gru = nn.GRU(word_dim, embed_size, gru_layers, batch_first=True, bidirectional=True)
        self.num_layers = num_layers
        self.no_txtnorm = no_txtnorm
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def recurrent(self, words: Tensor, lengths: Tensor) -> Tensor:
        """Bi-GRU over padded ``words [M, L, w]`` -> ``[M, L, d]``, directions averaged, padding left zero."""
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=words.size(1))
        half = out.size(-1) // 2
        out = (out[..., :half] + out[..., half:]) / 2
        return out if self.no_txtnorm else l2norm(out)

    def forward(self, batch, levels: tuple[str, ...] = ("higher",), return_weights: bool = False) -> GraphStates:
        edge_attr = word_relations(batch.edge_index, batch.batch) if self.stack.uses_edge_attr else None
        states, mask, weights = self.stack(self.dropout(self.embed(batch.x)), batch, return_weights, edge_attr)
        lengths = mask.sum(-1)
        out = {level: self.recurrent(states[level_index(level, self.num_layers)], lengths) for level in levels}
        return GraphStates(out, mask, weights if return_weights else None)


__all__ = ["GraphStates", "RegionGraphEncoder", "WordGraphEncoder", "RelationalStack", "LEVELS", "level_index"]
