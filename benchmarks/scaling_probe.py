"""The input scaling's effect, measured cheaply: the Flickr8k-mini photos' features made both ways (``--normalize
imagenet``, the flawed recipe of ``flickr8k_mini_precomp``, and ``tf_lite``, the EfficientNet-Lite weights' own
``(x - 127) / 128``), each scored by the same linear probe, the ridge-regression floor of the mini set's README:

- image: the mean of its 36 cell features, standardised with the train mean and std;
- caption: its TF-IDF vector (lower-cased tokens = runs of ``[a-z0-9]``; vocabulary = every token of the train
  captions; raw counts x smooth idf ``ln((1 + n) / (1 + df)) + 1``; l2-normalised);
- fit: one row per train caption (its image's vector), ``W = (A^T A + alpha I)^-1 A^T Y``, with an unpenalised
  intercept or without; alpha in {10^0, 10^0.5, ..., 10^6} and the intercept chosen on dev rsum;
- score: cosine between ``A W`` of each image and each caption's TF-IDF vector; recalls as ``evaluate.py`` counts
  them (ties against the query).

    python benchmarks/scaling_probe.py --photos ../shared/data/flickr8k/images \\
        --mini ../shared/data/flickr8k_mini_precomp --work /tmp/scaling_probe --size 224 --shipped \\
        --out benchmarks/results/scaling_probe.json
    python benchmarks/scaling_probe.py --mini data/flickr8k_precomp --probe_only \\
        --out benchmarks/results/ridge_floor_flickr8k.json       # the floor of any precomp folder

The mini set's own split (700 / 100 / 200, its ``{split}_ids.txt``) is used; the photos are the 224 x 224 copies of
``../shared/data/flickr8k`` (the same pictures as the mini set's sources, re-encoded). ``--shipped`` also probes the
shipped ``{split}_ims.npy`` (made from the original photos with the ImageNet scaling): the README's 191.1.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from common import cpu_model  # noqa: E402  (benchmarks/common.py)

from hsc_pyg.data.precomp import read_lines  # noqa: E402
from hsc_pyg.engine.metrics import recall_metrics  # noqa: E402
from hsc_pyg.features import extract_features  # noqa: E402
from hsc_pyg.io import write_json  # noqa: E402

SPLITS = ("train", "dev", "test")
ALPHAS = [10 ** (k / 2) for k in range(13)]


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def tfidf(captions: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Split -> [captions, vocabulary] TF-IDF rows, l2-normalised (float32); vocabulary and idf from the train
    captions. For train, the sum of each image's 5 rows ([images, vocabulary]: all the fit needs, 5 x smaller)."""
    train = [tokens(c) for c in captions["train"]]
    vocab = {w: i for i, w in enumerate(sorted({w for t in train for w in t}))}
    df = np.zeros(len(vocab))
    for t in train:
        df[[vocab[w] for w in set(t)]] += 1
    idf = np.log((1 + len(train)) / (1 + df)) + 1
    out = {}
    for split, texts in captions.items():
        rows = np.zeros((len(texts) // 5 if split == "train" else len(texts), len(vocab)), np.float32)
        for n, text in enumerate(texts):
            counts = np.zeros(len(vocab))
            for w in tokens(text):
                if w in vocab:
                    counts[vocab[w]] += 1
            x = counts * idf
            rows[n // 5 if split == "train" else n] += x / max(np.linalg.norm(x), 1e-12)
        out[split] = rows
    return out


def probe(features: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> dict:
    """Ridge from the standardised mean cell to TF-IDF; alpha and intercept chosen on dev rsum."""
    pooled = {s: f.astype(np.float64).mean(axis=1) for s, f in features.items()}
    mean, std = pooled["train"].mean(axis=0), pooled["train"].std(axis=0)
    std[std == 0] = 1.0
    a = {s: (p - mean) / std for s, p in pooled.items()}
    # one row per train caption (its image's vector): the sums over an image's 5 rows, without repeating them
    x_img, y_img = a["train"], targets["train"].astype(np.float64)

    def scores(split: str, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        pred = a[split] @ w + b
        pred /= np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
        return pred @ targets[split].T

    best = None
    for intercept in (False, True):
        x_mean = x_img.mean(axis=0) if intercept else np.zeros(x_img.shape[1])
        y_mean = y_img.mean(axis=0) / 5 if intercept else np.zeros(y_img.shape[1])
        x = x_img - x_mean
        gram, cross = 5 * x.T @ x, x.T @ (y_img - 5 * y_mean)
        for alpha in ALPHAS:
            w = np.linalg.solve(gram + alpha * np.eye(len(gram)), cross)
            b = y_mean - x_mean @ w
            dev = recall_metrics(scores("dev", w, b))
            if best is None or dev["rsum"] > best["dev"]["rsum"]:
                best = dict(alpha=alpha, intercept=intercept, dev=dev, test=recall_metrics(scores("test", w, b)))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", help="the Flickr8k photos (../shared/data/flickr8k/images); not with --probe_only")
    p.add_argument("--mini", required=True, help="flickr8k_mini_precomp: its split ids and captions (or another "
                   "precomp folder with --probe_only)")
    p.add_argument("--probe_only", action="store_true", help="probe the features of --mini itself, extract nothing")
    p.add_argument("--work", help="folder for the extracted features (resumable); not with --probe_only")
    p.add_argument("--size", type=int, default=448, help="photo size for the extraction (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--normalize", nargs="*", default=["imagenet", "tf_lite"], help="scalings to extract and probe")
    p.add_argument("--shipped", action="store_true", help="also probe the shipped features")
    p.add_argument("--out", required=True, help="JSON to write")
    args = p.parse_args(argv)
    if not args.probe_only and not (args.photos and args.work):
        p.error("--photos and --work are needed to extract features (or pass --probe_only)")
    mini, work = Path(args.mini), Path(args.work)
    captions = {s: read_lines(mini / f"{s}_caps.txt") for s in SPLITS}
    targets = tfidf(captions)
    results = []
    if args.shipped or args.probe_only:
        shipped = {s: np.load(mini / f"{s}_ims.npy") for s in SPLITS}
        results.append(dict(features=f"shipped {mini.name}",
                            **probe(shipped, targets)))
        print(results[-1]["features"], "test rsum", round(results[-1]["test"]["rsum"], 1), flush=True)
    for normalize in [] if args.probe_only else args.normalize:
        folder = work / f"{args.backbone}_{normalize}_{args.size}"
        for s in SPLITS:
            extract_features(args.photos, folder, s, list_file=mini / f"{s}_ids.txt", backbone=args.backbone,
                             normalize=normalize, size=args.size, grid=6)
        feats = {s: np.load(folder / f"{s}_ims.npy") for s in SPLITS}
        results.append(dict(features=f"{args.backbone}, --normalize {normalize}, --size {args.size}, grid 6",
                            backbone=args.backbone, normalize=normalize, size=args.size, **probe(feats, targets)))
        print(results[-1]["features"], "dev rsum", round(results[-1]["dev"]["rsum"], 1), "test rsum",
              round(results[-1]["test"]["rsum"], 1), flush=True)
    write_json(args.out, dict(command=" ".join(["python", "benchmarks/scaling_probe.py", *(argv or sys.argv[1:])]),
                              cpu=cpu_model(), python=platform.python_version(), results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
