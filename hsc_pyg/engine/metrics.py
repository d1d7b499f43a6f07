"""Retrieval metrics of a score matrix (MODEL.md §4), vectorised over queries.

A score matrix ``sims [N, M]`` holds the score of image ``i`` and caption ``j`` at ``[i, j]``, with ``M = per_image * N``
and caption ``j`` belonging to image ``j // per_image``. Ranks are 0-based.

- i2t: image ``i``'s rank is the best position of any of its captions in row ``i`` sorted by descending score.
- t2i: caption ``j``'s rank is the position of its image in column ``j`` sorted by descending score.

Ties count against the query: an item that does not match the query and scores *equal to* the matching item is placed
ahead of it. So rank = the number of non-matching items whose score is ``>=`` the best matching score. (For i2t, the
image's other captions never push its best caption down: they match too.) A NaN score is an error.

Recalls are ``R@K = 100 * mean(rank < K)`` for K = 1, 5, 10; ``medr = floor(median(rank)) + 1``;
``meanr = mean(rank) + 1``; ``rsum`` = the six recalls summed.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DataError

RECALLS = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")
RECALL_KEYS = tuple(f"r{k}_{d}" for d in DIRECTIONS for k in RECALLS)
METRIC_KEYS = tuple(f"{name}_{d}" for d in DIRECTIONS for name in ("r1", "r5", "r10", "medr", "meanr")) + ("rsum",)
#: Images per fold of the COCO 1K protocol (five folds of COCO ``testall``).
FOLD_SIZE = 1000
#: Rows compared at once: bounds the temporary ``[rows, M]`` boolean of the rank counts (64 MiB for M = 25,000 ...).
_ROW_BLOCK = 2048


def _as_matrix(sims: Any, per_image: int) -> np.ndarray:
    """``sims`` (numpy or torch) as a 2-D numpy array whose shape fits ``per_image``; float16 becomes float32."""
    if hasattr(sims, "detach"):
        sims = sims.detach().cpu().float().numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise DataError(f"a score matrix must be 2-D [images, captions], found shape {list(sims.shape)}")
    if sims.dtype.kind != "f":
        raise DataError(f"a score matrix must hold floats, found dtype {sims.dtype}")
    if sims.dtype.itemsize < 4:
        sims = sims.astype(np.float32)  # float16 comparisons are exact in float32 too, and faster
    if per_image < 1:
        raise ConfigError(f"per_image must be at least 1, found {per_image}")
    n, m = sims.shape
    if n == 0 or m != per_image * n:
        raise DataError(f"a score matrix of shape [{n}, {m}] does not fit {per_image} captions per image: expected "
                        f"[{n}, {per_image * n}] (caption j belongs to image j // {per_image})")
    nan = np.isnan(sims)
    if nan.any():
        i, j = np.argwhere(nan)[0]
        raise DataError(f"the score matrix holds {int(nan.sum())} NaN score(s) (first at image {i}, caption {j}); "
                        "the model or the saved matrix is broken")
    return sims


def i2t_ranks(sims: Any, per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Image-to-text ranks.

    Args:
        sims: scores ``[N, M]``, ``M = per_image * N`` (numpy or torch).
        per_image: captions per image; image ``i`` owns captions ``per_image * i .. per_image * i + per_image - 1``.

    Returns:
        ``ranks [N]`` int64: the number of other images' captions scoring ``>=`` the best of image ``i``'s captions
        (ties count against the query); ``top1 [N]`` int64: the best-scoring caption of each row (the first on a tie).
    """
    sims = _as_matrix(sims, per_image)
    n, m = sims.shape
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, _ROW_BLOCK):
        rows = sims[start:start + _ROW_BLOCK]
        own = rows.reshape(len(rows), -1, per_image)[np.arange(len(rows)), np.arange(start, start + len(rows))]
        best = own.max(axis=1)  # [rows]
        at_least = (rows >= best[:, None]).sum(axis=1)
        ranks[start:start + len(rows)] = at_least - (own >= best[:, None]).sum(axis=1)
    return ranks, sims.argmax(axis=1).astype(np.int64)


def t2i_ranks(sims: Any, per_image: int = 5) -> np.ndarray:
    """Text-to-image ranks ``[M]`` int64: the number of other images scoring ``>=`` caption ``j``'s image
    ``j // per_image`` in column ``j`` (ties count against the query). ``sims`` as in :func:`i2t_ranks`."""
    sims = _as_matrix(sims, per_image)
    n, m = sims.shape
    ranks = np.empty(m, dtype=np.int64)
    for start in range(0, n, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, n)
        cols = slice(start * per_image, stop * per_image)
        target = sims[np.arange(start, stop).repeat(per_image), np.arange(cols.start, cols.stop)]  # [cols]
        ranks[cols] = (sims[:, cols] >= target[None, :]).sum(axis=0) - 1
    return ranks


def _direction(ranks: np.ndarray, name: str) -> dict[str, float]:
    out = {f"r{k}_{name}": float(100.0 * np.mean(ranks < k)) for k in RECALLS}
    out[f"medr_{name}"] = float(np.floor(np.median(ranks)) + 1)
    out[f"meanr_{name}"] = float(np.mean(ranks) + 1)
    return out


def with_rsum(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with ``rsum`` set to the sum of its six recalls."""
    return {**metrics, "rsum": float(sum(metrics[key] for key in RECALL_KEYS))}


def recall_metrics(sims: Any, per_image: int = 5, sims_t2i: Any = None) -> dict[str, float]:
    """R@1/5/10, medr and meanr in both directions and rsum (keys :data:`METRIC_KEYS`), as Python floats.

    Args:
        sims: scores ``[N, per_image * N]`` (numpy or torch).
        per_image: captions per image.
        sims_t2i: when given, the text-to-image metrics are read from this matrix (same shape) instead of ``sims``
            (re-ranking keeps one matrix per direction).
    """
    metrics = _direction(i2t_ranks(sims, per_image)[0], "i2t")
    metrics.update(_direction(t2i_ranks(sims if sims_t2i is None else sims_t2i, per_image), "t2i"))
    return with_rsum(metrics)


def average_metrics(per_fold: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each metric over folds; ``rsum`` = the sum of the averaged recalls (= the mean of the rsums);
    ``folds`` = the per-fold dicts."""
    if not per_fold:
        raise ConfigError("average_metrics needs at least one fold")
    keys = [k for k in METRIC_KEYS if k != "rsum"]
    averaged = {k: float(np.mean([fold[k] for fold in per_fold])) for k in keys}
    return {**with_rsum(averaged), "folds": [dict(fold) for fold in per_fold]}


def fold_slices(num_images: int, per_image: int = 5, fold_size: int = FOLD_SIZE) -> list[tuple[slice, slice]]:
    """``(image rows, caption columns)`` of each fold's diagonal block; ConfigError unless ``num_images`` is a
    multiple of ``fold_size``."""
    if fold_size < 1 or num_images < fold_size or num_images % fold_size:
        raise ConfigError(f"--fold5 splits the images into folds of {fold_size}, but found {num_images} images; "
                          f"it needs COCO testall (5,000 images): use --split testall, or drop --fold5")
    return [(slice(f, f + fold_size), slice(f * per_image, (f + fold_size) * per_image))
            for f in range(0, num_images, fold_size)]


def protocol_metrics(per_block: Sequence[dict[str, Any]], fold5: bool) -> dict[str, Any]:
    """A protocol's metrics from those of its scored blocks: with ``fold5`` (COCO 1K) their average over the folds
    (:func:`average_metrics`, the per-fold dicts under ``folds``), else the one block's."""
    return average_metrics(per_block) if fold5 else per_block[0]


def format_table(metrics: dict[str, Any], title: str | None = None) -> str:
    """A plain-text table: one line per direction (R@1, R@5, R@10, medr, meanr), then rsum."""
    header = f"{'':<5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medr':>6} {'meanr':>7}"
    lines = [title] if title else []
    lines.append(header)
    for d in DIRECTIONS:
        lines.append(f"{d:<5} {metrics[f'r1_{d}']:6.1f} {metrics[f'r5_{d}']:6.1f} {metrics[f'r10_{d}']:6.1f} "
                     f"{metrics[f'medr_{d}']:6.1f} {metrics[f'meanr_{d}']:7.1f}")
    lines.append(f"rsum  {metrics['rsum']:.1f}")
    if metrics.get("folds"):
        lines.append("fold rsums  " + "  ".join(f"{fold['rsum']:.1f}" for fold in metrics["folds"]))
    return "\n".join(lines)
