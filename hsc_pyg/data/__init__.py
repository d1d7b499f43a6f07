"""Data: vocabulary and tokenizer, SCAN precomp splits, PyG graphs of images and captions, the built-in dataset."""
import warnings

from .graphs import (EDGE_BUILDERS, PairBatch, caption_graph, collate_graphs, collate_pairs, image_graph, make_edges,
                     parse_edge_spec, register_edge_builder)
from .precomp import CaptionDataset, ImageDataset, PrecompSplit, TextDataset, read_lines
from .synthetic import make_synthetic
from .vocab import END, PAD, SPECIALS, START, UNK, Vocabulary, build_vocab, tokenize

__all__ = ["CaptionDataset", "EDGE_BUILDERS", "END", "ImageDataset", "PAD", "PairBatch", "PrecompSplit", "SPECIALS",
           "START", "TextDataset", "UNK", "Vocabulary", "build_vocab", "caption_graph", "collate_graphs",
           "collate_pairs", "image_graph", "make_edges", "make_synthetic", "parse_edge_spec", "read_lines",
           "register_edge_builder", "tokenize"]

# `python -m hsc_pyg.data.synthetic|vocab` (command forms of old) imports this package, and so those modules, before
# running them; runpy would warn about that ahead of their one-line refusal (errors.refuse_as_command). Only that
# warning, only for those two modules, is silenced.
warnings.filterwarnings("ignore", message=r"'hsc_pyg\.data\.(synthetic|vocab)' found in sys\.modules",
                        category=RuntimeWarning)
