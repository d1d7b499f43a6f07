"""A search's answer as one picture: the query and the photos (or captions) it found, with their scores."""
from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.retrieval import SearchResult
from ..io import atomic_write
from .draw import load_photo

COLUMNS = 5
DPI = 100


def contact_sheet(result: SearchResult, image_root: str | Path, out: str | Path) -> Path:
    """Draw ``result`` into the PNG ``out``. A text query: its top photos, best first, each titled with its rank,
    id and exact score. An image query: the photo, and its top captions with their scores. The photos are read from
    ``image_root`` by id before anything is drawn (a missing photo is a DataError); the PNG is written atomically."""
    root, out = Path(image_root), Path(out)
    if result.kind == "text":
        photos = [load_photo(root / hit.id) for hit in result.hits]
        rows = -(-len(photos) // COLUMNS)
        fig = Figure(figsize=(3.2 * COLUMNS, 3.0 * rows + 0.8))
        axes = fig.subplots(rows, COLUMNS, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for rank, (ax, hit, photo) in enumerate(zip(axes.flat, result.hits, photos), 1):
            ax.imshow(photo)
            ax.set_title(f"#{rank}  {hit.id}\nscore {hit.score:.4f}", fontsize=9)
        fig.suptitle(textwrap.shorten(f"query: {result.query}", 140), fontsize=12)
    else:
        photo = load_photo(root / result.query_id)
        fig = Figure(figsize=(12, 4.5))
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
        left.imshow(photo)
        left.axis("off")
        left.set_title(f"query: image {result.query_id}", fontsize=11)
        right.axis("off")
        lines = [f"#{rank}  {hit.score:.4f}  " + textwrap.shorten(hit.text or "", 70)
                 for rank, hit in enumerate(result.hits, 1)]
        right.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, dpi=DPI, format="png"))
    return out

