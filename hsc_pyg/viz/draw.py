"""Draw the graphs of :mod:`hsc_pyg.viz.relations` with matplotlib (headless: a bare ``Figure`` on the Agg canvas,
no pyplot window), and write them as PNG + GraphML + JSON.

Only the edges ranked by :func:`~hsc_pyg.viz.relations.mark_strongest` (``rank >= 1``) are drawn, their width growing
linearly with ``|weight|`` from the weakest drawn edge to the strongest; red = positive, blue = negative (only the
``hsc`` / ``hsc_text`` affinities can be negative).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import matplotlib.image
import networkx as nx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Circle, ConnectionPatch, Rectangle

from ..errors import DataError, os_error_reason
from ..io import atomic_files
from .relations import VizError

DPI = 100
POSITIVE, NEGATIVE = "#d62728", "#1f77b4"
SHADE = "#ff7f0e"
OUTPUT_SUFFIXES = (".png", ".graphml", ".json")
WORD_ARC = 0.25
TITLE_LINE = 0.15   # inches per title line (7 pt text)
TITLE_CHARS_PER_INCH = 17.5
MAX_BODY = 9.0      # inches: tall photos are drawn narrower


# --------------------------------------------------------------------------- helpers
def load_photo(path: str | Path) -> np.ndarray:
    """An image file as an array ``[H, W(, C)]`` for drawing under a region graph."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"photo {path} does not exist; --image_root must hold the files named in {{split}}_ids.txt")
    try:
        return matplotlib.image.imread(path)
    except Exception as e:  # Pillow raises several kinds on a bad file
        raise DataError(f"photo {path} cannot be read as an image ({' '.join(str(e).split())[:120]})") from None


def _drawn(g: nx.DiGraph) -> list[tuple]:
    ranked = [(d["rank"], u, v) for u, v, d in g.edges(data=True) if d.get("rank", 0) > 0]
    return [(u, v) for _, u, v in sorted(ranked)]


def _widths(g: nx.DiGraph, edges: Sequence[tuple], thin: float = 0.5, thick: float = 4.5) -> list[float]:
    """Line widths growing linearly with ``|weight|`` from the weakest drawn edge (thin) to the strongest (thick)."""
    weights = np.array([abs(g.edges[e]["weight"]) for e in edges], dtype=float)
    if not len(weights):
        return []
    low, span = weights.min(), weights.max() - weights.min()
    return list(thin + (thick - thin) * ((weights - low) / span if span > 0 else np.ones_like(weights)))


def _colours(g: nx.DiGraph, edges: Sequence[tuple]) -> list[str]:
    return [POSITIVE if g.edges[e]["weight"] >= 0 else NEGATIVE for e in edges]


def _canvas(width: float, body_height: float, title: Sequence[str]) -> tuple[Figure, list[float]]:
    """A figure of ``width`` inches with the ``title`` lines on top and a body of ``body_height`` inches below;
    returns the figure and the body's ``[left, bottom, width, height]`` in figure fractions."""
    chars = int(width * TITLE_CHARS_PER_INCH)
    lines = [wrapped for line in title if line for part in line.split("\n")
             for wrapped in textwrap.wrap(part, chars, subsequent_indent="  ")]
    title_height = TITLE_LINE * len(lines) + 0.12
    height = body_height + title_height + 0.1
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.text(0.1 / width, 1 - 0.06 / height, "\n".join(lines), ha="left", va="top", fontsize=7, linespacing=1.3)
    return fig, [0.05 / width, 0.05 / height, 1 - 0.1 / width, body_height / height]


def _weight_range(g: nx.DiGraph, edges: Sequence[tuple]) -> str:
    if not edges:
        return ""
    w = [g.edges[e]["weight"] for e in edges]
    return f"drawn weights {min(w):.3g} .. {max(w):.3g}"


def _depth_text(g: nx.DiGraph) -> str:
    a = g.graph
    if a["layer"] == 0:
        return "object level (before the relational layers: no learned edges)"
    name = f"{a['level']} level, " if a["level"] else ""
    return f"{name}layer {a['layer']}/{a['num_layers']} ({a['layer_type']})"


def _edges_text(g: nx.DiGraph, drawn: Sequence[tuple]) -> str:
    if g.graph.get("layer", 1) == 0:
        return ""
    loops = "" if g.graph.get("self_loops_ranked") else " (self-loops not drawn)"
    return (f"strongest {len(drawn)} of {g.number_of_edges()} edges by |weight|{_ranking_text(g)}{loops}, "
            f"{_weight_range(g, drawn)}\n"
            f"width from the weakest drawn |weight| (thin) to the strongest (thick); red > 0, blue < 0")


def _ranking_text(g: nx.DiGraph) -> str:
    if g.graph.get("ranking") != "per_node":
        return ""
    return ", per word" if g.graph.get("kind") == "pair" else ", per target node"


def _extent(g: nx.DiGraph, photo: np.ndarray | None) -> tuple[float, float]:
    """Width and height of the drawing area in the nodes' units (normalised boxes: 1 x 1)."""
    if g.graph.get("box_units") == "pixels":
        if photo is not None:
            return float(photo.shape[1]), float(photo.shape[0])
        xs = [d["x2"] for _, d in g.nodes(data=True) if "x2" in d]
        ys = [d["y2"] for _, d in g.nodes(data=True) if "y2" in d]
        return max(xs), max(ys)
    return 1.0, 1.0


def _unit_ratio(g: nx.DiGraph, photo: np.ndarray | None) -> float:
    """Drawn length of a y unit over that of an x unit: normalised boxes over a photo take the photo's shape."""
    if g.graph.get("box_units") == "normalised" and photo is not None:
        return photo.shape[0] / photo.shape[1]
    return 1.0


def _body_aspect(g: nx.DiGraph, photo: np.ndarray | None) -> float:
    """Height over width of the drawing area."""
    if g.graph["node_positions"] != "box_centres":
        return 1.0
    w, h = _extent(g, photo)
    return h / w * _unit_ratio(g, photo)


def _draw_regions(ax, g: nx.DiGraph, nodes: Sequence, photo: np.ndarray | None, shade: bool) -> dict:
    """Photo, region boxes (shaded by ``attention``), region nodes and labels; returns the node positions."""
    boxes = g.graph["node_positions"] == "box_centres"
    pos = {n: (g.nodes[n]["x"], g.nodes[n]["y"]) for n in nodes}
    if boxes:
        w, h = _extent(g, photo)
        if photo is not None:
            ax.imshow(photo, extent=(0, w, h, 0), zorder=0, cmap="gray" if photo.ndim == 2 else None)
        top = max((g.nodes[n].get("attention", 0.0) for n in nodes), default=0.0) or 1.0
        for n in nodes:
            d = g.nodes[n]
            ax.add_patch(Rectangle((d["x1"], d["y1"]), d["x2"] - d["x1"], d["y2"] - d["y1"], fill=False,
                                   linewidth=0.4, edgecolor="white" if photo is not None else "0.8", zorder=1))
            if shade and "attention" in d:
                ax.add_patch(Rectangle((d["x1"], d["y1"]), d["x2"] - d["x1"], d["y2"] - d["y1"], linewidth=0,
                                       facecolor=SHADE, alpha=0.75 * d["attention"] / top, zorder=1))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    else:
        ax.set_xlim(-1.25, 1.25)
        ax.set_ylim(-1.25, 1.25)
        if shade:
            top = max((g.nodes[n].get("attention", 0.0) for n in nodes), default=0.0) or 1.0
            for n in nodes:
                if "attention" in g.nodes[n]:
                    ax.add_patch(Circle(pos[n], 0.12, facecolor=SHADE, linewidth=0, zorder=1,
                                        alpha=0.75 * g.nodes[n]["attention"] / top))
    nx.draw_networkx_nodes(g, pos, nodelist=list(nodes), ax=ax, node_size=90, node_color="white",
                           edgecolors="black", linewidths=0.6).set_zorder(3)
    labels = nx.draw_networkx_labels(g, pos, labels={n: g.nodes[n]["label"] for n in nodes}, ax=ax, font_size=5)
    for text in labels.values():
        text.set_zorder(4)
    ax.set_aspect(_unit_ratio(g, photo) if boxes else 1.0)
    ax.set_axis_off()
    return pos


def _draw_edges(ax, g: nx.DiGraph, pos: dict, edges: Sequence[tuple], rad: float = 0.2, node_size: int = 90) -> None:
    """The ranked edges as curved arrows (a curve keeps the two directions of a pair apart)."""
    if not edges:
        return
    drawn = nx.draw_networkx_edges(
        g, pos, edgelist=list(edges), ax=ax, width=_widths(g, edges), edge_color=_colours(g, edges), alpha=0.85,
        arrows=True, arrowstyle="-|>", arrowsize=8, node_size=node_size, connectionstyle=f"arc3,rad={rad}")
    for patch in drawn if isinstance(drawn, list) else [drawn]:
        patch.set_zorder(2)


def _item_text(g: nx.DiGraph) -> str:
    a = g.graph
    ident = f" ({a['image_id']})" if a.get("image_id") else ""
    return f"{a['data_name']} {a['split']} image {a['image']}{ident}"


# --------------------------------------------------------------------------- the three pictures
def draw_region_graph(g: nx.DiGraph, photo: np.ndarray | None = None) -> Figure:
    """Regions at their box centres (over ``photo`` when given) or on a circle; the ranked edges as arrows."""
    drawn = _drawn(g)
    a = g.graph
    shade = (f"shaded: attention of '{a['word']}' (token {a['word_position']} of caption {a['caption']}, "
             f"{a['attention_level']} level)\n\"{_shorten(a['caption_text'], 100)}\"" if "word" in a else "")
    title = [f"{_item_text(g)}: region graph, {_depth_text(g)}", _edges_text(g, drawn), shade]
    aspect = _body_aspect(g, photo)
    width = min(6.0, MAX_BODY / aspect)
    fig, body = _canvas(max(width, 5.0), (width - 0.1) * aspect, title)
    ax = fig.add_axes(body)
    pos = _draw_regions(ax, g, list(g.nodes), photo, shade=True)
    _draw_edges(ax, g, pos, drawn)
    return fig


def draw_word_graph(g: nx.DiGraph) -> Figure:
    """Tokens left to right, labelled; the ranked edges as arcs (rightward edges on one side of the line, leftward
    on the other)."""
    n = g.number_of_nodes()
    drawn = _drawn(g)
    a = g.graph
    title = [f"{a['data_name']} {a['split']} caption {a['caption']} (of image {a['image']}): word graph, "
             f"{_depth_text(g)}", _edges_text(g, drawn),
             "arcs above the words point to a later word, arcs below to an earlier one" if drawn else ""]
    width = max(6.0, 0.85 * n + 1.0)
    # arc3 bends in display space: an arc over the whole line rises rad / 2 of its length; make room for it
    fig, body = _canvas(width, 2 * (WORD_ARC / 2 * width + 0.35), title)
    ax = fig.add_axes(body)
    pos = {k: (g.nodes[k]["x"], g.nodes[k]["y"]) for k in g.nodes}
    _draw_edges(ax, g, pos, drawn, rad=-WORD_ARC, node_size=900)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=900, node_color="white", edgecolors="black",
                           linewidths=0.6).set_zorder(3)
    for k in g.nodes:
        ax.text(pos[k][0], pos[k][1], g.nodes[k]["label"], ha="center", va="center", fontsize=7, zorder=4,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-1, 1)
    ax.set_axis_off()
    return fig


def draw_pair_graph(g: nx.DiGraph, photo: np.ndarray | None = None) -> Figure:
    """Words in a column on the left, regions on the right (over ``photo`` when given); each ranked word-to-region
    attention edge is a line coloured by its word."""
    words = [n for n, d in g.nodes(data=True) if d["kind"] == "word"]
    regions = [n for n, d in g.nodes(data=True) if d["kind"] == "region"]
    drawn = _drawn(g)
    a = g.graph
    title = [
        f"{a['data_name']} {a['split']} image {a['image']}" + (f" ({a['image_id']})" if a.get("image_id") else "")
        + f" with caption {a['caption']} (of image {a['caption_of_image']}): score {a['score']:.4f}",
        f"\"{_shorten(a['caption_text'], 110)}\"",
        f"word-to-region attention ({a['attention_level']} level): strongest {len(drawn)} of {g.number_of_edges()} "
        f"edges{_ranking_text(g)}, {_weight_range(g, drawn)}; width from the weakest drawn to the strongest",
    ]
    word_width, image_width = 2.0, 6.0
    aspect = _body_aspect(g, photo)
    image_width = min(image_width, MAX_BODY / aspect)
    body_height = max(image_width * aspect, 0.2 * len(words))
    fig, (left, bottom, _, height) = _canvas(word_width + image_width + 0.2, body_height, title)
    total = word_width + image_width + 0.2
    word_ax = fig.add_axes([left, bottom, word_width / total, height])
    ax = fig.add_axes([left + (word_width + 0.1) / total, bottom, image_width / total, height])
    pos = _draw_regions(ax, g, regions, photo, shade=False)
    palette = matplotlib.colormaps["tab10"]
    colour_of = {w: to_hex(palette(i % 10)) for i, w in enumerate(words)}
    step = 1.0 / max(len(words), 1)
    word_pos = {w: (0.9, 1.0 - (i + 0.5) * step) for i, w in enumerate(words)}
    for w in words:
        word_ax.text(*word_pos[w], g.nodes[w]["label"], ha="right", va="center", fontsize=8, color=colour_of[w],
                     transform=word_ax.transAxes)
    word_ax.set_axis_off()
    for (w, r), width in zip(drawn, _widths(g, drawn, thin=0.5, thick=3.5)):
        fig.add_artist(ConnectionPatch(xyA=(0.94, word_pos[w][1]), coordsA=word_ax.transAxes, xyB=pos[r],
                                       coordsB=ax.transData, color=colour_of[w], linewidth=width, alpha=0.8,
                                       zorder=2))
    return fig


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def draw_graph(g: nx.DiGraph, photo: np.ndarray | None = None) -> Figure:
    """The picture of any graph of :mod:`hsc_pyg.viz.relations`, by its ``kind``."""
    kind = g.graph.get("kind")
    if kind == "region":
        return draw_region_graph(g, photo)
    if kind == "words":
        return draw_word_graph(g)
    if kind == "pair":
        return draw_pair_graph(g, photo)
    raise VizError(f"graph kind {kind!r} is unknown; expected region, words or pair")


# --------------------------------------------------------------------------- files
def output_paths(stem: str | Path) -> list[Path]:
    """The three files of one picture: ``stem.png``, ``stem.graphml``, ``stem.json``."""
    stem = Path(stem)
    return [stem.with_name(stem.name + suffix) for suffix in OUTPUT_SUFFIXES]


def check_free(paths: Sequence[Path], overwrite: bool = False) -> None:
    """VizError if any of ``paths`` exists and not ``overwrite``."""
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise VizError(f"{taken[0]}{more} already exist(s); pass --overwrite to replace them or choose another --out")


def make_folder(folder: Path) -> None:
    """Create the output folder (and its parents); VizError when a file is in the way."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VizError(f"--out {folder} is not a folder it can write into ({os_error_reason(e)}); "
                       "choose another --out") from None


def graph_json(g: nx.DiGraph) -> dict:
    """The graph as JSON-ready data in the networkx node-link layout: ``{"directed", "multigraph", "graph", "nodes":
    [{"id", ...attributes}], "edges": [{"source", "target", "weight", "edge_id", "rank"}]}``;
    ``networkx.node_link_graph(data, edges="edges")`` reads it back."""
    return {
        "directed": True,
        "multigraph": False,
        "graph": dict(g.graph),
        "nodes": [{"id": n, **d} for n, d in g.nodes(data=True)],
        "edges": [{"source": u, "target": v, **d} for u, v, d in g.edges(data=True)],
    }


def graph_files(g: nx.DiGraph, stem: str | Path, photo: np.ndarray | None = None) -> dict[Path, Callable]:
    """The writers of ``stem.png`` (the picture), ``stem.graphml`` and ``stem.json`` (all nodes and edges with their
    weights), for :func:`hsc_pyg.io.atomic_files`."""
    png, graphml, js = output_paths(stem)

    return {png: lambda f: draw_graph(g, photo).savefig(f, format="png", dpi=DPI),
            graphml: lambda f: nx.write_graphml(g, f),
            js: lambda f: f.write((json.dumps(graph_json(g), indent=1) + "\n").encode("utf-8"))}


def write_graph(g: nx.DiGraph, stem: str | Path, photo: np.ndarray | None = None, overwrite: bool = False,
                ) -> list[Path]:
    """Write ``stem.png``, ``stem.graphml`` and ``stem.json`` as one unit (:func:`graph_files`); return the paths."""
    paths = output_paths(stem)
    check_free(paths, overwrite)
    make_folder(paths[0].parent)
    return atomic_files(graph_files(g, stem, photo))
