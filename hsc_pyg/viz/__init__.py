"""Learned relations -> networkx -> PNG / GraphML / JSON.

    from hsc_pyg import load_checkpoint
    from hsc_pyg.data import PrecompSplit
    from hsc_pyg.viz import region_graph, mark_strongest, write_graph

    model = load_checkpoint("runs/demo/checkpoint/model_best.pth")
    split = PrecompSplit.open("data", "synthetic_precomp", "test")
    g = region_graph(model, split, image=0, level="higher", caption=0)   # networkx.DiGraph
    mark_strongest(g, 20)
    write_graph(g, "graphs/my_picture")                                   # .png, .graphml, .json

:mod:`~hsc_pyg.viz.relations` builds the graphs, :mod:`~hsc_pyg.viz.draw` draws and writes them,
:mod:`~hsc_pyg.viz.pictures` names and writes a set of them (what ``python -m hsc_pyg.viz`` does),
:mod:`~hsc_pyg.viz.explain` packs one (query, image) pair's attention, alignments and relations as JSON-ready data
(what the page of ``python -m hsc_pyg.serve`` draws).
"""
from .draw import draw_graph, graph_json, write_graph
from .explain import explain_pair
from .pictures import Picture, make_pictures, plan_pictures, write_pictures
from .relations import (
    LEVEL_CHOICES,
    RANKINGS,
    NoEdgeWeightsError,
    VizError,
    depths,
    mark_strongest,
    pair_graph,
    region_graph,
    strongest_edges,
    weighted_layer_types,
    word_graph,
)

__all__ = [
    "LEVEL_CHOICES", "NoEdgeWeightsError", "RANKINGS", "Picture", "VizError", "depths", "draw_graph", "explain_pair",
    "graph_json", "make_pictures", "mark_strongest", "pair_graph", "plan_pictures", "region_graph", "strongest_edges",
    "weighted_layer_types", "word_graph", "write_graph", "write_pictures",
]
