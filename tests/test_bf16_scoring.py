"""bf16 pair scoring with exact ranking (``evaluate.py --amp bf16``): the recall table equals float32's on the built-in
data, the re-scored entries are float32 scores, and CPUs without native bf16 matrix instructions are refused."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.engine import device as device_module
from hsc_pyg.engine.checkpoint import load_checkpoint
from hsc_pyg.engine.scoring import BAND_FACTOR, encode_split, pair_scores, rescore_ranking, score_matrix
from hsc_pyg.engine.metrics import recall_metrics
from hsc_pyg.config import DEFAULT_RESCORE_K
from hsc_pyg.engine.train import train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

NO_BF16 = "torch finds no native bf16 matrix instructions on this CPU (bf16 scoring is refused)"
needs_bf16 = pytest.mark.skipif(not device_module.cpu_bf16_instructions(), reason=NO_BF16)
N_TEST = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A small HSC trained briefly on the built-in data (so that its rankings mean something): (data, checkpoint)."""
    root = tmp_path_factory.mktemp("bf16")
    make_synthetic(root / "synthetic_precomp", num_train=160, num_dev=4, num_test=N_TEST, img_dim=32, num_regions=16)
    config = Config(data_path=str(root), data_name="synthetic_precomp", model_name=str(root / "run" / "checkpoint"),
                    logger_name=str(root / "run" / "log"), embed_size=64, word_dim=32, sim_dim=32, img_layers=2,
                    txt_layers=2, batch_size=32, learning_rate=2e-3, num_epochs=8, lr_update=6,
                    max_violation_after=4, vocab_threshold=1, val_step=1000, log_step=100, device="cpu", seed=0)
    train(config)
    return root, root / "run" / "checkpoint" / "model_best.pth"


def evaluate(capsys, *argv):
    status = cli.main([str(a) for a in argv] + ["--no_progress"])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_bf16_with_exact_ranking_gives_the_float32_recall_table_on_the_built_in_data(capsys, trained, tmp_path,
                                                                                       device):
    if device == "cpu" and not device_module.cpu_bf16_instructions():
        pytest.skip(NO_BF16)
    data, checkpoint = trained
    common = ["--model", checkpoint, "--data_path", data, "--data_name", "synthetic_precomp", "--device", device]
    tables = {}
    for name, flags in (("float32", ["--amp", "off"]), ("exact_ranking", ["--amp", "bf16"]),
                        ("bf16", ["--amp", "bf16", "--rescore_k", "0"])):
        status, out, err = evaluate(capsys, *common, *flags, "--json", tmp_path / f"{name}.json")
        assert status == 0, err
        tables[name] = json.loads((tmp_path / f"{name}.json").read_text())
    exact_ranking = tables["exact_ranking"]
    assert exact_ranking["metrics"] == tables["float32"]["metrics"]
    assert exact_ranking["rescore"]["k"] == DEFAULT_RESCORE_K and 0 < exact_ranking["rescore"]["fraction"] < 1
    assert "rescore" not in tables["bf16"] and tables["bf16"]["amp"] == "bf16"


@needs_bf16
def test_rescored_entries_are_the_float32_scores_and_the_rest_stays_bf16(trained):
    data, checkpoint = trained
    model = load_checkpoint(checkpoint).eval()
    img, cap = encode_split(model, PrecompSplit.open(data, "synthetic_precomp", "test"), progress=False)
    float32 = score_matrix(model, img, cap, progress=False)
    bf16 = score_matrix(model, img, cap, amp="bf16", progress=False)
    assert 0 < np.abs(bf16 - float32).max() < 0.05                 # really bf16, and close
    calls = []

    def float32_pairs(rows, cols):
        calls.append((rows, cols, pair_scores(model, img, cap, rows, cols)))
        return calls[-1][2]

    k = 5
    result = rescore_ranking(bf16, k, 5, float32_pairs)
    rows, cols, values = (np.concatenate(parts) for parts in zip(*calls))
    rescored = np.zeros(bf16.shape, dtype=bool)
    rescored[rows, cols] = True
    # re-scored: each query's bf16 top K in both directions with the ties at the K-th place, every ground-truth pair
    # (and the pairs near those)
    top = at_least_kth(bf16, k)
    top[np.arange(bf16.shape[1]) // 5, np.arange(bf16.shape[1])] = True
    assert rescored[top].all() and result.num_float32_pairs == rescored.sum() == len(rows)
    # their entries are float32 scores: bit for bit the float32 pair scorer's (called again on the same pairs), and
    # the float32 matrix's up to the last bit (its blocks pad captions differently); every other entry is bf16's
    assert np.array_equal(result.scores[rows, cols], values)
    for call_rows, call_cols, call_values in calls:
        assert np.array_equal(call_values, pair_scores(model, img, cap, call_rows, call_cols))
    assert np.abs(values - float32[rows, cols]).max() < 1e-6
    assert np.array_equal(result.scores[~rescored], bf16[~rescored])
    assert result.margin == pytest.approx(BAND_FACTOR * np.abs(calls[0][2] - bf16[calls[0][0], calls[0][1]]).max())


@pytest.mark.parametrize("seed", range(20))
def test_rescoring_a_perturbed_matrix_gives_the_exact_recall_table_and_rescores_only_near_the_best_match(seed):
    """MODEL.md's recall table of a dense, tie-heavy float32 matrix, perturbed by up to +-delta (as a reduced
    precision would, the largest error occurring among the re-scored top K), is recovered exactly; the band holds
    only pairs near each query's best ground-truth score."""
    rng = np.random.default_rng(seed)
    n, per_image, k, delta = 40, 5, 3, 0.02
    exact = np.round(rng.normal(size=(n, n * per_image)), 2).astype(np.float32)          # many ties and near-ties
    captions = np.arange(n * per_image)
    exact[captions // per_image, captions] += rng.uniform(0, 2, n * per_image).astype(np.float32)
    noise = rng.uniform(-delta, delta, exact.shape).astype(np.float32)
    noise[0, np.argmax(exact[0] + noise[0])] = delta                                     # the worst error, in a top K
    approx = exact + noise
    result = rescore_ranking(approx, k, per_image, lambda r, c: exact[r, c])
    assert result.metrics(per_image) == recall_metrics(exact, per_image)
    assert result.margin == pytest.approx(BAND_FACTOR * delta, rel=1e-4)
    truth = np.zeros(exact.shape, dtype=bool)
    truth[captions // per_image, captions] = True
    best = np.where(truth, exact, -np.inf).max(1, keepdims=True)                         # each image's best caption
    near = (np.abs(approx - best) <= result.margin) | (np.abs(approx - exact[captions // per_image, captions])
                                                        <= result.margin)
    assert result.num_float32_pairs == (at_least_kth(approx, k) | truth | near).sum()


def at_least_kth(scores: np.ndarray, k: int) -> np.ndarray:
    """The pairs whose score is at least the k-th largest of their row or of their column (every tie at the k-th
    place: no sort decides which of them count)."""
    row_kth = np.sort(scores, axis=1)[:, -k:][:, :1]
    column_kth = np.sort(scores, axis=0)[-k:][:1]
    return (scores >= row_kth) | (scores >= column_kth)


def rescored_pairs(approx: np.ndarray, exact: np.ndarray, k: int, per_image: int):
    """(the rescore result, a mask of the pairs it asked float32 scores for; each pair asked once)."""
    asked = np.zeros(approx.shape, dtype=int)

    def float32(rows, cols):
        np.add.at(asked, (rows, cols), 1)
        return exact[rows, cols]

    result = rescore_ranking(approx, k, per_image, float32)
    assert asked.max() == 1 and result.num_float32_pairs == asked.sum()
    return result, asked.astype(bool)


def row_tie_matrix() -> np.ndarray:
    """8 images x 8 captions (one caption each, on the diagonal at -0.5) where image 0's best caption scores 3 and
    four captions tie for its 2nd place at 1; every one of those four columns has two images scoring 5 or more, so no
    column's top 2 holds them. Every other score is distinct and below -1."""
    scores = -1 - np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    np.fill_diagonal(scores, -0.5)
    scores[0, 7] = 3
    scores[0, 1:5] = 1
    scores[5:7, 1:5] = 5 + np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    return scores


@pytest.mark.parametrize("direction", ["rows", "columns"])
def test_every_pair_tied_at_the_kth_place_is_rescored(direction):
    """Four pairs tie for one query's 2nd place (a row's, or a column's when the matrix is transposed): all four are
    re-scored, whichever of them a sort puts first; the float32 scores replace them, and the ranking follows them."""
    approx = row_tie_matrix() if direction == "rows" else row_tie_matrix().T.copy()
    tied = np.zeros(approx.shape, dtype=bool)
    tied[0, 1:5] = True
    if direction == "columns":
        tied = tied.T
    exact = approx.copy()
    exact[tied] = 1 + np.array([3, 1, 4, 2], dtype=np.float32) / 1024         # float32 breaks the tie
    result, asked = rescored_pairs(approx, exact, 2, 1)
    assert asked[tied].all()
    assert np.array_equal(asked, at_least_kth(approx, 2) | np.eye(8, dtype=bool))
    assert np.array_equal(result.scores[tied], exact[tied])
    assert result.margin == pytest.approx(BAND_FACTOR * 4 / 1024)


@pytest.mark.parametrize("seed", range(5))
def test_ties_on_the_bf16_grid_are_all_rescored_and_the_recall_table_is_float32s(seed):
    """A dense matrix on the bf16 grid near 1 (six values 2^-8 apart, so dozens of pairs share each row's K-th score,
    and several pairs most columns'): every pair at or above a K-th score is re-scored, and the recall table is the
    exact one."""
    rng = np.random.default_rng(seed)
    n, per_image, k = 30, 5, 5
    approx = (1 - rng.integers(0, 6, size=(n, n * per_image)) / 256).astype(np.float32)
    assert np.array_equal(torch.from_numpy(approx).to(torch.bfloat16).float().numpy(), approx)  # on the bf16 grid
    exact = approx + rng.uniform(-1 / 1024, 1 / 1024, approx.shape).astype(np.float32)   # within bf16's rounding
    result, asked = rescored_pairs(approx, exact, k, per_image)
    row_kth, column_kth = np.sort(approx, axis=1)[:, -k:][:, :1], np.sort(approx, axis=0)[-k:][:1]
    assert ((approx >= row_kth).sum(1) > k).all() and ((approx >= column_kth).sum(0) > k).mean() > 0.5  # tied cuts
    top = at_least_kth(approx, k)
    assert asked[top].all()
    assert result.metrics(per_image) == recall_metrics(exact, per_image)


def test_bf16_is_refused_with_one_line_where_the_cpu_has_no_bf16_matrix_instructions(capsys, monkeypatch, tmp_path):
    make_synthetic(tmp_path / "synthetic_precomp", num_train=4, num_dev=2, num_test=2, img_dim=8, num_regions=16)
    monkeypatch.setattr(device_module, "cpu_bf16_instructions", lambda: [])
    status, out, err = evaluate(capsys, "--model", tmp_path / "absent.pth", "--data_path", tmp_path, "--device", "cpu",
                                "--amp", "bf16")
    assert status == 2 and out == ""
    assert err.strip().count("\n") == 0
    assert "--amp bf16 on the CPU needs native bf16 matrix instructions" in err and "use --amp off" in err


@pytest.mark.parametrize("flags, message", [
    (["--rescore_k", "10"], "--rescore_k re-scores the top K of a --amp bf16 or fp16 pass"),
    (["--amp", "bf16", "--rescore_k", "-1"], "rescore_k=-1 is invalid: expected an integer >= 0"),
    (["--amp", "bf16", "--save_sims", "x.npy"], "would save a matrix that mixes precisions"),
])
def test_rescore_flags_that_cannot_work_are_one_line_errors(capsys, tmp_path, flags, message):
    status, out, err = evaluate(capsys, "--model", tmp_path / "m.pth", "--data_path", tmp_path, *flags)
    assert status == 2 and message in err and err.strip().count("\n") == 0



def test_a_torch_without_get_capabilities_reads_the_kernels_cpu_flags(monkeypatch, tmp_path):
    # torch 2.4 (the floor) has no torch.cpu.get_capabilities; the same names come from /proc/cpuinfo on Linux
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    read = device_module.cpu_capabilities
    cpuinfo = tmp_path / "cpuinfo"
    block = "processor\t: {}\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx512f {}avx512_vnni\npower management:\n"
    monkeypatch.setattr(device_module, "cpu_capabilities", lambda: read(str(cpuinfo)))
    for flags, found in (("avx512_bf16 amx_bf16 ", ["amx_bf16", "avx512_bf16"]), ("avx512_bf16 ", ["avx512_bf16"]),
                         ("", [])):
        cpuinfo.write_text(block.format(0, flags) + "\n" + block.format(1, flags))
        assert read(str(cpuinfo))["cpu_name"] == "AMD EPYC 9B14"
        assert device_module.cpu_bf16_instructions() == found
    assert read(str(tmp_path / "absent")) == {}
