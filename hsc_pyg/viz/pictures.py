"""One call from (model, split, item indices) to the written PNG / GraphML / JSON files; ``python -m hsc_pyg.viz`` is a
thin command line over :func:`make_pictures`.

File names (``stem`` + ``.png`` / ``.graphml`` / ``.json``) hold the dataset, split, item, kind and level or layer, so
different pictures never share a name::

    {data_name}_{split}_image{I}_region_{depth}[_caption{J}-word{K}]   region graph (shaded by word K of caption J)
    {data_name}_{split}_caption{J}_words_{depth}                         word graph
    {data_name}_{split}_image{I}_caption{J}_pair_{attention level}       word-to-region attention + score

with ``depth`` = ``object``, ``relational-layer1``, ``higher-layer{N}`` or ``layer{K}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..engine.scoring import check_compatible
from ..errors import ConfigError, DataError
from ..nn.model import HSCModel
from ..io import atomic_files
from .draw import check_free, graph_files, load_photo, make_folder, output_paths
from .relations import (
    RANKINGS,
    check_edge_weights,
    check_finite_weights,
    check_index,
    depths,
    mark_strongest,
    pair_graph,
    region_graph,
    word_graph,
)

DEFAULT_TOP_K = 20


@dataclass
class Picture:
    """A graph to write, its file stem and the photo to draw it over (region and pair graphs)."""

    graph: nx.DiGraph
    stem: Path
    photo_path: Path | None = None

    @property
    def paths(self) -> list[Path]:
        return output_paths(self.stem)

    def describe(self) -> str:
        a, g = self.graph.graph, self.graph
        if a["kind"] == "pair":
            return f"pair, score {a['score']:.4f}, {a['attention_level']} attention"
        depth = "object level (no learned edges)" if a["layer"] == 0 else (
            f"{a['level'] + ' level, ' if a['level'] else ''}layer {a['layer']}/{a['num_layers']} {a['layer_type']}")
        shaded = f", shaded by '{a['word']}'" if "word" in a else ""
        drawn = sum(1 for *_, d in g.edges(data=True) if d["rank"] > 0)
        return f"{'region' if a['kind'] == 'region' else 'word'} graph, {depth}, {drawn} of {g.number_of_edges()} " \
               f"edges drawn{shaded}"


def _prefix(split: PrecompSplit) -> str:
    return f"{split.name}_{split.split}"


def photo_path(split: PrecompSplit, image: int, image_root: str | Path) -> Path:
    """``image_root / {split}_ids.txt[image]``: the photo of an image row."""
    if split.ids is None:
        raise DataError(f"{split.file('ids.txt')} is missing, so the photo of image {image} cannot be named; "
                        "add the ids file (one photo file name per image) or leave out --image_root")
    return Path(image_root) / split.ids[image]


def plan_pictures(model: HSCModel, split: PrecompSplit, out: str | Path, image: int | None = None,
                  caption: int | None = None, level: str | None = None, layer: int | None = None,
                  top_k: int = DEFAULT_TOP_K, ranking: str = "global", word: str | int | None = None,
                  image_root: str | Path | None = None, vocab: Vocabulary | None = None) -> list[Picture]:
    """The graphs asked for, ranked for drawing, with their file stems; nothing is written.

    ``image``: region graphs of that image; ``caption`` (an index into the split's captions, ``{split}_caps.txt``
    line): word graphs; both: also the pair graph, and the region graphs are shaded by ``word``'s attention.
    ``level`` (object, relational, higher or all; default higher) or ``layer`` (1-based) picks the relational layer;
    ``top_k`` and ``ranking`` pick the edges to draw (:func:`~hsc_pyg.viz.relations.strongest_edges`).
    """
    if image is None and caption is None:
        raise ConfigError("nothing to draw: give an image (--image I), a caption (--caption J), or both")
    if word is not None and caption is None:
        raise ConfigError("--word needs --caption: the word is taken from that caption")
    if top_k < 0:
        raise ConfigError(f"--top_k_edges must be 0 or more, found {top_k}")
    if ranking not in RANKINGS:
        raise ConfigError(f"--rank {ranking!r} is unknown; choose one of {', '.join(RANKINGS)}")
    if image_root is not None and image is None:
        raise ConfigError("--image_root draws region graphs over the photo; it needs --image")
    if image is not None:
        check_index("image", image, split.num_images, split)
    if caption is not None:
        check_index("caption", caption, split.num_captions, split)
    check_finite_weights(model)
    config = model.config
    if caption is not None:
        vocab = check_compatible(model, split, vocab)
    out = Path(out)
    photo = photo_path(split, image, image_root) if image is not None and image_root is not None else None
    img_depths = depths(level, layer, config.img_layers) if image is not None else []
    txt_depths = depths(level, layer, config.txt_layers) if caption is not None else []
    # say what cannot be drawn before computing anything
    for depth in img_depths:
        check_edge_weights("image", config.img_gnn, config.img_layers, depth)
    for depth in txt_depths:
        check_edge_weights("text", config.txt_gnn, config.txt_layers, depth)

    pictures = []
    for depth in img_depths:
        g = region_graph(model, split, image, depth.level, None if depth.level else depth.layer, caption, word, vocab)
        shade = f"_caption{caption}-word{g.graph['word_position']}" if caption is not None else ""
        pictures.append(Picture(g, out / f"{_prefix(split)}_image{image}_region_{depth.tag}{shade}", photo))
    for depth in txt_depths:
        g = word_graph(model, split, caption, depth.level, None if depth.level else depth.layer, vocab)
        pictures.append(Picture(g, out / f"{_prefix(split)}_caption{caption}_words_{depth.tag}"))
    if image is not None and caption is not None:
        shown = model.levels if level == "all" else (level if level in model.levels else model.levels[-1],)
        for lv in shown:
            g = pair_graph(model, split, image, caption, lv, vocab)
            pictures.append(Picture(g, out / f"{_prefix(split)}_image{image}_caption{caption}_pair_{lv}", photo))
    for picture in pictures:
        mark_strongest(picture.graph, top_k, ranking=ranking)
    return pictures


def write_pictures(pictures: list[Picture], overwrite: bool = False) -> list[Path]:
    """Write every picture's three files, the whole set as one unit (:func:`hsc_pyg.io.atomic_files`: a failure
    leaves every old file as it was); refuses (VizError) before writing anything if a file exists and not
    ``overwrite``. Returns the PNG paths."""
    check_free([p for picture in pictures for p in picture.paths], overwrite)
    photos = {}
    for picture in pictures:
        if picture.photo_path is not None and picture.photo_path not in photos:
            photos[picture.photo_path] = load_photo(picture.photo_path)
    files = {}
    for picture in pictures:
        make_folder(picture.stem.parent)
        files.update(graph_files(picture.graph, picture.stem, photos.get(picture.photo_path)))
    atomic_files(files)
    return [picture.paths[0] for picture in pictures]


def make_pictures(model: HSCModel, split: PrecompSplit, out: str | Path = "graphs", overwrite: bool = False,
                  **options) -> list[Picture]:
    """:func:`plan_pictures` then :func:`write_pictures`; returns the pictures written."""
    pictures = plan_pictures(model, split, out, **options)
    write_pictures(pictures, overwrite)
    return pictures
