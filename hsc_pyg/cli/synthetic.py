"""``hsc-pyg synthetic``: write the built-in synthetic dataset in the SCAN precomp format."""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from ..data.synthetic import CAPTIONS_PER_IMAGE, DEFAULTS, make_synthetic
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command


def build_parser() -> OneLineParser:
    parser = command_parser(
        "synthetic",
        "Write the built-in synthetic dataset (scenes of objects with colours, sizes and spatial "
                    "relations; 5 template captions per image; twin scenes whose captions differ only by a swapped "
                    "relation or colour) in the SCAN precomp format. Deterministic from --seed.")
    parser.add_argument("--out", default="data/synthetic_precomp",
                        help="dataset folder to write, <data_path>/<data_name> (default: data/synthetic_precomp)")
    parser.add_argument("--seed", type=integer(0, 2**32), default=0, help="random seed (default: 0)")
    for flag, key, what in (("--train", "num_train", "train images"), ("--dev", "num_dev", "dev images"),
                            ("--test", "num_test", "test images"), ("--img_dim", "img_dim", "region feature size")):
        parser.add_argument(flag, type=integer(1), default=DEFAULTS[key], help=f"{what} (default: %(default)s)")
    parser.add_argument("--regions", type=integer(1), default=DEFAULTS["num_regions"],
                        help="regions per image, a square grid (default: %(default)s = 6 x 6)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing dataset in --out")
    return parser


def synthetic_command(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = make_synthetic(args.out, seed=args.seed, num_train=args.train, num_dev=args.dev, num_test=args.test,
                         img_dim=args.img_dim, num_regions=args.regions, overwrite=args.overwrite)
    print(f"wrote {out}: train {args.train} / dev {args.dev} / test {args.test} images, {CAPTIONS_PER_IMAGE} captions "
          f"each, {args.regions} regions x {args.img_dim} features, seed {args.seed} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), synthetic_command, argv, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    exit_with(main)
