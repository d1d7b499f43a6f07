"""Why a photo matched a sentence: the explanation data of one (query, image) pair, as JSON-ready Python.

The same extraction as the pictures of :mod:`hsc_pyg.viz.relations` (the image encoded alone with every layer's edge
weights, the sentence encoded alone, their word-to-region cross attention), packed for a page to draw over the photo
(``python -m hsc_pyg.serve``). For one pair it gives:

``tokens``       the sentence as the model reads it (``<start>`` and ``<end>`` included, unknown words as ``<unk>``);
                 ``default_token``: the position of the word the pictures shade by default
                 (:func:`~hsc_pyg.viz.relations.choose_word`);
``regions``      the image's regions: box ``x1 y1 x2 y2`` and centre ``x y`` (``box_units``: ``normalised`` to the
                 photo's size, or ``pixels``), or a circular layout when the data has no boxes;
``attention``    per aligned level, ``[L][R]``: each token's attention over the regions (each row sums to 1), the
                 attention the score uses (MODEL.md §2 step 1);
``alignment``    per aligned level: ``score`` (the pair's exact score at that level; ``score`` at the top is their
                 mean, the model's score), ``global`` (cosine of the image's and the sentence's global vectors, the
                 inputs of the global alignment) and ``local`` (per token, the cosine of the word with its attended
                 regions, the inputs of the local alignment);
``relations``    per relational layer with learned edge weights (the ``relational`` and ``higher`` levels, one entry
                 per distinct layer): the ``top_k`` strongest region -> region edges (self-loops left out), strongest
                 first, as :func:`~hsc_pyg.viz.relations.strongest_edges` ranks them for the pictures.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..engine.device import eval_mode
from ..engine.scoring import check_features
from ..engine.retrieval import unknown_query_words
from ..errors import ConfigError
from ..nn import similarity
from ..nn.model import HSCModel
from .relations import (
    RANKINGS,
    NoEdgeWeightsError,
    check_edge_weights,
    choose_word,
    cross_attention,
    depths,
    encode_image_item,
    encode_text_item,
    item_region_graph,
    strongest_edges,
)

DEFAULT_TOP_K = 12


@torch.no_grad()
def explain_pair(model: HSCModel, split: PrecompSplit, image: int, text: str, vocab: Vocabulary | None = None,
                 top_k: int = DEFAULT_TOP_K, ranking: str = "global") -> dict[str, Any]:
    """The explanation of image row ``image`` of ``split`` against the free-text ``text`` (see the module docstring);
    every value is a JSON type. ConfigError for an empty query, one of unknown words only, or a bad ``top_k``."""
    vocab = vocab if vocab is not None else model.vocab
    if vocab is None:
        raise ConfigError("the model carries no vocabulary (official checkpoints do not); pass --vocab_path")
    if top_k < 0:
        raise ConfigError(f"top_k must be 0 or more, found {top_k}")
    if ranking not in RANKINGS:
        raise ConfigError(f"ranking {ranking!r} is unknown; choose one of {', '.join(RANKINGS)}")
    unknown = unknown_query_words(vocab, text)
    check_features(model, split)
    img = encode_image_item(model, split, image)
    cap = encode_text_item(model, text, vocab)
    config = model.config
    layout = item_region_graph(model, split, img, depths("object")[0])
    attention, alignment = {}, {}
    with eval_mode(model):
        for level in model.levels:
            attention[level] = cross_attention(model, img, cap, level)
            alignment[level] = _alignment(model, img, cap, level, attention[level])
    relations, skipped = [], None
    for depth in depths("all", None, config.img_layers):
        if depth.layer == 0 or any(r["layer"] == depth.layer for r in relations):
            continue
        try:
            check_edge_weights("image", config.img_gnn, config.img_layers, depth)
        except NoEdgeWeightsError as e:
            skipped = str(e)
            break
        g = item_region_graph(model, split, img, depth)
        relations.append({"level": depth.level, "layer": depth.layer, "num_layers": config.img_layers,
                          "layer_type": g.graph["layer_type"], "weight_meaning": g.graph["weight_meaning"],
                          "edges": [{"source": u, "target": v, "weight": g.edges[u, v]["weight"]}
                                    for u, v in strongest_edges(g, top_k, ranking=ranking)]})
    return {
        "image": img.index, "image_id": img.item_id, "query": text, "tokens": cap.words, "unknown_words": unknown,
        "default_token": choose_word(cap.words, None, attention[model.levels[-1]]),
        "score": sum(a["score"] for a in alignment.values()) / len(alignment),
        "aligned_levels": list(model.levels), "attention_level": model.levels[-1],
        "node_positions": layout.graph["node_positions"], "box_units": layout.graph.get("box_units"),
        "regions": [{k: d[k] for k in ("index", "x", "y", "x1", "y1", "x2", "y2") if k in d}
                    for _, d in sorted(layout.nodes(data=True))],
        "attention": {level: a.tolist() for level, a in attention.items()},
        "alignment": alignment, "relations": relations, "relations_missing": skipped,
        "top_k": top_k, "ranking": ranking,
    }


def _alignment(model: HSCModel, img, cap, level: str, attention: torch.Tensor) -> dict[str, Any]:
    """The pair's exact score at ``level`` and the cosines behind its global and local alignment."""
    sim = model.similarity
    regions, words, mask = img.states.levels[level], cap.states.levels[level], cap.states.mask   # [1,R,d] [1,L,d]
    img_glo, cap_glo = sim.visual_sa(regions), sim.text_sa(words, mask)                          # [1, d]
    context = similarity.attended_context(attention, regions[0])                                 # [L, d]
    return {"score": float(sim(regions, img_glo, words, mask, cap_glo)[0, 0]),
            "global": float(F.cosine_similarity(img_glo, cap_glo)[0]),
            "local": F.cosine_similarity(context, words[0], dim=-1).tolist()}
