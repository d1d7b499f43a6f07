"""``hsc-pyg vocab``: build a vocabulary JSON (SCAN layout) from a split's captions."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..data.precomp import caption_file, read_lines
from ..data.vocab import SPECIALS, build_vocab
from ..errors import ConfigError
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command


def build_parser() -> OneLineParser:
    parser = command_parser(
        "vocab",
        "Build a vocabulary JSON file (SCAN layout: word2idx, idx2word, idx) from the train captions "
                    "<data_path>/<data_name>/train_caps.txt: the words seen at least --threshold times, after the "
                    "specials <pad>=0 <start>=1 <end>=2 <unk>=3.")
    parser.add_argument("--data_path", required=True, help="folder that holds <data_name>/")
    parser.add_argument("--data_name", required=True, help="dataset folder name, e.g. f30k_precomp or synthetic_precomp")
    parser.add_argument("--split", default="train", help="split whose captions are counted (default: train)")
    parser.add_argument("--threshold", type=integer(1), default=4, help="minimum count of a kept word (default: 4, as SCAN)")
    parser.add_argument("--out", required=True, help="vocabulary JSON file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def vocab_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    captions = read_lines(caption_file(args.data_path, args.data_name, args.split), what="caption")
    vocab = build_vocab(captions, threshold=args.threshold)
    vocab.save(out)
    print(f"wrote {out}: {len(vocab)} entries ({len(vocab) - len(SPECIALS)} words seen >= {args.threshold} times "
          f"in {len(captions)} {args.split} captions)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), vocab_command, argv, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    exit_with(main)
