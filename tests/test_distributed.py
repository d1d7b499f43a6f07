"""torch.distributed on the CPU: 2 processes (gloo, started by torch.multiprocessing.spawn with torchrun's env://
variables) evaluate with the same numbers as one process, train like the equivalent single-process computation, and
write checkpoints that one process resumes."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import build_vocab
from hsc_pyg.engine import distributed
from hsc_pyg.engine.checkpoint import load_checkpoint, save_checkpoint
from hsc_pyg.engine.evaluation import encode_split, evaluate, score_matrix, score_matrix_distributed
from hsc_pyg.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as evaluate_cli  # noqa: E402  (the command line at the project root)

WORLD = 2
EVAL_BLOCK = 4  # image rows per scoring block: 20 test images -> rank 0 scores rows 0-11, rank 1 rows 12-19


# --------------------------------------------------------------------------- running 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, job: str, folder: str) -> None:
    """One process of the job: torchrun's variables, then ``job`` (a function of this module) inside the group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        with distributed.process_group(torch.device("cpu")):
            globals()[job](Path(folder))
    except BaseException:
        (Path(folder) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


@contextlib.contextmanager
def one_thread():
    """The workers' thread count for a reference computation: a CPU matrix product's rounding may depend on how many
    threads share it, so one process compares with another only at the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(job: str, folder: Path) -> None:
    """Run ``job(folder)`` in 2 processes; their results are files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(_free_port(), job, str(folder)), nprocs=WORLD, join=True)
    except Exception:
        errors = "\n".join(p.read_text() for p in sorted(folder.glob("error*.txt")))
        pytest.fail(f"the 2-process job {job} failed:\n{errors}")


# --------------------------------------------------------------------------- data and a tiny model
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_synthetic(root / "synthetic_precomp", num_train=10, num_dev=10, num_test=20, img_dim=16, num_regions=16)
    return root


@pytest.fixture(scope="module")
def eval_job(data, tmp_path_factory) -> Path:
    """A tiny checkpoint, and what 2 processes computed with it (files in the returned folder)."""
    folder = tmp_path_factory.mktemp("eval")
    vocab = build_vocab(PrecompSplit.open(data, "synthetic_precomp", "train").captions, threshold=1)
    torch.manual_seed(0)
    model = build_model(Config(img_dim=16, num_regions=16, vocab_size=len(vocab), embed_size=32, word_dim=8,
                               sim_dim=8))
    model.vocab = vocab
    save_checkpoint(folder / "model.pth", model)
    (folder / "data").write_text(str(data))
    run_job("_evaluate_job", folder)
    return folder


def _cli_args(folder: Path, data: Path, out: str) -> list[str]:
    return ["--model", str(folder / "model.pth"), "--data_path", str(data), "--split", "test", "--device", "cpu",
            "--no_progress", "--json", str(folder / out)]


def _evaluate_job(folder: Path) -> None:
    data = Path((folder / "data").read_text())
    model = load_checkpoint(folder / "model.pth")
    split = PrecompSplit.open(data, "synthetic_precomp", "test")
    img_enc, captions = encode_split(model, split, progress=False)
    sims = score_matrix_distributed(model, img_enc, captions, block_images=EVAL_BLOCK, progress=False)
    metrics = evaluate(model, split)
    rank = distributed.rank()
    torch.save({"sims": sims, "metrics": metrics, "rows": distributed.shard_rows(len(img_enc), EVAL_BLOCK)},
               folder / f"rank{rank}.pt")
    evaluate_cli.main(_cli_args(folder, data, "cli.json"))


# --------------------------------------------------------------------------- distributed evaluation
def test_shards_are_whole_blocks_that_cover_the_rows_once():
    shards = [distributed.shard_rows(1000, 128, r, 8) for r in range(8)]
    assert [len(s) for s in shards] == [128] * 7 + [104]
    assert [i for s in shards for i in s] == list(range(1000))
    assert all(s.start % 128 == 0 for s in shards)
    assert [len(distributed.shard_rows(20, 4, r, 2)) for r in range(2)] == [12, 8]
    assert [len(distributed.shard_rows(20, 128, r, 2)) for r in range(2)] == [20, 0]


def test_distributed_score_matrix_equals_the_single_process_one_exactly(eval_job, data):
    model = load_checkpoint(eval_job / "model.pth")
    split = PrecompSplit.open(data, "synthetic_precomp", "test")
    with one_thread():
        expected = score_matrix(model, *encode_split(model, split, progress=False), block_images=EVAL_BLOCK,
                                progress=False)
    ranks = [torch.load(eval_job / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [ranks[r]["rows"] for r in range(WORLD)] == [range(0, 12), range(12, 20)]  # both ranks scored rows
    assert ranks[1]["sims"] is None  # the matrix is gathered on rank 0 only
    assert ranks[0]["sims"].shape == expected.shape == (20, 100)
    assert np.array_equal(ranks[0]["sims"], expected)


def test_distributed_evaluate_gives_every_rank_the_single_process_metrics(eval_job, data):
    model = load_checkpoint(eval_job / "model.pth")
    with one_thread():
        expected = evaluate(model, PrecompSplit.open(data, "synthetic_precomp", "test"))
    for r in range(WORLD):
        assert torch.load(eval_job / f"rank{r}.pt", weights_only=False)["metrics"] == expected


def test_evaluate_cli_under_torchrun_reports_the_single_process_numbers_from_rank_0(eval_job, data):
    with one_thread():
        assert evaluate_cli.main(_cli_args(eval_job, data, "single.json")) == 0
    single, job = (json.loads((eval_job / name).read_text()) for name in ("single.json", "cli.json"))
    single.pop("seconds"), job.pop("seconds")
    assert job == single
