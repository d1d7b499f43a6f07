"""How bf16 pair scores change a trained model's rankings, and which ``--rescore_k`` makes them float32's again.

    python benchmarks/bf16_ranking.py --model runs/demo/checkpoint/model_best.pth --data_path data \
        --data_name synthetic_precomp --split test --out benchmarks/results/bf16_ranking_builtin.json

The split is encoded once in float32; every pair is scored in float32 and in bf16 (the two matrices of ``evaluate.py
--amp off`` and ``--amp bf16 --rescore_k 0``). Reported: the largest and mean absolute score difference; how many
ground-truth ranks (i2t: an image's best caption, t2i: a caption's image) and how many queries' top-10 lists (items
and order) differ; for each K, how many float32 top-10 items fell outside the bf16 top K (per direction, and the
queries that had one), how many pairs ``--amp bf16 --rescore_k K`` scores in float32 and whether its recall table
equals float32's. Needs a CPU
with native bf16 matrix instructions or a GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hsc_pyg import load_checkpoint  # noqa: E402
from hsc_pyg.data.precomp import PrecompSplit  # noqa: E402
from hsc_pyg.engine.device import cpu_bf16_instructions, resolve_device  # noqa: E402
from hsc_pyg.engine.scoring import encode_split, pair_scores, rescore_ranking, score_matrix  # noqa: E402
from hsc_pyg.engine.metrics import recall_metrics  # noqa: E402
from hsc_pyg.io import write_json  # noqa: E402

KS = (5, 10, 12, 15, 20, 30)


def top(scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Indices of the ``k`` best items of every query (rows: axis 1, columns: axis 0), best first, ties by index."""
    matrix = scores if axis == 1 else scores.T
    return np.argsort(-matrix, axis=1, kind="stable")[:, :k]


def misses(exact: np.ndarray, approx: np.ndarray, k: int, axis: int) -> tuple[int, int]:
    """(items of a query's float32 top 10 outside its approximate top ``k``, queries with at least one)."""
    t10, tk = top(exact, 10, axis), top(approx, k, axis)
    outside = np.array([len(set(a) - set(b)) for a, b in zip(t10.tolist(), tk.tolist())])
    return int(outside.sum()), int((outside > 0).sum())


def ground_truth_ranks(scores: np.ndarray, per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """i2t: each image's best rank among its captions; t2i: each caption's image's rank (ties against the query)."""
    n, m = scores.shape
    caps = np.arange(m)
    gt_t2i = scores[caps // per_image, caps]
    t2i = (scores > gt_t2i[None, :]).sum(0) + (scores == gt_t2i[None, :]).sum(0) - 1
    i2t = np.empty(n, dtype=np.int64)
    for i in range(n):
        own = scores[i, i * per_image:(i + 1) * per_image]
        i2t[i] = min(int((scores[i] > s).sum() + (scores[i] == s).sum() - 1) for s in own)
    return i2t, t2i


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--data_name", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="the K of --rescore_k to check")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model = load_checkpoint(args.model, map_location="cpu").to(device).eval()
    split = PrecompSplit.open(args.data_path, args.data_name, args.split)
    img, cap = encode_split(model, split, progress=False)
    seconds = {}
    start = time.perf_counter()
    exact = score_matrix(model, img, cap, progress=False)
    seconds["float32"] = time.perf_counter() - start
    start = time.perf_counter()
    bf16 = score_matrix(model, img, cap, amp="bf16", progress=False)
    seconds["bf16"] = time.perf_counter() - start
    per_image = split.per_image
    diff = np.abs(bf16 - exact)
    ranks32, ranks16 = ground_truth_ranks(exact, per_image), ground_truth_ranks(bf16, per_image)
    report: dict[str, Any] = {
        "model": args.model, "data": f"{args.data_name}/{args.split}", "images": len(img), "captions": len(cap),
        "device": str(device), "cpu_bf16_instructions": cpu_bf16_instructions() if device.type == "cpu" else None,
        "threads": torch.get_num_threads(), "seconds": seconds,
        "score_max_abs_diff": float(diff.max()), "score_mean_abs_diff": float(diff.mean()),
        "float32_score_range": [float(exact.min()), float(exact.max())],
        "ground_truth_ranks_changed": {"i2t": int((ranks32[0] != ranks16[0]).sum()), "i2t_of": len(ranks32[0]),
                                       "t2i": int((ranks32[1] != ranks16[1]).sum()), "t2i_of": len(ranks32[1])},
        "top10_lists_changed": {"i2t": int((top(exact, 10, 1) != top(bf16, 10, 1)).any(1).sum()),
                                "t2i": int((top(exact, 10, 0) != top(bf16, 10, 0)).any(1).sum())},
        "metrics_float32": recall_metrics(exact, per_image),
        "metrics_bf16": recall_metrics(bf16, per_image),
    }

    scored: list[tuple[np.ndarray, ...]] = []

    def float32_pairs(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        scored.append((rows, cols, pair_scores(model, img, cap, rows, cols)))
        return scored[-1][2]

    rescored = {}
    for k in (int(k) for k in args.ks.split(",")):
        (i2t_items, i2t_queries), (t2i_items, t2i_queries) = misses(exact, bf16, k, 1), misses(exact, bf16, k, 0)
        scored.clear()
        result = rescore_ranking(bf16, k, per_image, float32_pairs)
        rows, cols, values = (np.concatenate(parts) for parts in zip(*scored))
        metrics = result.metrics(per_image)
        rescored[str(k)] = {
            "float32_top10_items_outside_bf16_topk": {"i2t": i2t_items, "t2i": t2i_items},
            "queries_with_such_an_item": {"i2t": i2t_queries, "t2i": t2i_queries},
            "float32_pairs": result.num_float32_pairs, "fraction_of_pairs": result.num_float32_pairs / exact.size,
            "margin": result.margin,
            "rescored_scores_max_abs_diff_to_float32_matrix": float(np.abs(values - exact[rows, cols]).max()),
            "recall_table_equals_float32": metrics == report["metrics_float32"],
            "metrics": metrics,
        }
    report["rescore_k"] = rescored
    if args.out:
        write_json(args.out, report, indent=2)
    print(_summary(report))
    return 0


def _summary(report: dict[str, Any]) -> str:
    lines = [f"{report['data']} ({report['images']} x {report['captions']}): bf16 - float32 max abs "
             f"{report['score_max_abs_diff']:.3g}, mean {report['score_mean_abs_diff']:.3g}; ground-truth ranks changed "
             f"i2t {report['ground_truth_ranks_changed']['i2t']}, t2i {report['ground_truth_ranks_changed']['t2i']}; "
             f"rsum float32 {report['metrics_float32']['rsum']:.1f}, bf16 {report['metrics_bf16']['rsum']:.1f}"]
    for k, row in report["rescore_k"].items():
        out = row["float32_top10_items_outside_bf16_topk"]
        lines.append(f"  K = {k:>3}: float32 top-10 items outside the bf16 top K: i2t {out['i2t']}, t2i {out['t2i']}; "
                     f"recall table equal: {row['recall_table_equals_float32']}; "
                     f"{100 * row['fraction_of_pairs']:.1f}% of the pairs in float32")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
