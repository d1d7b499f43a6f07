"""``hsc-pyg convert IN OUT``: convert an official SGRAF / HSC checkpoint into this project's format."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..data.vocab import Vocabulary
from ..engine.checkpoint import model_from_checkpoint, read_checkpoint, run_config_of, save_checkpoint
from ..errors import CheckpointError
from .common import OneLineParser, command_parser, exit_with, run_command


def build_parser() -> OneLineParser:
    parser = command_parser(
        "convert", "Convert an official SGRAF (SAF/SGR) or HSC checkpoint into this project's format, optionally "
                   "bundling the vocabulary it was trained with, so that evaluation needs only the one file.")
    parser.add_argument("source", help="official checkpoint (e.g. model_best.pth.tar)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--vocab_path", default="", help="vocabulary JSON to bundle (e.g. f30k_precomp_vocab.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    return parser


def convert_command(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it or choose another path")
    ckpt = read_checkpoint(args.source)
    model = model_from_checkpoint(ckpt, source=args.source)
    if args.vocab_path:
        model.vocab = Vocabulary.load(args.vocab_path)
        if len(model.vocab) != model.config.vocab_size:
            raise CheckpointError(f"{args.vocab_path} has {len(model.vocab)} words but {args.source} was trained "
                                  f"with vocab_size={model.config.vocab_size}; pass the matching vocabulary")
    keep = {k: ckpt[k] for k in ("epoch", "iteration", "best_rsum", "converted_from") if k in ckpt}
    save_checkpoint(out, model, run_config_of(ckpt, args.source), **keep)
    print(f"wrote {out} ({model.config.preset}, {model.num_parameters():,} parameters)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), convert_command, argv)


if __name__ == "__main__":
    exit_with(main)
