"""Search a gallery with a trained model: ``python -m hsc_pyg.search`` (see :mod:`hsc_pyg.cli.search`) or, in Python::

    from hsc_pyg import load_checkpoint
    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.search import open_gallery, search_text

    model = load_checkpoint("runs/f8k/checkpoint/model_best.pth")
    gallery, _ = open_gallery(model, PrecompSplit.open("data", "flickr8k_mini_precomp", "test"))
    for hit in search_text(model, gallery, "a dog runs on the beach", k=5).hits:
        print(hit.id, hit.score)

The work is done by :mod:`hsc_pyg.engine.retrieval`.
"""
from ..engine.retrieval import CacheError, Gallery, Hit, SearchResult, open_gallery, search_image, search_text

__all__ = ["CacheError", "Gallery", "Hit", "SearchResult", "open_gallery", "search_image", "search_text"]
