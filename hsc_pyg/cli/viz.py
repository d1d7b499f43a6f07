"""``hsc-pyg viz`` (also ``python -m hsc_pyg.viz``): draw the relations a trained model learned for one image, one
caption or one pair.

    hsc-pyg viz --model runs/demo/checkpoint/model_best.pth --data_path data --data_name synthetic_precomp \\
        --split test --image 0 --caption 0 --level all --out graphs/

Expected failures print one line to stderr and exit with status 2 (``--debug`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..engine.checkpoint import load_checkpoint
from ..viz.pictures import DEFAULT_TOP_K, make_pictures
from ..viz.relations import LEVEL_CHOICES, RANKINGS, weighted_layer_types
from ..options import integer
from .common import OneLineParser, add_model_and_split_arguments, command_parser, exit_with, run_command

DESCRIPTION = f"""\
Draw what a trained HSC model learned about one test item, as PNG + GraphML + JSON (named by data, split, item, kind
and level, so pictures never overwrite each other):
  --image I              the region graph of image I: regions at their box centres (over the photo with
                         --image_root), the strongest --top_k_edges learned edges as arrows, width by weight;
  --caption J            the word graph of caption J (line J of {{split}}_caps.txt): words left to right;
  --image I --caption J  both, the regions shaded by their attention to one word (--word), and the pair graph:
                         word-to-region cross attention and the pair's score.
Levels: object = before the relational layers (no learned edges), relational = layer 1, higher = the last layer,
all = each of the three; or --layer K. Layer types with edge weights: {', '.join(weighted_layer_types())}."""


def build_parser() -> OneLineParser:
    p = command_parser("viz", DESCRIPTION)
    add_model_and_split_arguments(p, split_help="split (default: %(default)s)")
    p.add_argument("--image", type=integer(0), metavar="I", help="image row of the split")
    p.add_argument("--caption", type=integer(0), metavar="J",
                   help="caption line of the split (image I's own captions are 5I .. 5I+4)")
    p.add_argument("--level", choices=LEVEL_CHOICES, help="object, relational, higher or all (default: higher)")
    p.add_argument("--layer", type=integer(1), metavar="K", help="relational layer K (1-based) instead of a level")
    p.add_argument("--top_k_edges", type=integer(0), default=DEFAULT_TOP_K, metavar="K",
                   help="draw the K edges of largest |weight| (self-loops left out; files hold every edge) "
                        "(default: %(default)s)")
    p.add_argument("--rank", choices=RANKINGS, default="global",
                   help="global: the K edges of largest |weight|; per_node: round-robin over the nodes whose weights "
                        "are normalised together (each region's or word's incoming edges; each word of a pair), "
                        "strongest first (default: %(default)s)")
    p.add_argument("--word", metavar="W",
                   help="word of the caption to shade regions by: the word or its position (<start> = 0) "
                        "(default: the word whose attention peaks highest)")
    p.add_argument("--image_root", metavar="DIR",
                   help="folder of the photos named in {split}_ids.txt: draw the region graph over the photo")
    p.add_argument("--out", default="graphs", help="folder to write into (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same name")
    return p


def viz_command(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.model)
    vocab = Vocabulary.load(args.vocab_path) if args.vocab_path else None
    split = PrecompSplit.open(args.data_path, args.data_name, args.split)
    pictures = make_pictures(model, split, out=args.out, overwrite=args.overwrite, image=args.image,
                             caption=args.caption, level=args.level, layer=args.layer, top_k=args.top_k_edges,
                             ranking=args.rank, word=args.word, image_root=args.image_root, vocab=vocab)
    for picture in pictures:
        print(f"wrote {picture.paths[0]} (+ .graphml, .json): {picture.describe()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), viz_command, argv)


if __name__ == "__main__":
    exit_with(main)
