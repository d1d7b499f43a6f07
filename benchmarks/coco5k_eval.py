"""A COCO-5K-sized evaluation end to end through the real evaluation code, with its wall time and peak host memory.

    python benchmarks/coco5k_eval.py --out benchmarks/results/coco5k.json               # `make bench-coco5k`
    python benchmarks/coco5k_eval.py --scale 0.1 --out /tmp/coco500.json                 # 500 x 2,500 (CPU-sized)
    python benchmarks/coco5k_eval.py --scale 1 --device cuda --amp bf16                   # the real size, on a GPU
    python benchmarks/coco5k_eval.py --scale 1 --rerank_k 20 --exact_fraction 0.1         # re-ranking vs exact (CPU)

COCO 5K (``testall``) is 5,000 images x 25,000 captions = 125M exact pair scores. This writes a synthetic split of
that shape in the SCAN precomp format (``testall_ims.npy`` float32 ``[N, 36, 2048]``, written in chunks;
``testall_caps.txt`` from the real COCO test captions when ``../shared`` has them, cycled to 5 per image), builds a
full-size model with random weights, and runs ``hsc_pyg.engine.scoring``: :func:`encode_split` (encodings kept on
the host in float16 by default), :func:`score_matrix` (the float32 ``[N, 5N]`` host matrix) and the recall metrics,
timing each stage and sampling the process's resident memory every 2 ms (anonymous memory separately from the
memory-mapped feature file).

``--scale s`` evaluates ``5000 s`` images (default ``auto``: 1 on a GPU, 0.1 on the CPU, where the full size takes
about 1.5 hours on 2 cores). When
``s < 1`` the JSON also holds an extrapolation to the full size, labelled as such: encoding linear in items, scoring
linear in pairs (the rate measured here), memory = what was measured + the analytic growth of the encodings and the
score matrix.

``--rerank_k K`` adds retrieve-then-rerank (:func:`hsc_pyg.engine.scoring.rerank`: the first-stage cosine of all
pairs, then each query's top K scored exactly, both directions) on the same encodings, timed the same way.
``--exact_fraction f`` scores exactly only the first ``f`` of the images against the first ``f`` of the captions (the
full-size exact scoring takes about 1.5 hours on 2 CPU cores) and extrapolates that stage to all pairs (scoring is
linear in pairs), labelled as such, so that one run compares re-ranking at the full size with exact scoring.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common as cm  # noqa: E402
from hsc_pyg.config import SCORE_CHUNK_MB  # noqa: E402

FULL_IMAGES = 5000
PER_IMAGE = 5
COCO_CAPTIONS = cm.ROOT.parent / "shared" / "data" / "scan_text" / "coco_test_caps.txt"
COCO_VOCAB = cm.ROOT.parent / "shared" / "data" / "scan_text" / "coco_precomp_vocab.json"


def status_kb() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class Sampler:
    """Peak VmRSS and RssAnon (MiB) of this process over a section, sampled every 2 ms."""

    def __init__(self):
        self.peak_rss = self.peak_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.002)

    def _sample(self):
        s = status_kb()
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0) / 1024)
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0) / 1024)

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def write_split(folder: Path, n_img: int, img_dim: int = 2048, regions: int = 36, seed: int = 0) -> tuple[list[str], str]:
    """``folder/testall_ims.npy`` and ``testall_caps.txt``; returns the captions and where they came from."""
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.lib.format.open_memmap(folder / "testall_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(n_img, regions, img_dim))
    rng = np.random.default_rng(seed)
    for i0 in range(0, n_img, 250):
        i1 = min(n_img, i0 + 250)
        ims[i0:i1] = np.maximum(rng.standard_normal((i1 - i0, regions, img_dim), dtype=np.float32), 0) * 2.0
    ims.flush()
    del ims
    if COCO_CAPTIONS.is_file():
        source = [line for line in COCO_CAPTIONS.read_text().split("\n") if line.strip()]
        where = f"real COCO test captions ({len(source)}), cycled"
    else:
        words = ["a", "man", "woman", "dog", "cat", "on", "the", "with", "red", "table", "street", "sitting", "of"]
        source = [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(8, 16, size=5000)]
        where = "synthetic word strings (shared captions absent)"
    captions = [source[k % len(source)] for k in range(n_img * PER_IMAGE)]
    (folder / "testall_caps.txt").write_text("\n".join(captions) + "\n")
    return captions, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="write the JSON here too")
    parser.add_argument("--scale", default="auto",
                        help="fraction of the 5,000 images (captions follow); auto: 1 on a GPU, 0.1 on the CPU (the "
                             "full size takes about 1.5 hours on 2 CPU cores)")
    parser.add_argument("--preset", default="sgraf_saf", choices=cm.PRESETS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--store_dtype", default="float16", choices=("float16", "float32"),
                        help="dtype of the kept encodings (host memory)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--chunk_mb", type=int, default=SCORE_CHUNK_MB,
                        help="memory bound of one block of the pair scorer, in MiB (default: %(default)s)")
    parser.add_argument("--data_dir", default="", help="where to write the synthetic split (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic split")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--encode_only", action="store_true",
                        help="measure the encoding stage only (its time and peak memory), no scoring")
    parser.add_argument("--rerank_k", type=int, default=0, metavar="K",
                        help="also time retrieve-then-rerank with K exact scores per query (0: no)")
    parser.add_argument("--exact_fraction", type=float, default=1.0, metavar="F",
                        help="score exactly only the first F of the images x the first F of the captions and "
                             "extrapolate the exact stage to all pairs (default: %(default)s = all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.data.vocab import Vocabulary, build_vocab
    from hsc_pyg.engine import scoring as ev
    from hsc_pyg.engine.metrics import recall_metrics
    from hsc_pyg.io import write_text

    device = ev.resolve_device(args.device)
    args.scale = (1.0 if device.type == "cuda" else 0.1) if args.scale == "auto" else float(args.scale)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    n_img = max(10, int(round(FULL_IMAGES * args.scale)))
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="coco5k_"))
    report: dict[str, Any] = {"environment": cm.environment(str(device), args.amp if args.amp != "off" else "fp32"),
                              "preset": args.preset, "scale": args.scale, "images": n_img,
                              "captions": n_img * PER_IMAGE, "pairs": n_img * n_img * PER_IMAGE,
                              "store_dtype": args.store_dtype, "amp": args.amp}
    t0 = time.perf_counter()
    captions, where = write_split(root / "coco5k_precomp", n_img)
    report["write_split_s"] = time.perf_counter() - t0
    report["caption_source"] = where
    try:
        vocab = Vocabulary.load(COCO_VOCAB) if COCO_VOCAB.is_file() else build_vocab(captions, threshold=1)
        model = build_model_for(args.preset, len(vocab), device)
        model.vocab = vocab
        split = PrecompSplit.open(root, "coco5k_precomp", "testall")
        base = status_kb()
        report["rss_before_mb"] = base.get("VmRSS", 0) / 1024
        stages: dict[str, Any] = {}
        report["stages"] = stages

        def save_partial() -> None:   # so that a run stopped by a time limit still leaves what it measured
            if args.out:
                write_text(args.out, json.dumps(report, indent=2, default=float) + "\n")

        store = getattr(torch, args.store_dtype)
        with Sampler() as whole:
            with Sampler() as s:
                t = time.perf_counter()
                img_enc, cap_enc = ev.encode_split(model, split, vocab, batch_size=args.batch_size, device=device,
                                                   store_dtype=store, store_device="cpu", amp=args.amp, progress=False)
                cm.sync(str(device))
                stages["encode"] = {"wall_s": time.perf_counter() - t, "peak_rss_mb": s.peak_rss,
                                    "peak_anon_mb": s.peak_anon}
            save_partial()
            enc_bytes = {"images": img_enc.regions.numel() * img_enc.regions.element_size()
                         + img_enc.glo.numel() * img_enc.glo.element_size(), "captions": cap_enc.nbytes}
            if args.rerank_k and not args.encode_only:
                with Sampler() as s:
                    t = time.perf_counter()
                    reranked = ev.rerank(model, img_enc, cap_enc, k=args.rerank_k, chunk_mb=args.chunk_mb,
                                         amp=args.amp)
                    cm.sync(str(device))
                    stages["rerank"] = {"k": args.rerank_k, "wall_s": time.perf_counter() - t,
                                        "peak_rss_mb": s.peak_rss, "peak_anon_mb": s.peak_anon,
                                        "exact_pairs": reranked.num_exact_pairs,
                                        "fraction_of_pairs": reranked.num_exact_pairs / report["pairs"]}
                del reranked
                save_partial()
            if not args.encode_only:
                rows, cols = int(round(n_img * args.exact_fraction)), int(round(n_img * PER_IMAGE * args.exact_fraction))
                with Sampler() as s:
                    t = time.perf_counter()
                    sims = ev.score_matrix(model, img_enc[:rows], cap_enc[:cols], chunk_mb=args.chunk_mb,
                                           amp=args.amp, progress=False)
                    cm.sync(str(device))
                    stages["score"] = {"wall_s": time.perf_counter() - t, "peak_rss_mb": s.peak_rss,
                                       "peak_anon_mb": s.peak_anon, "pairs": sims.size,
                                       "pairs_per_s": sims.size / (time.perf_counter() - t)}
                if args.exact_fraction < 1:
                    pairs = report["pairs"]
                    stages["score"]["extrapolated_wall_s_all_pairs"] = stages["score"]["wall_s"] * pairs / sims.size
                    stages["score"]["label"] = (f"measured on {rows} x {cols} pairs; extrapolated_wall_s_all_pairs "
                                                f"is that time x {pairs / sims.size:g} (linear in pairs), not measured")
                with Sampler() as s:
                    t = time.perf_counter()
                    metrics = recall_metrics(sims, PER_IMAGE)
                    stages["metrics"] = {"wall_s": time.perf_counter() - t, "peak_rss_mb": s.peak_rss}
        report["stages"] = stages
        report["wall_s"] = sum(v["wall_s"] for v in stages.values())
        report["peak_rss_mb"] = whole.peak_rss
        report["peak_anon_mb"] = whole.peak_anon
        report["process_maxrss_mb"] = status_kb().get("VmHWM", 0) / 1024
        report["kept_bytes_mb"] = {"image_encodings": enc_bytes["images"] / 2**20,
                                   "caption_encodings": enc_bytes["captions"] / 2**20}
        if not args.encode_only:
            report["kept_bytes_mb"]["score_matrix"] = sims.nbytes / 2**20
            report["metrics_random_weights"] = {k: round(v, 3) for k, v in metrics.items()}
            if args.scale < 1 and args.exact_fraction == 1:
                report["extrapolated_to_5000x25000"] = extrapolate(report, n_img)
            if args.rerank_k:
                exact_s = stages["score"].get("extrapolated_wall_s_all_pairs", stages["score"]["wall_s"])
                report["rerank_speedup_over_exact"] = {
                    "scoring_only": exact_s / stages["rerank"]["wall_s"],
                    "with_encoding": (stages["encode"]["wall_s"] + exact_s)
                    / (stages["encode"]["wall_s"] + stages["rerank"]["wall_s"])}
    finally:
        if not args.keep and not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(report, indent=2, default=float)
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return 0


def build_model_for(preset: str, vocab_size: int, device):
    model = cm.make_model(preset)
    if model.config.vocab_size != vocab_size:
        import dataclasses

        from hsc_pyg.nn.model import build_model

        torch.manual_seed(0)
        model = build_model(dataclasses.replace(model.config, vocab_size=vocab_size))
    return model.to(device).eval()


def extrapolate(report: dict[str, Any], n_img: int) -> dict[str, Any]:
    """Full size from this run: linear in items (encoding) and in pairs (scoring); memory = measured peak of
    anonymous memory + growth of the kept encodings (linear) and of the score matrix (quadratic)."""
    f = FULL_IMAGES / n_img
    st = report["stages"]
    kept = report["kept_bytes_mb"]
    grow = (kept["image_encodings"] + kept["caption_encodings"]) * (f - 1) + kept["score_matrix"] * (f * f - 1)
    encode_s = st["encode"]["wall_s"] * f
    score_s = st["score"]["wall_s"] * f * f
    return {"label": f"EXTRAPOLATED from the {n_img}-image run (x{f:g} items, x{f * f:g} pairs), not measured",
            "encode_s": encode_s, "score_s": score_s, "wall_s": encode_s + score_s + st["metrics"]["wall_s"] * f * f,
            "score_matrix_mb": kept["score_matrix"] * f * f,
            "encodings_mb": (kept["image_encodings"] + kept["caption_encodings"]) * f,
            "peak_anon_mb": report["peak_anon_mb"] + grow,
            "note": "peak RSS also counts the memory-mapped 1.47 GB feature file's pages while they are resident; "
                    "they are file-backed (the kernel can drop them) and not counted in peak_anon_mb"}


if __name__ == "__main__":
    sys.exit(main())
