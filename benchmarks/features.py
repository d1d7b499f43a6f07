"""Throughput and peak memory of ``python -m hsc_pyg.features``: real photos, and many synthetic ones.

    python benchmarks/features.py --out benchmarks/results/features.json \\
        [--real ../shared/data/flickr8k_mini_precomp/images] [--synthetic 1000 10000] [--synthetic_size 64] \\
        [--stand_in]

``--stand_in`` runs the synthetic photos through the same command line with a stand-in backbone (a 1 x 1
convolution from RGB to 1,280 channels, registered in the child process) instead of EfficientNet-Lite0: it measures
the extraction machinery (decoding, memory-mapped writes, resume state) at 10,000 photos when the CPU cannot afford
10,000 passes of the real network. Its figures are labelled as such in the JSON.

Each run is the real command in a fresh process; its peak resident memory is the kernel's ``ru_maxrss`` for that
process (``os.wait4``), its time the wall clock from start to exit (torch import and model load included), and its
CPU time user + system. Synthetic photos are small random JPEGs written into a temporary folder that is deleted
afterwards (the features file too). On a shared machine wall time depends on the load: the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model  # noqa: E402  (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic(folder: Path, count: int) -> None:
    """``count`` 64 x 48 JPEGs: a random background colour and a random rectangle (about 2 KB each)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (64, 48), tuple(int(c) for c in rng.integers(0, 256, 3)))
        x0, y0 = rng.integers(0, 32), rng.integers(0, 24)
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + 24, y0 + 16], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(folder / f"synthetic_{i:06d}.jpg", quality=85)


STAND_IN = """
import sys, torch
from hsc_pyg.features import Backbone, register_backbone
from hsc_pyg.cli.features import main

@register_backbone("stand_in")
class StandIn(Backbone):
    dim = 1280
    def __init__(self, pretrained=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1280, 1)
    def forward(self, photos):
        return self.conv(photos)

sys.exit(main(sys.argv[1:] + ["--backbone", "stand_in"]))
"""


def run(images: Path, out: Path, size: int, batch_size: int, stand_in: bool = False) -> dict:
    entry = ["-c", STAND_IN] if stand_in else ["-m", "hsc_pyg.features"]
    command = [sys.executable, *entry, "--images", str(images), "--out", str(out), "--split", "test",
               "--size", str(size), "--batch_size", str(batch_size), "--device", "cpu", "--no_progress"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark run failed: {stderr.strip()}")
    shape = list(np.load(out / "test_ims.npy", mmap_mode="r").shape)
    return dict(photos=shape[0], size=size, batch_size=batch_size, shape=shape, wall_s=round(seconds, 1),
                photos_per_s=round(shape[0] / seconds, 2), cpu_user_s=round(usage.ru_utime, 1),
                cpu_system_s=round(usage.ru_stime, 1), peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
                features_mb=round((out / "test_ims.npy").stat().st_size / 2**20, 1),
                load_average_before=[round(x, 2) for x in load_before],
                load_average_after=[round(x, 2) for x in os.getloadavg()], stdout=stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/features.json")
    p.add_argument("--real", default=str(ROOT.parent / "shared" / "data" / "flickr8k_mini_precomp" / "images"),
                   help="folder of real photos, extracted at --size 448 (skipped when absent)")
    p.add_argument("--synthetic", type=int, nargs="*", default=[1000, 10000], help="synthetic photo counts")
    p.add_argument("--synthetic_size", type=int, default=64, help="--size for the synthetic runs")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--stand_in", action="store_true", help="synthetic runs with the stand-in backbone (see above)")
    args = p.parse_args()
    results = dict(cpu=cpu_model(), cpus_available=len(os.sched_getaffinity(0)), python=platform.python_version(),
                   command="python -m hsc_pyg.features --images DIR --out DIR --split test --size S --batch_size B "
                           "--device cpu --no_progress", runs=[])
    with tempfile.TemporaryDirectory(prefix="hsc_features_bench_") as tmp:
        tmp = Path(tmp)
        if Path(args.real).is_dir():
            results["runs"].append(dict(photos_kind=f"real: {args.real}",
                                        **run(Path(args.real), tmp / "real", 448, args.batch_size)))
            print(json.dumps(results["runs"][-1]), flush=True)
            shutil.rmtree(tmp / "real")
        for count in args.synthetic:
            write_synthetic(tmp / f"photos_{count}", count)
            kind = "synthetic 64 x 48 JPEG" + (", stand-in backbone (1x1 conv, D=1280)" if args.stand_in else "")
            results["runs"].append(dict(photos_kind=kind, **run(tmp / f"photos_{count}", tmp / f"out_{count}",
                                                                args.synthetic_size, args.batch_size, args.stand_in)))
            print(json.dumps(results["runs"][-1]), flush=True)
            shutil.rmtree(tmp / f"photos_{count}")
            shutil.rmtree(tmp / f"out_{count}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
