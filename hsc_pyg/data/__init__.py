"""Data: vocabulary and tokenizer, SCAN precomp splits, PyG graphs of images and captions, the built-in dataset.

The names below are re-exported lazily (on first use), so that ``python -m hsc_pyg.data.vocab`` and
``python -m hsc_pyg.data.synthetic`` do not import their own module twice.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "vocab": ("PAD", "START", "END", "UNK", "SPECIALS", "Vocabulary", "build_vocab", "tokenize"),
    "precomp": ("PrecompSplit", "CaptionDataset", "ImageDataset", "TextDataset", "read_lines"),
    "graphs": ("EDGE_BUILDERS", "register_edge_builder", "make_edges", "parse_edge_spec", "image_graph",
               "caption_graph", "collate_graphs", "collate_pairs", "PairBatch", "PairCollate", "GraphCollate"),
    "synthetic": ("make_synthetic",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
