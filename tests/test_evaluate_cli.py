"""evaluate.py: saved matrices, ensembles, re-ranking, 5-fold, and one-line errors with exit status 2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine.checkpoint import save_checkpoint
from hsc_pyg.engine.metrics import METRIC_KEYS, recall_metrics
from hsc_pyg.nn.model import build_model
from reference_protocol import fold5_metrics  # noqa: E402  (tests/reference_protocol.py)


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "evaluate.py"
N_IMG, N_CAP = 20, 100

_spec = importlib.util.spec_from_file_location("evaluate_cli", SCRIPT)
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("synthetic_precomp", "coco_tiny_precomp"):
        make_synthetic(root / name, num_train=40, num_dev=N_IMG, num_test=N_IMG, img_dim=16, num_regions=16)
    return root


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    """Two tiny models (SAF and SGR heads) with their vocabulary, and one saved without it."""
    folder = tmp_path_factory.mktemp("ckpt")
    vocab = build_vocab(PrecompSplit.open(data, "synthetic_precomp", "train").captions, threshold=1)
    vocab.save(folder / "vocab.json")
    paths = {}
    for seed, head in enumerate(("saf", "sgr")):
        torch.manual_seed(seed)
        model = build_model(Config(img_dim=16, num_regions=16, vocab_size=len(vocab), embed_size=32, word_dim=8,
                                   sim_dim=8, head=head))
        model.vocab = vocab
        save_checkpoint(folder / f"{head}.pth", model)
        paths[head] = folder / f"{head}.pth"
        if head == "saf":
            model.vocab = None
            save_checkpoint(folder / "no_vocab.pth", model)
    paths["no_vocab"] = folder / "no_vocab.pth"
    paths["vocab"] = folder / "vocab.json"
    return paths


def evaluate(capsys, *argv, data=None, split="test", name="synthetic_precomp"):
    """Run ``evaluate.main`` in this process -> (status, stdout, stderr)."""
    args = [str(a) for a in argv] + ["--no_progress"]
    if data is not None:
        args += ["--data_path", str(data), "--data_name", name, "--split", split]
    status = cli.main(args)
    out = capsys.readouterr()
    return status, out.out, out.err


def read_json(path):
    return json.loads(Path(path).read_text())


def random_sims(path, seed, shape=(N_IMG, N_CAP), dtype=np.float32):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal(shape).astype(np.float32)
    sims += np.kron(np.eye(shape[0]), np.ones((1, shape[1] // shape[0]))).astype(np.float32)
    np.save(path, sims.astype(dtype))
    return sims.astype(dtype)


# ---- saved matrices ------------------------------------------------------------------------------------------------
def test_saved_matrix_gives_the_library_metrics_in_table_and_json(capsys, data, tmp_path):
    sims = random_sims(tmp_path / "a.npy", 0)
    report_path = tmp_path / "new_folder" / "m.json"  # created; an existing report is replaced
    for _ in range(2):
        status, out, err = evaluate(capsys, "--sims", tmp_path / "a.npy", "--json", report_path, data=data)
        assert status == 0, err
    want = recall_metrics(sims)
    report = read_json(report_path)
    assert report["metrics"] == want
    assert report["exact_pairs"] == N_IMG * N_CAP and report["protocol"] == "all"
    assert f"rsum  {want['rsum']:.1f}" in out
    assert f"{want['r1_i2t']:6.1f}" in out.splitlines()[2]


def test_ensemble_of_two_saved_matrices_equals_evaluating_their_average(capsys, data, tmp_path):
    a = random_sims(tmp_path / "a.npy", 1)
    b = random_sims(tmp_path / "b.npy", 2)
    np.save(tmp_path / "avg.npy", (a + b) / 2)
    status, _, err = evaluate(capsys, "--sims", tmp_path / "a.npy", "--sims", tmp_path / "b.npy",
                              "--json", tmp_path / "ens.json", data=data)
    assert status == 0, err
    status, _, err = evaluate(capsys, "--sims", tmp_path / "avg.npy", "--json", tmp_path / "avg.json", data=data)
    assert status == 0, err
    assert read_json(tmp_path / "ens.json")["metrics"] == read_json(tmp_path / "avg.json")["metrics"]
    assert read_json(tmp_path / "ens.json")["metrics"] == recall_metrics((a + b) / 2)
    assert read_json(tmp_path / "ens.json")["metrics"] != recall_metrics(a)


def test_saved_matrix_of_the_wrong_shape_is_a_one_line_error(capsys, data, tmp_path):
    np.save(tmp_path / "small.npy", np.zeros((10, 50), dtype=np.float32))
    status, out, err = evaluate(capsys, "--sims", tmp_path / "small.npy", data=data)
    assert status == 2
    assert err.count("\n") == 1 and "[10, 50]" in err and "[20, 100]" in err
    np.save(tmp_path / "ints.npy", np.zeros((N_IMG, N_CAP), dtype=np.int64))
    status, _, err = evaluate(capsys, "--sims", tmp_path / "ints.npy", data=data)
    assert status == 2 and "int64" in err


def test_fold5_averages_the_diagonal_blocks_of_a_saved_matrix(capsys, tmp_path):
    # a split of 2,000 images (two folds of 1,000): tiny features, the shape is all that matters here
    folder = tmp_path / "coco_two_folds"
    folder.mkdir()
    np.save(folder / "testall_ims.npy", np.zeros((2000, 2, 3), dtype=np.float16))
    (folder / "testall_caps.txt").write_text("a caption\n" * 10000)
    sims = random_sims(tmp_path / "s.npy", 3, shape=(2000, 10000), dtype=np.float16)
    status, out, err = evaluate(capsys, "--sims", tmp_path / "s.npy", "--fold5", "--json", tmp_path / "f.json",
                                data=tmp_path, name="coco_two_folds", split="testall")
    assert status == 0, err
    report = read_json(tmp_path / "f.json")
    want = fold5_metrics(sims)
    assert len(report["metrics"]["folds"]) == 2
    for key in METRIC_KEYS:
        assert report["metrics"][key] == pytest.approx(want[key], abs=1e-9)
    assert report["exact_pairs"] == 2 * 1000 * 5000
    assert "2 fold(s)" in err
    assert "fold rsums" in out


def test_fold5_needs_a_multiple_of_1000_images(capsys, data, tmp_path):
    random_sims(tmp_path / "a.npy", 4)
    status, _, err = evaluate(capsys, "--sims", tmp_path / "a.npy", "--fold5", data=data)
    assert status == 2 and "found 20 images" in err and "testall" in err


def test_coco_on_test_warns_about_the_protocol(capsys, data, tmp_path):
    random_sims(tmp_path / "a.npy", 5)
    status, _, err = evaluate(capsys, "--sims", tmp_path / "a.npy", data=data, name="coco_tiny_precomp")
    assert status == 0 and "warning" in err and "--split testall" in err
    status, _, err = evaluate(capsys, "--sims", tmp_path / "a.npy", data=data, name="synthetic_precomp")
    assert status == 0 and "warning" not in err


# ---- models --------------------------------------------------------------------------------------------------------
def test_save_sims_then_sims_gives_identical_numbers(capsys, data, checkpoints, tmp_path):
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--save_sims", tmp_path / "s.npy",
                              "--json", tmp_path / "model.json", data=data)
    assert status == 0, err
    saved = np.load(tmp_path / "s.npy")
    assert saved.shape == (N_IMG, N_CAP) and saved.dtype == np.float32
    assert read_json(tmp_path / "s.npy.json")["split"] == "test"
    status, _, err = evaluate(capsys, "--sims", tmp_path / "s.npy", "--json", tmp_path / "sims.json", data=data)
    assert status == 0, err
    assert read_json(tmp_path / "model.json")["metrics"] == read_json(tmp_path / "sims.json")["metrics"]
    # a matrix saved for another split of the same shape is noticed
    status, _, err = evaluate(capsys, "--sims", tmp_path / "s.npy", data=data, split="dev")
    assert status == 0 and "saved for synthetic_precomp/test" in err


def test_save_sims_refuses_to_overwrite_without_the_flag(capsys, data, checkpoints, tmp_path):
    target = tmp_path / "s.npy"
    target.write_bytes(b"keep me")
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--save_sims", target, data=data)
    assert status == 2 and "--overwrite" in err and err.count("\n") == 1
    assert target.read_bytes() == b"keep me"
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--save_sims", target, "--overwrite", data=data)
    assert status == 0, err
    assert np.load(target).shape == (N_IMG, N_CAP)


def test_two_models_are_averaged_like_their_saved_matrices(capsys, data, checkpoints, tmp_path):
    for head in ("saf", "sgr"):
        assert evaluate(capsys, "--model", checkpoints[head], "--save_sims", tmp_path / f"{head}.npy", data=data)[0] == 0
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--model", checkpoints["sgr"],
                              "--save_sims", tmp_path / "both.npy", "--json", tmp_path / "both.json", data=data)
    assert status == 0, err
    average = (np.load(tmp_path / "saf.npy") + np.load(tmp_path / "sgr.npy")) / 2
    np.testing.assert_array_equal(np.load(tmp_path / "both.npy"), average)
    assert read_json(tmp_path / "both.json")["metrics"] == recall_metrics(average)


def test_rerank_reports_both_recalls_and_the_pairs_each_needed(capsys, data, checkpoints, tmp_path):
    status, out, err = evaluate(capsys, "--model", checkpoints["saf"], "--rerank_k", 3, N_CAP,
                                "--json", tmp_path / "both.json", data=data)
    assert status == 0, err
    report = read_json(tmp_path / "both.json")
    small, full = report["rerank"]
    assert (small["k"], full["k"]) == (3, N_CAP)
    assert full["metrics"] == report["metrics"]
    assert full["exact_pairs"] == N_IMG * N_CAP and full["fraction"] == 1.0
    assert "re-ranked top 100" in out and "re-ranked top 3 " in out and "first stage only" in out
    assert small["exact_pairs"] <= 3 * (N_IMG + N_CAP)
    assert small["fraction"] == pytest.approx(small["exact_pairs"] / (N_IMG * N_CAP))
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--rerank_k", 3,
                              "--json", tmp_path / "k3.json", data=data)
    assert status == 0, err
    alone = read_json(tmp_path / "k3.json")
    assert alone["rerank"] == [small] and alone["first_stage_metrics"] == report["first_stage_metrics"]


def test_rerank_needs_a_model(capsys, data, tmp_path):
    random_sims(tmp_path / "a.npy", 6)
    status, _, err = evaluate(capsys, "--sims", tmp_path / "a.npy", "--rerank_k", 5, data=data)
    assert status == 2 and "--rerank_k needs --model" in err


def test_vocabulary_comes_from_the_flag_when_the_checkpoint_has_none(capsys, data, checkpoints, tmp_path):
    status, _, err = evaluate(capsys, "--model", checkpoints["no_vocab"], data=data)
    assert status == 2 and "--vocab_path" in err
    status, _, err = evaluate(capsys, "--model", checkpoints["no_vocab"], "--vocab_path", checkpoints["vocab"],
                              "--json", tmp_path / "a.json", data=data)
    assert status == 0, err
    status, _, err = evaluate(capsys, "--model", checkpoints["saf"], "--json", tmp_path / "b.json", data=data)
    assert read_json(tmp_path / "a.json")["metrics"] == read_json(tmp_path / "b.json")["metrics"]


def test_nothing_to_evaluate_and_save_sims_with_fold5_are_refused(capsys, data, tmp_path):
    status, _, err = evaluate(capsys, data=data)
    assert status == 2 and "--model" in err
    status, _, err = evaluate(capsys, "--sims", tmp_path / "x.npy", "--fold5", "--save_sims", tmp_path / "y.npy",
                              data=data)
    assert status == 2 and "--fold5" in err


# ---- the real command line -----------------------------------------------------------------------------------------
def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for flag in ("--model", "--sims", "--data_path", "--data_name", "--split", "--fold5", "--save_sims",
                 "--rerank_k", "--json", "--device", "--amp", "--batch_size", "--vocab_path", "--debug",
                 "--overwrite", "--score_chunk_mb", "--store_dtype", "--rescore_k"):
        assert flag in result.stdout, flag


def test_expected_errors_exit_2_with_one_line_and_a_traceback_only_with_debug(data, tmp_path):
    argv = [sys.executable, str(SCRIPT), "--model", str(tmp_path / "missing.pth"), "--data_path", str(data),
            "--data_name", "synthetic_precomp", "--no_progress"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    result = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


# ---- official checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgraf_saf", "sgraf_sgr", "lhsc"])
def test_official_checkpoint_scores_match_the_original_code(capsys, shared_dir, tmp_path, name):
    """The reference case as a precomp split (5 images, caption i of image i) evaluated through evaluate.py with
    the official checkpoint and a vocabulary file: the saved matrix is the original code's scores."""
    from hsc_pyg.data.vocab import Vocabulary

    ref = shared_dir / "fixtures" / "reference"
    case = torch.load(ref / f"{name}.case.pt", weights_only=True)
    vocab = Vocabulary(f"w{i}" for i in range(4, 50))
    vocab.save(tmp_path / "vocab.json")
    folder = tmp_path / "case_precomp"
    folder.mkdir()
    n = case["images"].shape[0]
    np.save(folder / "test_ims.npy", case["images"].numpy().astype(np.float32))
    words = {3: "never_seen"} | {i: f"w{i}" for i in range(4, 50)}
    lines = [" ".join(words[t] for t in ids[1:-1]) for ids in case["captions"][:n]]
    assert [vocab.encode(line) for line in lines] == [list(ids) for ids in case["captions"][:n]]
    (folder / "test_caps.txt").write_text("\n".join(lines) + "\n")
    status, _, err = evaluate(capsys, "--model", ref / f"{name}.pth.tar", "--vocab_path", tmp_path / "vocab.json",
                              "--save_sims", tmp_path / "s.npy", "--json", tmp_path / "m.json", "--device", "cpu",
                              data=tmp_path, name="case_precomp")
    assert status == 0, err
    expected = case["expected_sims"][:, :n].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=0, atol=1e-4)
    assert read_json(tmp_path / "m.json")["metrics"] == recall_metrics(expected.astype(np.float32), per_image=1)
