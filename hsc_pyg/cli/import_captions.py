"""``hsc-pyg import-captions``: captions from Karpathy / COCO JSON, CSV or per-photo text files ->
``{split}_caps.txt`` aligned with ``{split}_ids.txt``.

    hsc-pyg import-captions --captions dataset_flickr30k.json --out data/f30k_grid
    hsc-pyg import-captions --captions captions.txt --split test --out data/my_precomp
    hsc-pyg import-captions --captions captions.csv --out data/flickr8k_precomp \
        --split_list train=train_images.txt --split_list dev=dev_images.txt --split_list test=test_images.txt

Expected failures print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ..data.importers import FEWER, FORMATS, import_captions
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Write {split}_caps.txt (PER_IMAGE captions per photo, caption k belongs to photo k // PER_IMAGE) into --out, in the
order of {split}_ids.txt when it is there (extract the features first), else sorted by photo name (and then
{split}_ids.txt is written too). Karpathy's dataset_*.json gives every split with SCAN's names (train + restval ->
train, val -> dev, test -> test; COCO's test -> testall); the other formats are one --split, or one --split_list
NAME=FILE per split (photo names, one a line: the split holds those photos in that order; the lists must be disjoint;
captions of photos in no list are left out and counted). Photos with more captions
keep the first PER_IMAGE (as SCAN); photos with fewer are an error unless --fewer repeat; captions of photos that are
not among the split's photos are an error unless --ignore_extra."""


def _split_list(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (for example train=train_images.txt), found {text!r}")
    return name, path


def build_parser() -> OneLineParser:
    p = command_parser("import-captions", DESCRIPTION)
    p.add_argument("--captions", required=True, metavar="PATH",
                   help="dataset_*.json, captions_*.json, an image,caption CSV, or a folder of NAME.txt files")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (<data_path>/<data_name>)")
    p.add_argument("--format", choices=FORMATS, default="auto", dest="fmt", help="(default: %(default)s)")
    p.add_argument("--split", help="the split to write (needed except for Karpathy's JSON, where it picks one)")
    p.add_argument("--split_list", action="append", metavar="NAME=FILE", type=_split_list,
                   help="a split and the file listing its photos; repeat per split (instead of --split)")
    p.add_argument("--images", metavar="DIR",
                   help="photo folder: every captioned photo must be in it (and, for one split, every photo of it "
                        "needs captions)")
    p.add_argument("--per_image", type=integer(1), default=5, help="captions per photo (default: %(default)s)")
    p.add_argument("--fewer", choices=FEWER, default="error",
                   help="photos with fewer captions: error, or repeat their captions (default: %(default)s)")
    p.add_argument("--ignore_extra", action="store_true",
                   help="leave out captions of photos that are not among the split's photos instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing {split}_caps.txt")
    return p


def import_captions_command(args: argparse.Namespace) -> int:
    reports = import_captions(args.captions, args.out, fmt=args.fmt, split=args.split,
                              split_lists=dict(args.split_list) if args.split_list else None, images=args.images,
                              per_image=args.per_image, fewer=args.fewer, ignore_extra=args.ignore_extra,
                              overwrite=args.overwrite)
    for r in reports:
        notes = [f"{r.trimmed} photos had more than {r.per_image} (first {r.per_image} kept)" if r.trimmed else "",
                 f"{r.repeated} photos had fewer (repeated)" if r.repeated else "",
                 f"captions of {r.extra} other photos left out" if r.extra else "",
                 f"captions of {r.unlisted} photos in no split list left out" if r.unlisted else "",
                 f"wrote {r.split}_ids.txt" if r.wrote_ids else f"in the order of {r.split}_ids.txt"]
        print(f"{args.out}/{r.split}_caps.txt: {r.photos} photos x {r.per_image} captions; "
              + "; ".join(n for n in notes if n))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), import_captions_command, argv, interrupted="interrupted: nothing was written")


if __name__ == "__main__":
    exit_with(main)
