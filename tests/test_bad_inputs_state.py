"""Bad inputs and faults that need more than a command line to set up, in-process: a full disk under memory-mapped
outputs and under a lock file, a multi-gigabyte file of zeros as a checkpoint, a rename that fails half-way through a
set of files, damaged run records of the ablation runner, resuming on other data, deeply nested JSON. Each one gives a
one-line error (or the documented recovery) and leaves every file that existed before as it was.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hsc_pyg import io
from hsc_pyg.config import Config
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.engine.checkpoint import read_checkpoint
from hsc_pyg.engine.train import CHECKPOINT, resume_config, train
from hsc_pyg.errors import CheckpointError, ConfigError, DataError, OutputError
from corpus import snapshot

NAME = "synthetic_precomp"
SMALL = dict(img_dim=8, num_regions=16, embed_size=16, word_dim=8, sim_dim=8, img_layers=1, txt_layers=1)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("text, depth", [("{}", 1), ('{"a": [1, {"b": "[[[["}]}', 3), ('["\\"[", [[]]]', 3),
                                         ("12", 0), ("[" * 5000 + "]" * 5000, 5000)])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert io.json_depth(text) == depth


def test_a_json_file_nested_deeper_than_the_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * (io.MAX_JSON_DEPTH + 1) + "]" * (io.MAX_JSON_DEPTH + 1))
    with pytest.raises(DataError, match=rf"nests {io.MAX_JSON_DEPTH + 1} levels deep"):
        io.read_json(path, "thing", "fix it")
    path.write_text("[" * io.MAX_JSON_DEPTH + "]" * io.MAX_JSON_DEPTH)
    assert io.read_json(path, "thing", "fix it") == json.loads(path.read_text())


def test_an_ablation_grid_nested_200000_deep_is_one_line(tmp_path):
    from hsc_pyg.engine.ablation import load_grid

    path = tmp_path / "grid.json"
    path.write_text('{"configs": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ConfigError, match=r"^grid \S+ nests 200,001 levels deep, .* so it was not read$") as e:
        load_grid(path)
    one_line(e.value)


# --------------------------------------------------------------------------- checkpoints
def test_a_2_gb_file_of_zeros_as_checkpoint_is_refused_from_its_first_bytes(tmp_path):
    path = tmp_path / "zeros.pth"
    with open(path, "wb") as f:
        f.truncate(2 * 2**30)  # sparse: nothing is written
    with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint \(starts with bytes 00 00 00 00, "
                                              r"not a zip archive or a pickle\); re-download or re-save it$") as e:
        read_checkpoint(path)
    one_line(e.value)


def test_the_hostile_pickle_is_told_apart_from_damage_by_its_bytes_not_torchs_wording(tmp_path, monkeypatch):
    """Whatever torch's message says, a well-formed pickle refused by the safe unpickler is "may be malicious" and a
    broken one is "not readable"."""
    import pickle

    import torch

    class Reopen:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"model": Reopen()}, tmp_path / "evil.pth")

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("some future wording")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match=r"evil.pth was refused: .*\((io|builtins|__builtin__).open\); it may be "
                                              r"malicious"):
        read_checkpoint(tmp_path / "evil.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x02\xff\xfe not pickle opcodes")  # a pickle's first bytes, then damage
    with pytest.raises(CheckpointError, match=r"broken.pth is not a readable PyTorch checkpoint \(truncated or corrupt "
                                              r"pickle data\)"):
        read_checkpoint(broken)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- locks
def test_a_full_disk_when_writing_the_lock_is_one_line_and_leaves_no_lock_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", no_space)
    with pytest.raises(OutputError, match=r"^cannot write the lock file \S+/new/.hsc_pyg.lock \(No space left on "
                                          r"device\); free disk space or choose another --out$"):
        io.FolderLock.acquire(tmp_path / "new")
    assert not (tmp_path / "new").exists()          # created for the lock, removed with it
    (tmp_path / "old").mkdir()
    with pytest.raises(OutputError):
        io.FolderLock.acquire(tmp_path / "old")
    assert list((tmp_path / "old").iterdir()) == []  # no 0-byte lock left behind


def test_the_lock_names_its_holder_and_goes_with_it(tmp_path):
    with io.FolderLock.acquire(tmp_path / "out") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and "command" in holder
        if Path("/proc/self/cmdline").exists():      # the command this process was started with (pytest here)
            assert "pytest" in holder["command"]
        with pytest.raises(ConfigError, match=rf"out is in use by another process \(pid {os.getpid()} on .*; wait "
                                              r"for it to end or stop it, or choose another --out$"):
            io.FolderLock.acquire(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- full disks on memory-mapped outputs
def test_a_full_disk_under_a_memory_mapped_output_is_one_line_before_any_row(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutputError, match=r"^cannot write \S+a.npy \(No space left on device\); the previous file, "
                                          r"if any, is intact; free disk space or choose another path$"):
        io.create_npy(tmp_path / "a.npy", np.float16, (1000, 36, 8))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_extracting_features_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    pytest.importorskip("efficientnet_lite_pytorch")
    from PIL import Image

    from hsc_pyg.features import extract_features

    (tmp_path / "photos").mkdir()
    for n in range(2):
        Image.new("RGB", (40, 40), (n * 90, 20, 200)).save(tmp_path / "photos" / f"{n}.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutputError, match=r"test_ims.npy.partial \(No space left on device\)"):
        extract_features(tmp_path / "photos", tmp_path / "out", "test", size=32, grid=2, pretrained=False)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_a_full_disk_while_caching_a_gallery_leaves_no_folder(tmp_path, monkeypatch):
    import torch

    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.data.vocab import build_vocab
    from hsc_pyg.engine.retrieval import open_gallery
    from hsc_pyg.nn.model import build_model

    make_synthetic(tmp_path / "data" / NAME, num_train=2, num_dev=2, num_test=3, img_dim=8, num_regions=16)
    split = PrecompSplit.open(tmp_path / "data", NAME, "test")
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=len(build_vocab(split.captions, threshold=1)), **SMALL))
    model.vocab = build_vocab(split.captions, threshold=1)
    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutputError, match=r"img_regions.npy \(No space left on device\)"):
        open_gallery(model, split, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]   # no temporary folder left


def test_a_gallery_cache_whose_ids_are_fewer_than_its_rows_is_refused(tmp_path):
    import torch

    from hsc_pyg.data.precomp import PrecompSplit
    from hsc_pyg.data.vocab import build_vocab
    from hsc_pyg.engine.retrieval import CacheError, open_gallery
    from hsc_pyg.nn.model import build_model

    make_synthetic(tmp_path / "data" / NAME, num_train=2, num_dev=2, num_test=3, img_dim=8, num_regions=16)
    split = PrecompSplit.open(tmp_path / "data", NAME, "test")
    torch.manual_seed(0)
    model = build_model(Config(vocab_size=len(build_vocab(split.captions, threshold=1)), **SMALL))
    model.vocab = build_vocab(split.captions, threshold=1)
    open_gallery(model, split, cache=tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "gallery.json").read_text())
    meta["ids"] = meta["ids"][:-1]
    (tmp_path / "cache" / "gallery.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"gallery.json is damaged: its 'ids' holds 2 entries for 3 rows; pass "
                                         r"--rebuild"):
        open_gallery(model, split, cache=tmp_path / "cache")


# --------------------------------------------------------------------------- files written as one unit
def test_a_set_of_files_whose_last_rename_fails_leaves_every_old_file(tmp_path):
    (tmp_path / "S.npy").write_bytes(b"old matrix")
    (tmp_path / "S.npy.json").mkdir()               # in the way of the second file
    with pytest.raises(OutputError, match=r"cannot write \S+S.npy.json"):
        io.atomic_files({tmp_path / "S.npy": lambda f: f.write(b"new matrix"),
                         tmp_path / "S.npy.json": lambda f: f.write(b"{}")})
    assert (tmp_path / "S.npy").read_bytes() == b"old matrix"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.npy", "S.npy.json"]
    (tmp_path / "new.npy.json").mkdir()
    with pytest.raises(OutputError):
        io.atomic_files({tmp_path / "new.npy": lambda f: f.write(b"x"), tmp_path / "new.npy.json": lambda f: None})
    assert not (tmp_path / "new.npy").exists()


# --------------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny dataset and a run of 2 iterations on it."""
    root = tmp_path_factory.mktemp("resume")
    make_synthetic(root / "data" / NAME, num_train=6, num_dev=4, num_test=4, img_dim=8, num_regions=16)
    train(Config(data_path=str(root / "data"), data_name=NAME, model_name=str(root / "run"), batch_size=5,
                 logger_name=str(root / "run" / "log"), vocab_threshold=1, device="cpu", **SMALL), max_iters=2)
    return root


def test_resuming_on_other_data_is_refused_unless_asked(run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run, root)                       # the same data elsewhere is the same data
    checkpoint = read_checkpoint(root / "run" / CHECKPOINT)
    config = resume_config(checkpoint, {"data_path": str(root / "data"), "model_name": str(root / "run"),
                                        "logger_name": str(root / "run" / "log")}, source="ckpt")
    assert set(checkpoint["data_fingerprint"]) == {"train", "dev"}
    caps = root / "data" / NAME / "train_caps.txt"
    caps.write_text(caps.read_text().replace("\n", " .\n", 1))
    before = snapshot(root)
    with pytest.raises(ConfigError, match=r"^the checkpoint was trained on other data than the data found now "
                                          r"\(train_caps.txt changed\); .* pass --other_data") as e:
        train(config, resume=checkpoint, max_iters=3)
    one_line(e.value)
    assert snapshot(root) == before
    result = train(config, resume=checkpoint, max_iters=3, other_data=True)
    assert result.iteration == 3


# --------------------------------------------------------------------------- the ablation runner's records
@pytest.mark.parametrize("content, why", [(b'{"config": {}, "seed": 0, "test_r', "Unterminated string"),
                                         (b'{"config": {}, "seed": 0}', "no test_rsum"),
                                         (b"[1, 2]", "holds a list"),
                                         (b'{"config": {}, "seed": 0, "test_rsum": "high"}', "not a number")])
def test_a_damaged_run_record_is_evaluated_again_with_a_warning(tmp_path, content, why, capsys):
    from hsc_pyg.cli.ablate import _finished
    from hsc_pyg.engine.ablation import read_record

    folder = tmp_path / "hsc" / "seed0"
    folder.mkdir(parents=True)
    (folder / "run.json").write_bytes(content)
    record, reason = read_record(folder / "run.json")
    assert record is None and why in reason

    class Run:
        name, seed, options = "hsc", 0, {}

    Run.folder = folder
    assert _finished([Run()], []) == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder / 'run.json'} is damaged" in err and "evaluated again" in err
