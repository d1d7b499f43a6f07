"""Search latency on a 5,000-image gallery: the time to answer one text query once the gallery is cached.

    python benchmarks/search_latency.py --model runs/f8k/checkpoint/model_best.pth --out benchmarks/results/search_latency.json

The gallery is ``--images`` images (default 5,000) made from the Flickr8k-mini test features (200 real photos, 36 x
1,280 regions) cycled, each copy with a small different noise (so no two rows are equal), written once as a precomp
split in a temporary folder with the real test captions cycled. Then, through the library (``hsc_pyg.search``):
the gallery is encoded and cached (timed: the cold start), opened again from the cache (timed: a warm start), and
``--queries`` real test captions are searched one at a time with ``k = 5`` and a first-stage shortlist of ``--shortlist``
(default 50) scored exactly. Reported: the build and open times, and the median, 90th percentile and maximum time per
query (tokenising, encoding the query, the first-stage cosine over the gallery, the exact scores of the shortlist and
the sort), with the CPU, threads and versions.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as cm  # noqa: E402

SOURCE = cm.ROOT.parent / "shared" / "data" / "flickr8k_mini_precomp"


def write_gallery(folder: Path, images: int, seed: int = 0) -> list[str]:
    """``folder/test_ims.npy`` (float32, ``images`` rows) and ``test_caps.txt``; returns the source captions."""
    folder.mkdir(parents=True)
    source = np.load(SOURCE / "test_ims.npy", mmap_mode="r")
    captions = SOURCE.joinpath("test_caps.txt").read_text().splitlines()
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(folder / "test_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(images, *source.shape[1:]))
    for i0 in range(0, images, len(source)):
        rows = min(len(source), images - i0)
        noise = rng.normal(0.0, 0.01, size=(rows, *source.shape[1:])).astype(np.float32)
        out[i0:i0 + rows] = np.maximum(source[:rows] + noise, 0.0)
    out.flush()
    del out
    per = len(captions) // len(source)
    folder.joinpath("test_caps.txt").write_text(
        "\n".join(captions[(i % len(source)) * per + j] for i in range(images) for j in range(per)) + "\n")
    return captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model trained on Flickr8k-mini (its vocabulary is used)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--shortlist", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hsc_pyg import load_checkpoint
    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.search import open_gallery, search_text

    model = load_checkpoint(args.model, map_location="cpu").eval()
    root = Path(tempfile.mkdtemp(prefix="search_latency_"))
    try:
        captions = write_gallery(root / "gallery_precomp", args.images)
        split = PrecompSplit.open(root, "gallery_precomp", "test")
        t = time.perf_counter()
        gallery, built = open_gallery(model, split, cache=root / "cache")
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        gallery, built_again = open_gallery(model, split, cache=root / "cache")
        open_s = time.perf_counter() - t
        assert built and not built_again
        queries = captions[::max(1, len(captions) // args.queries)][:args.queries]
        search_text(model, gallery, queries[0], k=5, shortlist=args.shortlist)    # warm-up
        times = []
        for query in queries:
            t = time.perf_counter()
            search_text(model, gallery, query, k=5, shortlist=args.shortlist)
            times.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    times.sort()
    report = {
        "environment": cm.environment("cpu", "fp32"), "threads": args.threads, "model": args.model,
        "gallery_images": args.images, "shortlist": args.shortlist, "k": 5, "queries": len(times),
        "cache_build_s": build_s, "cache_open_s": open_s,
        "query_s": {"median": times[len(times) // 2], "p90": times[int(0.9 * (len(times) - 1))], "max": times[-1],
                    "mean": sum(times) / len(times)},
    }
    cm.publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
