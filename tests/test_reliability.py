"""Crash consistency and exact resume: the atomic writer (modes, full disks, dead writers' temporary files, multi-file
and folder units), the run folder's lock and identity, the order of a save (best model before the checkpoint that
records it), crashes between and during the writes of a save, and an interruption at every point of a short run
(every step, every validation, every save, a second signal during the interrupt's save) resumed bit for bit."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hsc_pyg import io
from hsc_pyg.config import Config
from hsc_pyg.data.precomp import MAX_GRAPH_EDGES, check_graph_size, graph_edges, read_lines
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.data.vocab import Vocabulary
from hsc_pyg.engine import train as train_module
from hsc_pyg.engine.checkpoint import read_checkpoint
from hsc_pyg.engine.train import BEST, CHECKPOINT, Interrupted, resume_config, train
from hsc_pyg.io import LOCK, FolderLock
from hsc_pyg.errors import ConfigError, DataError, OutputError

ROOT = Path(__file__).resolve().parents[1]
#: 10 train images (50 captions): 6 batches of 8 per epoch; 2 epochs; validation every 2 iterations and at epoch ends
SHORT = dict(data_name="synthetic_precomp", embed_size=16, word_dim=8, sim_dim=8, img_layers=1, txt_layers=1,
             batch_size=8, vocab_threshold=1, val_step=2, log_step=1, num_epochs=2, device="cpu", seed=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("short")
    make_synthetic(root / "synthetic_precomp", num_train=10, num_dev=6, num_test=2, img_dim=16, num_regions=16)
    return root


def short_config(data: Path, run: Path, **changes) -> Config:
    return Config(data_path=str(data), model_name=str(run / "ckpt"), logger_name=str(run / "log"),
                  **{**SHORT, **changes})


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- the atomic writer
def test_written_files_get_a_plain_files_mode_not_the_temporary_files(tmp_path):
    previous = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.json", "{}\n")
        io.atomic_files({tmp_path / "b.bin": lambda f: f.write(b"b")})
    finally:
        os.umask(previous)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.json", "b.bin")] == [0o644, 0o644]


@pytest.mark.parametrize("writer", ["file", "files", "folder"])
def test_a_full_disk_leaves_the_old_files_byte_for_byte_and_says_so_in_one_line(tmp_path, monkeypatch, writer):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_bytes(b"old a")
    (target / "b.txt").write_bytes(b"old b")
    monkeypatch.setattr(io.os, "fsync", no_space)
    with pytest.raises(OutputError) as raised:
        if writer == "file":
            io.write_bytes(target / "a.txt", b"new a" * 1000)
        elif writer == "files":
            io.atomic_files({target / "a.txt": lambda f: f.write(b"new a"), target / "b.txt": lambda f: f.write(b"b")})
        else:
            with io.atomic_folder(target) as folder:
                (folder / "a.txt").write_bytes(b"new a")
    monkeypatch.undo()
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message and "is intact" in message
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "out"]  # no temporary file left
    assert ((target / "a.txt").read_bytes(), (target / "b.txt").read_bytes()) == (b"old a", b"old b")


def test_a_folder_is_replaced_as_one_unit_keeping_the_files_it_does_not_write(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "train_caps.txt").write_text("old\n")
    (target / "notes.txt").write_text("mine\n")
    with io.atomic_folder(target) as folder:
        (folder / "train_caps.txt").write_text("new\n")
        assert (target / "train_caps.txt").read_text() == "old\n"  # nothing changes until the block ends
    assert {p.name: p.read_text() for p in target.iterdir()} == {"train_caps.txt": "new\n", "notes.txt": "mine\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def test_temporary_files_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace(".", "_")
    stale = tmp_path / f".checkpoint.pth.{host}.{dead.pid}.0badc0de.hsc-tmp"
    alive = tmp_path / f".checkpoint.pth.{host}.{os.getppid()}.0badc0de.hsc-tmp"
    other_host = tmp_path / f".checkpoint.pth.elsewhere.{dead.pid}.0badc0de.hsc-tmp"
    for path in (stale, alive, other_host):
        path.write_bytes(b"half a checkpoint")
    io.write_bytes(tmp_path / "checkpoint.pth", b"new")
    assert not stale.exists() and alive.exists() and other_host.exists()


# --------------------------------------------------------------------------- the run folder
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(data, tmp_path):
    folder = tmp_path / "run" / "ckpt"
    folder.mkdir(parents=True)
    lock = FolderLock.acquire(folder)
    try:
        with pytest.raises(ConfigError, match=rf"{folder} is in use by another process \(pid {os.getpid()} on "
                                              rf"{socket.gethostname()}: python\S* .*, started \d{{4}}-\d\d-\d\dT.*; "
                                              r"wait for it to end or stop it, or choose another --model_name$"):
            train(short_config(data, tmp_path / "run"), max_iters=1)
    finally:
        lock.release()
    assert sorted(p.name for p in folder.iterdir()) == []
    train(short_config(data, tmp_path / "run"), max_iters=1)  # free again; the lock file goes with the run
    assert not (folder / LOCK).exists() and (folder / CHECKPOINT).exists()


def test_resuming_into_a_folder_of_another_run_needs_overwrite(data, tmp_path):
    train(short_config(data, tmp_path / "a"), max_iters=2)
    train(short_config(data, tmp_path / "b"), max_iters=2)
    b_before = (tmp_path / "b" / "ckpt" / CHECKPOINT).read_bytes()
    checkpoint = read_checkpoint(tmp_path / "a" / "ckpt" / CHECKPOINT)
    config = resume_config(checkpoint, {"model_name": str(tmp_path / "b" / "ckpt")}, source="a")
    with pytest.raises(ConfigError, match=r"already holds model_best.pth and checkpoint.pth of another run than the "
                                          r"one resumed; pass --overwrite"):
        train(config, resume=checkpoint, max_iters=3)
    assert (tmp_path / "b" / "ckpt" / CHECKPOINT).read_bytes() == b_before
    train(config, resume=checkpoint, max_iters=3, overwrite=True)
    moved = read_checkpoint(tmp_path / "b" / "ckpt" / CHECKPOINT)
    assert moved["run_id"] == checkpoint["run_id"] and moved["iteration"] == 3


def test_validation_does_not_change_the_training_randomness(data, tmp_path):
    often = train(short_config(data, tmp_path / "often", val_step=1), max_iters=5)
    never = train(short_config(data, tmp_path / "never", val_step=1000), max_iters=5)
    assert often.losses == never.losses
    assert_same(often.model.state_dict(), never.model.state_dict())


def test_a_full_disk_for_tensorboard_is_one_warning_and_training_goes_on(data, tmp_path, monkeypatch, capfd):
    from tensorboard.summary.writer import record_writer

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)
    lines = []
    result = train(short_config(data, tmp_path), max_iters=3, log=lines.append)
    assert result.iteration == 3
    warnings = [line for line in lines if line.startswith("warning: TensorBoard")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "training goes on" in warnings[0]
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- interruption at every point
def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def assert_same_run(folder: Path, reference: Path) -> None:
    """Weights, optimizer and counters of checkpoint.pth and model_best.pth equal the uninterrupted run's."""
    for name in (CHECKPOINT, BEST):
        got, want = read_checkpoint(folder / name), read_checkpoint(reference / name)
        for key in ("model", "iteration", "epoch", "best_rsum"):
            assert_same({key: got[key]}, {key: want[key]})
        if name == CHECKPOINT:
            assert_same(got["optimizer"], want["optimizer"])
            assert_same(got["scheduler"], want["scheduler"])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    train(short_config(data, run))
    return run / "ckpt"


def signal_on_call(monkeypatch, name: str, call: int, signum: int = signal.SIGINT, again: bool = False) -> None:
    """Replace ``train_module.<name>`` by a wrapper that raises ``signum`` (a real signal) at its ``call``-th call,
    before running it (and, with ``again``, at every later call too: a second signal during the interrupt's save)."""
    original = getattr(train_module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call or (again and calls["n"] > call):
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, name, wrapper)


#: 12 steps; validations after steps 2, 4, 6 (epoch end), 8, 10, 12 (epoch end); saves: best (when improved) then last
STEPS, VALIDATIONS, SAVES = 12, 6, 6
POINTS = ([("train_step", n) for n in range(1, STEPS + 1)] + [("evaluate", n) for n in range(1, VALIDATIONS + 1)]
          + [("save_checkpoint", n) for n in range(1, SAVES + 1)])
#: in the default run (each point replays the short run: seconds apiece); every point with -m slow
QUICK = {("train_step", 3), ("evaluate", 4), ("save_checkpoint", 2)}


def interrupt_and_resume(data, run: Path, monkeypatch, name: str, call: int, **options) -> Interrupted:
    signal_on_call(monkeypatch, name, call, **options)
    with pytest.raises(Interrupted) as raised:
        train(short_config(data, run))
    monkeypatch.undo()
    checkpoint = read_checkpoint(run / "ckpt" / CHECKPOINT)
    train(resume_config(checkpoint, {}, source="checkpoint"), resume=checkpoint)
    return raised.value


@pytest.mark.parametrize("name, call", [pytest.param(*p, marks=[] if p in QUICK else pytest.mark.slow) for p in POINTS],
                         ids=[f"{n}{c}" for n, c in POINTS])
def test_an_interrupt_at_any_point_resumes_bit_for_bit(data, reference, tmp_path, monkeypatch, name, call):
    stopped = interrupt_and_resume(data, tmp_path, monkeypatch, name, call)
    assert stopped.signum == signal.SIGINT
    assert_same_run(tmp_path / "ckpt", reference)


def test_an_interrupt_resumes_bit_for_bit_with_caption_word_drop(data, reference, tmp_path, monkeypatch):
    """The dropped words of the second epoch's remaining captions are the uninterrupted run's (not only the first's)."""
    from hsc_pyg.data.precomp import CaptionDataset

    epochs = []
    real_set_epoch = CaptionDataset.set_epoch
    monkeypatch.setattr(CaptionDataset, "set_epoch", lambda self, e: epochs.append(e) or real_set_epoch(self, e))
    train(short_config(data, tmp_path / "reference", caption_word_drop=0.3))
    assert epochs == [0, 1]                                                          # new words each epoch
    monkeypatch.undo()
    with_drop = read_checkpoint(tmp_path / "reference" / "ckpt" / CHECKPOINT)["model"]
    without = read_checkpoint(reference / CHECKPOINT)["model"]
    assert any(not torch.equal(with_drop[k], without[k]) for k in without)           # the option changes training
    signal_on_call(monkeypatch, "train_step", 9)
    with pytest.raises(Interrupted):
        train(short_config(data, tmp_path / "run", caption_word_drop=0.3))
    monkeypatch.undo()
    checkpoint = read_checkpoint(tmp_path / "run" / "ckpt" / CHECKPOINT)
    assert checkpoint["epoch"] == 1
    train(resume_config(checkpoint, {}, source="checkpoint"), resume=checkpoint)
    assert_same_run(tmp_path / "run" / "ckpt", tmp_path / "reference" / "ckpt")


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_and_sigusr1_save_like_ctrl_c_and_a_second_signal_waits_for_the_save(
        data, reference, tmp_path, monkeypatch, signum):
    stopped = interrupt_and_resume(data, tmp_path, monkeypatch, "save_checkpoint", 3, signum=signum, again=True)
    assert stopped.signum == signum
    assert_same_run(tmp_path / "ckpt", reference)


# --------------------------------------------------------------------------- crashes between and during the writes
CRASH = """
import os, sys, torch
sys.path.insert(0, {root!r})
from hsc_pyg.engine import checkpoint as ck, train as tr
from hsc_pyg.config import Config
calls = {{"n": 0}}
real = torch.save

def dying_save(obj, f, *a, **k):
    calls["n"] += 1
    if calls["n"] == {call}:
        if {during}:
            f.write(b"PK half a checkpoint"); f.flush()
        os._exit(9)  # a kill: no cleanup, no exception handlers
    real(obj, f, *a, **k)

ck.torch.save = dying_save
tr.train(Config(**{config!r}))
"""


KILLS = [(1, True), (2, False), (2, True), (3, False), (4, True)]


@pytest.mark.parametrize("call, during", [pytest.param(c, d, marks=[] if (c, d) == (2, False) else pytest.mark.slow)
                                          for c, d in KILLS],
                         ids=[f"write{c}-{'during' if d else 'before'}" for c, d in KILLS])
def test_a_kill_between_or_during_the_writes_of_a_save_loses_nothing(data, reference, tmp_path, call, during):
    """Writes 1 and 2 are the first validation's model_best.pth and checkpoint.pth; a kill before a write is a kill
    between two writes."""
    config = short_config(data, tmp_path).to_dict()
    code = CRASH.format(root=str(ROOT), call=call, during=during, config=config)
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=600).returncode == 9
    folder = tmp_path / "ckpt"
    assert any(p.name.endswith(io.TEMP_SUFFIX) for p in folder.iterdir())  # left behind by the kill
    if (folder / CHECKPOINT).exists():
        checkpoint = read_checkpoint(folder / CHECKPOINT)
        train(resume_config(checkpoint, {}, source="checkpoint"), resume=checkpoint)
    else:  # killed before the first checkpoint: start again (the folder holds no other run's checkpoint.pth)
        train(short_config(data, tmp_path), overwrite=True)
    assert_same_run(folder, reference)
    assert not any(p.name.endswith(io.TEMP_SUFFIX) for p in folder.iterdir())


# --------------------------------------------------------------------------- bounds and hostile text
def test_graph_sizes_are_bounded_before_building(tmp_path):
    assert graph_edges("full", 36) == 36 * 36 and graph_edges("knn:8", 36) == 36 * 17 and graph_edges("none", 9) == 0
    check_graph_size("full", 1000, "img_edges", "ims.npy")  # 10^6 edges: at the limit, allowed
    with pytest.raises(DataError, match=r"ims.npy has 10,000 nodes: img_edges=full would build 100,000,000 edges per "
                                        r"graph \(1.5 GiB of edge index alone"):
        check_graph_size("full", 10_000, "img_edges", "ims.npy")
    check_graph_size("knn:10", 10_000, "img_edges", "ims.npy")
    assert MAX_GRAPH_EDGES == 1_000_000


def test_a_byte_order_mark_is_not_part_of_the_first_caption_or_the_vocabulary(tmp_path):
    (tmp_path / "caps.txt").write_bytes("\ufeffa red cube\nblue ball\n".encode("utf-8"))
    assert read_lines(tmp_path / "caps.txt") == ["a red cube", "blue ball"]
    vocab = Vocabulary(["a", "red", "cube"])
    (tmp_path / "vocab.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(vocab.to_dict()).encode())
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded.word2idx == vocab.word2idx and loaded.encode("a red cube") == [1, 4, 5, 6, 2]
