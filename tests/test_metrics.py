"""Retrieval metrics against a plain one-query-at-a-time reference written from MODEL.md §4."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsc_pyg.engine.metrics import (METRIC_KEYS, RECALL_KEYS, format_table, i2t_ranks,
                                    recall_metrics, t2i_ranks)
from hsc_pyg.errors import ConfigError, DataError
from reference_protocol import fold5_metrics  # noqa: E402  (tests/reference_protocol.py)


# ---- reference: one query at a time, ties broken against the query -------------------------------------------------
def reference_i2t_rank(row: np.ndarray, positives: list[int]) -> int:
    """Sort the row by descending score with every tie resolved against the query (a non-matching item before a
    matching one of equal score); the rank is the position of the first matching item."""
    matching = set(positives)
    order = sorted(range(len(row)), key=lambda j: (-row[j], j in matching))
    return next(pos for pos, j in enumerate(order) if j in matching)


def reference_metrics(sims: np.ndarray, per_image: int) -> dict[str, float]:
    n, m = sims.shape
    i2t = [reference_i2t_rank(sims[i], list(range(per_image * i, per_image * i + per_image))) for i in range(n)]
    t2i = [reference_i2t_rank(sims[:, j], [j // per_image]) for j in range(m)]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"r{k}_{name}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        ordered = sorted(ranks)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        out[f"medr_{name}"] = math.floor(median) + 1
        out[f"meanr_{name}"] = sum(ranks) / len(ranks) + 1
    out["rsum"] = sum(out[k] for k in RECALL_KEYS)
    return out


def assert_metrics_equal(got: dict, want: dict) -> None:
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


# ---- ranks ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [1, 5])
@pytest.mark.parametrize("seed", range(4))
def test_random_matrices_match_the_reference(per_image, seed):
    rng = np.random.default_rng(seed)
    n = 37
    sims = rng.standard_normal((n, per_image * n)).astype(np.float32)
    # make the task non-trivial: matching pairs score higher on average, so ranks spread over 0..N
    sims += 1.5 * np.kron(np.eye(n), np.ones((1, per_image))).astype(np.float32)
    assert_metrics_equal(recall_metrics(sims, per_image), reference_metrics(sims, per_image))


@pytest.mark.parametrize("seed", range(4))
def test_ties_count_against_the_query(seed):
    # scores from 4 levels: nearly every comparison is a tie
    rng = np.random.default_rng(100 + seed)
    n = 23
    sims = rng.integers(0, 4, size=(n, 5 * n)).astype(np.float32)
    assert_metrics_equal(recall_metrics(sims), reference_metrics(sims, 5))
    i2t = i2t_ranks(sims)[0]
    t2i = t2i_ranks(sims)
    assert list(i2t) == [reference_i2t_rank(sims[i], list(range(5 * i, 5 * i + 5))) for i in range(n)]
    assert list(t2i) == [reference_i2t_rank(sims[:, j], [j // 5]) for j in range(5 * n)]


def test_tie_examples_by_hand():
    # 2 images, 2 captions each: caption 0, 1 -> image 0; caption 2, 3 -> image 1
    sims = np.array([[0.5, 0.5, 0.5, 0.1],    # image 0: its best (0.5) ties with caption 2 -> rank 1
                     [0.9, 0.2, 0.9, 0.9]],   # image 1: its captions tie with each other and with caption 0 -> 1
                    dtype=np.float32)
    ranks, top1 = i2t_ranks(sims, per_image=2)
    assert ranks.tolist() == [1, 1]
    assert top1.tolist() == [0, 0]
    # columns: caption 0 (image 0: 0.5 vs 0.9) -> 1; caption 1 (0.5 vs 0.2) -> 0; caption 2 (image 1: 0.9 vs 0.5) -> 0;
    # caption 3 (0.9 vs 0.1) -> 0
    assert t2i_ranks(sims, per_image=2).tolist() == [1, 0, 0, 0]
    # an exact tie between an image's own captions alone does not cost it anything
    alone = np.array([[0.7, 0.7, 0.1, 0.1], [0.0, 0.0, 0.3, 0.3]], dtype=np.float32)
    assert i2t_ranks(alone, per_image=2)[0].tolist() == [0, 0]
    # a constant matrix: every query is last among ties
    flat = np.zeros((3, 15), dtype=np.float32)
    assert i2t_ranks(flat)[0].tolist() == [10, 10, 10]
    assert t2i_ranks(flat).tolist() == [2] * 15


def test_best_of_five_uses_the_best_caption():
    n = 4
    sims = np.zeros((n, 5 * n), dtype=np.float32)
    sims[:, :] = np.linspace(0, 1, 5 * n, dtype=np.float32)[None, ::-1]  # column 0 highest everywhere
    # image 2's captions are columns 10..14; column 10 is at position 10 in every row
    ranks, top1 = i2t_ranks(sims)
    assert ranks.tolist() == [0, 5, 10, 15]
    assert top1.tolist() == [0, 0, 0, 0]


def test_perfect_diagonal_gives_100_everywhere():
    rng = np.random.default_rng(0)
    n = 50
    sims = rng.uniform(0, 0.5, size=(n, 5 * n)).astype(np.float32)
    sims[np.arange(5 * n) // 5, np.arange(5 * n)] = 1.0
    metrics = recall_metrics(sims)
    for key in RECALL_KEYS:
        assert metrics[key] == 100.0
    assert metrics["rsum"] == 600.0
    assert metrics["medr_i2t"] == metrics["medr_t2i"] == 1.0
    assert metrics["meanr_i2t"] == metrics["meanr_t2i"] == 1.0


def test_medr_floors_an_even_median():
    # 2 images, 1 caption each; i2t ranks 0 and 1 -> median 0.5 -> floor 0 -> medr 1
    sims = np.array([[1.0, 0.0], [2.0, 0.5]], dtype=np.float32)
    metrics = recall_metrics(sims, per_image=1)
    assert i2t_ranks(sims, per_image=1)[0].tolist() == [0, 1]
    assert metrics["medr_i2t"] == 1.0
    assert metrics["meanr_i2t"] == 1.5


def test_torch_float16_and_float64_inputs_agree_with_float32():
    rng = np.random.default_rng(1)
    sims = rng.standard_normal((20, 100)).astype(np.float16).astype(np.float32)
    want = recall_metrics(sims)
    assert recall_metrics(sims.astype(np.float16)) == want
    assert recall_metrics(sims.astype(np.float64)) == want
    assert recall_metrics(torch.from_numpy(sims)) == want


def test_t2i_matrix_can_differ_from_the_i2t_one():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 10, 50)).astype(np.float32)
    mixed = recall_metrics(a, sims_t2i=b)
    for key in METRIC_KEYS[:5]:
        assert mixed[key] == recall_metrics(a)[key]
    for key in METRIC_KEYS[5:10]:
        assert mixed[key] == recall_metrics(b)[key]


def test_large_row_blocks_agree(monkeypatch):
    from hsc_pyg.engine import metrics as module
    rng = np.random.default_rng(3)
    sims = rng.standard_normal((30, 150)).astype(np.float32)
    want = recall_metrics(sims)
    monkeypatch.setattr(module, "_ROW_BLOCK", 7)  # several blocks, the last one partial
    assert recall_metrics(sims) == want


# ---- errors --------------------------------------------------------------------------------------------------------
def test_shape_that_does_not_fit_per_image_is_one_line_error():
    with pytest.raises(DataError, match=r"\[4, 19\].*expected \[4, 20\]") as info:
        recall_metrics(np.zeros((4, 19), dtype=np.float32))
    assert "\n" not in str(info.value)


def test_nan_scores_are_refused():
    sims = np.zeros((2, 10), dtype=np.float32)
    sims[1, 3] = np.nan
    with pytest.raises(DataError, match="image 1, caption 3"):
        recall_metrics(sims)


# ---- 5-fold --------------------------------------------------------------------------------------------------------
def test_fold5_is_the_mean_of_five_per_fold_runs():
    rng = np.random.default_rng(4)
    fold, n = 20, 100
    sims = rng.standard_normal((n, 5 * n)).astype(np.float32)
    sims += np.kron(np.eye(n), np.ones((1, 5))).astype(np.float32)
    result = fold5_metrics(sims, fold_size=fold)
    runs = [recall_metrics(sims[f:f + fold, 5 * f:5 * (f + fold)]) for f in range(0, n, fold)]
    assert len(result["folds"]) == 5
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(np.mean([r[key] for r in runs]), abs=1e-9), key
    for got, want in zip(result["folds"], runs):
        assert got == want
    assert result["rsum"] == pytest.approx(sum(result[k] for k in RECALL_KEYS), abs=1e-9)
    assert result["rsum"] == pytest.approx(np.mean([r["rsum"] for r in runs]), abs=1e-9)
    # the off-diagonal blocks are never read
    noisy = sims.copy()
    noisy[:fold, 5 * fold:] = 1e9
    assert fold5_metrics(noisy, fold_size=fold)["rsum"] == result["rsum"]


def test_fold5_on_a_coco_sized_float16_matrix():
    rng = np.random.default_rng(5)
    sims = rng.standard_normal((5000, 25000), dtype=np.float32).astype(np.float16)
    result = fold5_metrics(sims)
    assert len(result["folds"]) == 5
    assert result["folds"][2] == recall_metrics(sims[2000:3000, 10000:15000])
    # chance level: R@10 of t2i is about 1% of 1,000 images
    assert 0.5 < result["r10_t2i"] < 1.5


def test_fold5_refuses_a_number_of_images_that_is_not_a_multiple_of_the_fold():
    with pytest.raises(ConfigError, match=r"found 1500 images.*testall \(5,000 images\)"):
        fold5_metrics(np.zeros((1500, 7500), dtype=np.float32))


# ---- table ---------------------------------------------------------------------------------------------------------
def test_table_shows_every_number():
    metrics = {key: float(v) for v, key in enumerate(METRIC_KEYS, 1)}
    metrics["rsum"] = 123.4
    text = format_table(metrics, title="exact")
    lines = text.splitlines()
    assert lines[0] == "exact"
    assert lines[2].split() == ["i2t", "1.0", "2.0", "3.0", "4.0", "5.0"]
    assert lines[3].split() == ["t2i", "6.0", "7.0", "8.0", "9.0", "10.0"]
    assert lines[4] == "rsum  123.4"
