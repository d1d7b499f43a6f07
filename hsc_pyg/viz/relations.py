"""What the model learned about one item, as networkx graphs.

Three kinds of graph, each a :class:`networkx.DiGraph` whose ``graph`` dict says what it shows:

``region``  the region graph of one image. Node ``j`` (int) = region ``j`` with attributes ``index``, ``label``,
            ``x``, ``y`` (the box centre when the data has boxes, else a circular layout), ``x1 y1 x2 y2`` (the box)
            and, when a caption is given, ``attention`` (the word-to-region attention of the chosen word). Edge ``j -> i``
            carries ``weight``: the learned weight with which region ``i`` takes region ``j``'s message in the chosen
            relational layer (``hsc``: the affinity ``A_i . P_j / N``, signed; ``gat``/``gatv2``/``transformer``: the
            attention, averaged over heads, in [0, 1]), and ``edge_id``: the edge's position in the model's
            ``edge_index``.
``words``   the word graph of one caption: node ``k`` (int) = the k-th token (``<start>`` and ``<end>`` included, as
            the model reads them) with ``label`` (the word) and ``token`` (its id); edges as above, from the text
            layers.
``pair``    one image with one caption: word nodes ``"w{k}"`` and region nodes ``"r{j}"``; edge ``w{k} -> r{j}`` carries
            the word-to-region cross attention (SCAN t2i, each word's row sums to 1 over the regions); the graph
            carries the pair's ``score`` (``model.score_block`` on the single pair).

Levels (MODEL.md section 3): ``object`` is the input of the relational stack, so it has no learned edges (the graph
has nodes only); ``relational`` is the first relational layer's weights; ``higher`` the last layer's. A layer can also
be named by number (``layer=K``, 1-based). :func:`mark_strongest` ranks the edges for drawing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from ..nn.model_config import LEVELS
from ..data.graphs import caption_graph, collate_graphs, image_graph
from ..data.precomp import PrecompSplit
from ..data.vocab import SPECIALS, Vocabulary
from ..engine.device import eval_mode
from ..engine.scoring import check_compatible, check_features
from ..errors import ConfigError, DataError, HSCError
from ..nn import similarity
from ..nn.encoders import GraphStates, level_index
from ..nn.layers import LAYERS
from ..nn.model import HSCModel

LEVEL_CHOICES = LEVELS + ("all",)
#: What an edge weight is, per layer type (stored in the graph so that a GraphML/JSON file explains itself).
WEIGHT_MEANING = {
    "hsc": "affinity A_i . P_j / N (signed, no softmax)",
    "hsc_text": "affinity l_i . k_j / L (signed, no softmax)",
    "gat": "GAT attention, mean over heads (softmax over each target's sources)",
    "gatv2": "GATv2 attention, mean over heads (softmax over each target's sources)",
    "transformer": "graph-transformer attention, mean over heads (softmax over each target's sources)",
}


#: Words never chosen by default to shade regions by: their attention is rarely about one object.
FUNCTION_WORDS = frozenset(
    "a an the this that these those some another of in on at to into onto from with without by for over under "
    "above below near behind beside between through across along up down out off around and or but while as "
    "is are was were be being been has have had do does it its his her their there here who which".split())


class VizError(HSCError):
    """A picture cannot be made as asked (nothing to draw, a file in the way)."""


class NoEdgeWeightsError(VizError):
    """The chosen layers learn no per-edge weights."""


def weighted_layer_types() -> list[str]:
    """Registered layer types whose layers return learned per-edge weights."""
    return sorted(name for name, cls in LAYERS.items() if cls.has_edge_weights)


@dataclass(frozen=True)
class Depth:
    """Which relational layer's weights a graph shows: ``layer`` 0 = the object level (no learned edges), K = the K-th
    layer (1-based). ``level`` is the level name it was chosen by, or None when chosen by number."""

    level: str | None
    layer: int

    @property
    def tag(self) -> str:
        """Part of a file name: ``object``, ``relational-layer1``, ``higher-layer4`` or ``layer2``."""
        if self.level is None:
            return f"layer{self.layer}"
        return self.level if self.layer == 0 else f"{self.level}-layer{self.layer}"


def depths(level: str | None = "higher", layer: int | None = None, num_layers: int | None = None) -> list[Depth]:
    """The depths ``level`` (one of :data:`LEVEL_CHOICES`) or ``layer`` (1-based) name, for a stack of
    ``num_layers`` layers. ``all`` names the three levels."""
    if layer is not None:
        if level is not None:
            raise ConfigError("give a level or a layer number, not both (--level or --layer)")
        if num_layers is not None and not 1 <= layer <= num_layers:
            raise ConfigError(f"layer {layer} does not exist: the stack has {num_layers} relational layer(s), "
                              f"numbered 1..{num_layers}")
        return [Depth(None, layer)]
    level = level or "higher"
    if level not in LEVEL_CHOICES:
        raise ConfigError(f"level {level!r} is unknown; choose one of {', '.join(LEVEL_CHOICES)}")
    names = LEVELS if level == "all" else (level,)
    return [Depth(name, level_index(name, num_layers or 0)) for name in names]


def check_edge_weights(side: str, layer_type: str, num_layers: int, depth: Depth) -> None:
    """NoEdgeWeightsError unless ``depth`` of the ``side`` ("image" or "text") stack has learned edge weights."""
    if depth.level == "object":
        return
    flag = "img" if side == "image" else "txt"
    if num_layers == 0:
        raise NoEdgeWeightsError(
            f"the model has no relational layers on the {side} side ({flag}_layers=0), so it learned no {side} "
            f"relations; draw --level object, or use a model with {flag}_layers >= 1")
    if not LAYERS[layer_type].has_edge_weights:
        raise NoEdgeWeightsError(
            f"{flag}_gnn={layer_type!r} learns no per-edge weights; the layer types with edge weights are "
            f"{', '.join(weighted_layer_types())}; draw --level object or use a model trained with one of those")


# --------------------------------------------------------------------------- encoding one item
@dataclass
class ImageItem:
    """One image of a split, encoded: states of every level, edge weights of every layer."""

    index: int
    item_id: str
    edge_index: Tensor          # [2, E], source j -> target i
    weights: list[Tensor | None]  # per layer, [E] aligned with edge_index
    states: GraphStates         # levels: [1, R, d] each
    boxes: Tensor | None        # [R, 4]


@dataclass
class CaptionItem:
    """One caption of a split, encoded: its tokens, states of every level, edge weights of every layer."""

    index: int
    text: str
    token_ids: list[int]
    words: list[str]
    edge_index: Tensor
    weights: list[Tensor | None]
    states: GraphStates         # levels: [1, L, d] each, mask [1, L]


def check_index(what: str, index: int, count: int, split: PrecompSplit) -> int:
    """``index`` as an int; DataError unless it numbers one of the ``count`` items (``what``) of ``split``."""
    if not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise DataError(f"{what} {index!r} is out of range: {split.path.name}/{split.split} has {count} "
                        f"{what}s, numbered 0..{count - 1}")
    return int(index)


def check_finite_weights(model: HSCModel, source: str = "the model") -> None:
    """VizError when a weight of ``model`` is NaN or inf: every relation drawn from it would be NaN."""
    bad = next((name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()),
               None)
    if bad is not None:
        raise VizError(f"{source} has NaN or inf weights ({bad}), so its relations cannot be drawn; draw another "
                       "checkpoint (the run's model_best.pth, saved before the values broke)")


@torch.no_grad()
def encode_image_item(model: HSCModel, split: PrecompSplit, image: int) -> ImageItem:
    """Run the region-graph encoder on image ``image`` of ``split`` alone, keeping every level and every layer's
    edge weights."""
    image = check_index("image", image, split.num_images, split)
    check_features(model, split)
    boxes = split.box_tensor(image)
    graph = image_graph(split.features(image), boxes, model.config.img_edges)
    batch = collate_graphs([graph])
    with eval_mode(model):
        states = model.image_encoder(batch, LEVELS, return_weights=True)
    item_id = split.ids[image] if split.ids is not None else ""
    return ImageItem(image, item_id, graph.edge_index, states.edge_weights, states, boxes)


@torch.no_grad()
def encode_caption_item(model: HSCModel, split: PrecompSplit, caption: int, vocab: Vocabulary) -> CaptionItem:
    """Run the word-graph encoder on caption ``caption`` of ``split`` alone (see :func:`encode_image_item`)."""
    caption = check_index("caption", caption, split.num_captions, split)
    return encode_text_item(model, split.captions[caption], vocab, caption)


@torch.no_grad()
def encode_text_item(model: HSCModel, text: str, vocab: Vocabulary, index: int = -1) -> CaptionItem:
    """Run the word-graph encoder on any sentence ``text`` (``index``: its caption line, -1 for free text)."""
    token_ids = vocab.encode(text)
    graph = caption_graph(token_ids, model.config.txt_edges)
    batch = collate_graphs([graph])
    with eval_mode(model):
        states = model.text_encoder(batch, LEVELS, return_weights=True)
    return CaptionItem(index, text, token_ids, vocab.decode(token_ids), graph.edge_index, states.edge_weights, states)


def attention_level(model: HSCModel, level: str | None) -> str:
    """The level whose word-to-region attention to show: ``level`` when the model aligns it, else the model's last
    aligned level (the attention its score uses)."""
    return level if level in model.levels else model.levels[-1]


def cross_attention(model: HSCModel, image: ImageItem, caption: CaptionItem, level: str) -> Tensor:
    """Word-to-region attention of the pair at ``level``: ``[L, R]``, each row sums to 1."""
    with torch.no_grad(), eval_mode(model):
        return similarity.cross_attention(image.states.levels[level], caption.states.levels[level],
                                          caption.states.mask, model.similarity.lambda_softmax)[0]


@torch.no_grad()
def pair_score(model: HSCModel, split: PrecompSplit, image: int, caption: int, vocab: Vocabulary) -> float:
    """The exact score of image ``image`` with caption ``caption`` of ``split`` (:meth:`HSCModel.score_block` on the
    single pair)."""
    img = collate_graphs([image_graph(split.features(image), split.box_tensor(image), model.config.img_edges)])
    cap = collate_graphs([caption_graph(vocab.encode(split.captions[caption]), model.config.txt_edges)])
    with eval_mode(model):
        return float(model.score_block(model.encode_images(img), model.encode_captions(cap))[0, 0])


def choose_word(words: Sequence[str], word: str | int | None, attention: Tensor | None = None) -> int:
    """Position of the word to shade regions by.

    ``word``: a position (int, or a string of digits) in ``words`` (``<start>`` is 0), or a word (its first
    occurrence), or None: among the content words (alphabetic, not special, not in :data:`FUNCTION_WORDS`), the one
    whose attention over the regions peaks highest (with ``attention [L, R]``; else the first content word).
    """
    if word is None:
        alphabetic = [k for k, w in enumerate(words) if w not in SPECIALS and any(c.isalpha() for c in w)]
        candidates = [k for k in alphabetic if words[k] not in FUNCTION_WORDS] or alphabetic or list(range(len(words)))
        if attention is None:
            return candidates[0]
        peaks = attention.max(dim=1).values
        return max(candidates, key=lambda k: (float(peaks[k]), -k))
    text = str(word)
    if text.isdigit():
        position = int(text)
        if position >= len(words):
            raise ConfigError(f"--word {position}: the caption has {len(words)} tokens, positions 0..{len(words) - 1} "
                              f"({' '.join(words)})")
        return position
    if text.lower() not in words:
        raise ConfigError(f"--word {text!r} is not in the caption; its tokens are: {' '.join(words)} "
                          "(give a word or a position)")
    return words.index(text.lower())


# --------------------------------------------------------------------------- graphs
def _region_nodes(g: nx.DiGraph, boxes: Tensor | None, num_regions: int) -> None:
    if boxes is not None:
        b = boxes.double()
        normalised = bool(b.max() <= 1.0 + 1e-6 and b.min() >= -1e-6)
        g.graph["node_positions"] = "box_centres"
        g.graph["box_units"] = "normalised" if normalised else "pixels"
        for j in range(num_regions):
            x1, y1, x2, y2 = (float(v) for v in b[j])
            g.add_node(j, index=j, label=str(j), x=(x1 + x2) / 2, y=(y1 + y2) / 2, x1=x1, y1=y1, x2=x2, y2=y2)
    else:
        g.graph["node_positions"] = "circular_layout"
        angles = 2 * np.pi * np.arange(num_regions) / num_regions
        for j in range(num_regions):
            g.add_node(j, index=j, label=str(j), x=float(np.sin(angles[j])), y=float(np.cos(angles[j])))


def _add_edges(g: nx.DiGraph, edge_index: Tensor, weight: Tensor | None) -> None:
    if weight is None:
        return
    for e, (j, i, w) in enumerate(zip(edge_index[0].tolist(), edge_index[1].tolist(), weight.tolist())):
        g.add_edge(j, i, weight=float(w), edge_id=e, rank=0)


def _depth_attrs(g: nx.DiGraph, depth: Depth, layer_type: str, num_layers: int) -> None:
    g.graph.update(level=depth.level or "", layer=depth.layer, num_layers=num_layers, layer_type=layer_type,
                   weight_meaning=WEIGHT_MEANING.get(layer_type, "learned edge weight") if depth.layer else "none",
                   edge_direction="source -> target: the target takes the source's message with this weight")


def _item_attrs(split: PrecompSplit) -> dict:
    return dict(data_name=split.name, split=split.split)


def item_region_graph(model: HSCModel, split: PrecompSplit, item: ImageItem, depth: Depth) -> nx.DiGraph:
    """The region graph of an encoded image with the learned edge weights of the layer ``depth`` names."""
    config = model.config
    g = nx.DiGraph(kind="region", image=item.index, image_id=item.item_id, **_item_attrs(split))
    _depth_attrs(g, depth, config.img_gnn, config.img_layers)
    _region_nodes(g, item.boxes, split.num_regions)
    _add_edges(g, item.edge_index, item.weights[depth.layer - 1] if depth.layer else None)
    return g


def region_graph(model: HSCModel, split: PrecompSplit, image: int, level: str | None = None, layer: int | None = None,
                 caption: int | None = None, word: str | int | None = None, vocab: Vocabulary | None = None,
                 ) -> nx.DiGraph:
    """The region graph of image ``image`` of ``split`` with the learned edge weights of one layer.

    ``level`` (object, relational or higher; default higher) or ``layer`` (1-based) picks the layer. With ``caption``
    (an index into the split's captions) every region also gets ``attention``: the cross attention of the chosen
    ``word`` (see :func:`choose_word`) to it.
    """
    config = model.config
    if level == "all":
        raise ConfigError("region_graph draws one level; call it once per level for 'all'")
    (depth,) = depths(level, layer, config.img_layers)
    check_edge_weights("image", config.img_gnn, config.img_layers, depth)
    item = encode_image_item(model, split, image)
    g = item_region_graph(model, split, item, depth)
    if caption is not None:
        vocab = check_compatible(model, split, vocab)
        cap = encode_caption_item(model, split, caption, vocab)
        shown = attention_level(model, depth.level)
        attention = cross_attention(model, item, cap, shown)
        k = choose_word(cap.words, word, attention)
        g.graph.update(caption=cap.index, caption_text=cap.text, word=cap.words[k], word_position=k,
                       attention_level=shown)
        for j, a in enumerate(attention[k].tolist()):
            g.nodes[j]["attention"] = float(a)
    elif word is not None:
        raise ConfigError("--word needs --caption: the word is taken from that caption")
    return g


def word_graph(model: HSCModel, split: PrecompSplit, caption: int, level: str | None = None,
               layer: int | None = None, vocab: Vocabulary | None = None) -> nx.DiGraph:
    """The word graph of caption ``caption`` of ``split``: nodes = tokens left to right, edges weighted by one text
    layer's learned weights (``level`` or ``layer`` as in :func:`region_graph`)."""
    config = model.config
    if level == "all":
        raise ConfigError("word_graph draws one level; call it once per level for 'all'")
    (depth,) = depths(level, layer, config.txt_layers)
    check_edge_weights("text", config.txt_gnn, config.txt_layers, depth)
    vocab = check_compatible(model, split, vocab)
    item = encode_caption_item(model, split, caption, vocab)
    g = nx.DiGraph(kind="words", caption=item.index, caption_text=item.text, image=split.image_of(item.index),
                   node_positions="left_to_right", **_item_attrs(split))
    _depth_attrs(g, depth, config.txt_gnn, config.txt_layers)
    for k, (w, t) in enumerate(zip(item.words, item.token_ids)):
        g.add_node(k, index=k, label=w, token=int(t), x=float(k), y=0.0)
    _add_edges(g, item.edge_index, item.weights[depth.layer - 1] if depth.layer else None)
    return g


def pair_graph(model: HSCModel, split: PrecompSplit, image: int, caption: int, level: str | None = None,
               vocab: Vocabulary | None = None) -> nx.DiGraph:
    """Image ``image`` with caption ``caption``: the word-to-region cross attention as a bipartite graph (every word
    to every region) and the pair's score.

    The attention is the one the model's score uses: at ``level`` when the model aligns that level
    (``config.align_levels``), else at its last aligned level.
    """
    vocab = check_compatible(model, split, vocab)
    img = encode_image_item(model, split, image)
    cap = encode_caption_item(model, split, caption, vocab)
    shown = attention_level(model, level)
    attention = cross_attention(model, img, cap, shown)
    g = nx.DiGraph(kind="pair", image=img.index, image_id=img.item_id, caption=cap.index, caption_text=cap.text,
                   caption_of_image=split.image_of(cap.index), attention_level=shown,
                   aligned_levels=",".join(model.levels), lambda_softmax=float(model.config.lambda_softmax),
                   score=pair_score(model, split, image, caption, vocab),
                   weight_meaning="word-to-region cross attention (softmax over regions, each word's row sums to 1)",
                   edge_direction="word -> region", **_item_attrs(split))
    regions = nx.DiGraph()
    _region_nodes(regions, img.boxes, split.num_regions)
    g.graph["node_positions"] = regions.graph["node_positions"]
    if "box_units" in regions.graph:
        g.graph["box_units"] = regions.graph["box_units"]
    for k, (w, t) in enumerate(zip(cap.words, cap.token_ids)):
        g.add_node(f"w{k}", kind="word", index=k, label=w, token=int(t))
    for j, attrs in regions.nodes(data=True):
        g.add_node(f"r{j}", kind="region", **attrs)
    num_regions = attention.size(1)
    for k, row in enumerate(attention.tolist()):
        for j, a in enumerate(row):
            g.add_edge(f"w{k}", f"r{j}", weight=float(a), edge_id=k * num_regions + j, rank=0)
    return g


# --------------------------------------------------------------------------- ranking
RANKINGS = ("global", "per_node")


def _group_node(g: nx.DiGraph, u, v):
    """The node whose weights are normalised together: a word of a pair graph, else the edge's target."""
    return u if g.graph.get("kind") == "pair" else v


def strongest_edges(g: nx.DiGraph, k: int, self_loops: bool = False, ranking: str = "global") -> list[tuple]:
    """The ``k`` strongest edges as ``(source, target)``, strongest first.

    ``global``: the ``k`` edges of largest ``|weight|``. ``per_node``: round-robin over the nodes whose weights are
    normalised together (each target's incoming edges; each word's regions in a pair graph): every such node's
    strongest edge first (ordered by ``|weight|``), then every node's second strongest, and so on. Ties go by the
    model's edge order. Self-loops are left out unless ``self_loops`` (a node's weight on its own message says
    nothing about relations).
    """
    if k < 0:
        raise ConfigError(f"top_k_edges must be 0 or more, found {k}")
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking {ranking!r} is unknown; choose one of {', '.join(RANKINGS)}")
    edges = [(u, v, d) for u, v, d in g.edges(data=True) if self_loops or u != v]
    edges.sort(key=lambda e: (-abs(e[2]["weight"]), e[2]["edge_id"]))
    if ranking == "per_node":
        seen: dict = {}
        place = []
        for u, v, d in edges:
            node = _group_node(g, u, v)
            place.append(seen.get(node, 0))
            seen[node] = place[-1] + 1
        edges = [e for _, e in sorted(zip(place, edges), key=lambda pe: pe[0])]   # stable: |weight| order within
    return [(u, v) for u, v, _ in edges[:k]]


def mark_strongest(g: nx.DiGraph, k: int, self_loops: bool = False, ranking: str = "global") -> list[tuple]:
    """Set edge attribute ``rank`` (1 = strongest, 0 = not among the ``k`` strongest) and graph attributes
    ``top_k_edges`` and ``ranking``; return the strongest edges (see :func:`strongest_edges`)."""
    chosen = strongest_edges(g, k, self_loops, ranking)
    for _, _, d in g.edges(data=True):
        d["rank"] = 0
    for r, (u, v) in enumerate(chosen, 1):
        g.edges[u, v]["rank"] = r
    g.graph.update(top_k_edges=k, ranking=ranking, self_loops_ranked=bool(self_loops))
    return chosen
