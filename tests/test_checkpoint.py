"""Checkpoint safety and robustness: untrusted files are refused with one-line reasons; saving is atomic."""
from __future__ import annotations

import argparse
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import json
from pathlib import Path

import pytest
import torch

from hsc_pyg import load_checkpoint
from hsc_pyg.config import Config, ModelConfig
from hsc_pyg.engine.checkpoint import (allow_namespace, read_checkpoint, run_config_of, save_checkpoint,
                                      upgrade_v1)
from hsc_pyg.errors import CheckpointError, HSCError
from hsc_pyg.nn.model import build_model

SMALL = dict(img_dim=10, vocab_size=20, embed_size=16, word_dim=8, sim_dim=8, num_regions=6)


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(Config(**{**SMALL, **kw}))


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the hostile file uses protocol 4 on purpose
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        torch.save({"model": _CreatesFile(str(marker))}, f)
    marker.unlink(missing_ok=True)  # torch.save itself does not run __reduce__'s callable; make sure
    with pytest.raises(CheckpointError, match=r"evil\.pth was refused: it needs code outside the safe list"):
        load_checkpoint(evil)
    assert not marker.exists()
    raw = tmp_path / "evil_raw.pkl"
    raw.write_bytes(pickle.dumps(_CreatesFile(str(marker))))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_namespace_is_allowed_only_while_a_checkpoint_is_read(shared_dir, tmp_path):
    """Official checkpoints need ``argparse.Namespace`` unpickled; torch's safe list is as it was afterwards, also when
    the read fails inside."""
    before = set(torch.serialization.get_safe_globals())
    with allow_namespace():
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert read_checkpoint(shared_dir / "fixtures" / "reference" / "lhsc.pth.tar")["converted_from"].startswith("official")
    evil = tmp_path / "evil.pth"
    torch.save({"model": _CreatesFile(str(tmp_path / "pwned.txt"))}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(evil)
    assert set(torch.serialization.get_safe_globals()) == before and argparse.Namespace not in before


@pytest.mark.parametrize("content, message", [
    (b"", r"not a readable PyTorch checkpoint"),
    (os.urandom(4096), r"not a readable PyTorch checkpoint"),
    (b"this is a text file, not a checkpoint\n", r"not a readable PyTorch checkpoint"),
])
def test_garbage_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint(path, tiny_model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    other = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "arch": "resnet50"}, other)
    with pytest.raises(CheckpointError, match=r"neither an hsc_pyg nor an official SGRAF/HSC checkpoint \(top-level keys: arch, state_dict\)"):
        load_checkpoint(other)


def test_weights_that_do_not_fit_the_config(tmp_path):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model())
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["embed_size"] = 32
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"weights do not fit the model its config describes"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["model_config"].update(embed_size=0), r"m\.pth: embed_size=0 is invalid: expected an integer >= 1$"),
    (lambda c: c["model_config"].update(embed_size="16"), r"m\.pth: embed_size='16' is invalid: expected an integer"),
    (lambda c: c["model_config"].update(embed_size=2**40),
     r"m\.pth: the model would need about [0-9.e+]+ GiB of float32 weights \(embed_size=1099511627776, .*\), more "
     r"than this machine's [0-9.]+ GiB of memory; lower the sizes$"),
    (lambda c: c["model_config"].update(lambda_softmax=float("nan")), r"lambda_softmax=nan is invalid"),
    (lambda c: c.pop("model_config"), r"m\.pth: 'model_config' must be a dict but the checkpoint holds nothing; the "
                                      r"file is damaged"),
    (lambda c: c.update(model_config=[1, 2]), r"m\.pth: 'model_config' must be a dict but the checkpoint holds a "
                                              r"list"),
    (lambda c: c.update(model=[1, 2]), r"m\.pth: 'model' must be a dict but the checkpoint holds a list"),
])
def test_damaged_configs_in_a_checkpoint_are_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model(), Config(**SMALL))
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(HSCError, match=message) as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_damaged_train_config_stops_a_resume_but_not_loading_the_model(tmp_path):
    """The model is built from its model config alone (no run option of the train config reaches it); the train
    config is checked where a resume reads it."""
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model(), Config(**SMALL))
    ckpt = torch.load(path, weights_only=True)
    ckpt["train_config"] = {"score_chunk_mb": -5}
    torch.save(ckpt, path)
    assert load_checkpoint(path).config == Config(**SMALL).model
    with pytest.raises(HSCError, match=r"m\.pth: train_config: score_chunk_mb=-5 is invalid") as err:
        run_config_of(read_checkpoint(path), str(path))
    assert "\n" not in str(err.value)


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_checkpoint_written_by_the_flat_config_code_loads_with_the_same_scores():
    # written by commit 7831cd1 (one flat "config" dict, version 1): a 2-iteration run with lambda_softmax 4, knn:2 /
    # window:2 edges, hsc_text dropout 0.1; the JSON holds the scores that code gave on fixed inputs
    expected = json.loads((FIXTURES / "v1_checkpoint.json").read_text())
    model = load_checkpoint(FIXTURES / "v1_checkpoint.pth")
    assert isinstance(model.config, ModelConfig)
    assert (model.config.lambda_softmax, model.config.img_edges, model.config.txt_edges) == (4.0, "knn:2", "window:2")
    assert (model.config.txt_layer_dropout, model.config.img_layers, model.config.txt_layers) == (0.1, 1, 1)
    images = torch.randn(*expected["images_shape"], generator=torch.Generator().manual_seed(expected["images_seed"]))
    sims = model.similarity_matrix(images, expected["captions"])
    torch.testing.assert_close(sims, torch.tensor(expected["scores"]), rtol=0, atol=1e-6)
    run = run_config_of(read_checkpoint(FIXTURES / "v1_checkpoint.pth"))
    assert (run.batch_size, run.vocab_threshold, run.model) == (8, 1, model.config)


def test_flat_config_upgrade_drops_the_dropout_a_layer_never_received():
    flat = {**Config(**SMALL, txt_gnn="gcn").to_dict(), "txt_layer_dropout": 0.3}
    upgraded = upgrade_v1({"format": "hsc_pyg", "version": 1, "config": flat, "model": {}})
    assert upgraded["model_config"]["txt_layer_dropout"] is None and "config" not in upgraded
    assert upgraded["version"] == 2 and upgraded["train_config"]["batch_size"] == 128


def test_roundtrip_keeps_weights_and_state(tmp_path):
    model = tiny_model(preset="sgraf_sgr", head="sgr", img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, epoch=3, best_rsum=12.5)
    again = load_checkpoint(path)
    assert again.config == model.config and not again.training
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


WRITER = textwrap.dedent("""
    import sys, torch
    from hsc_pyg.config import Config
    from hsc_pyg.engine.checkpoint import save_checkpoint
    from hsc_pyg.nn.model import build_model
    model = build_model(Config(img_dim=10, vocab_size=20, embed_size=256, word_dim=8, sim_dim=8, num_regions=6))
    print("ready", flush=True)
    while True:
        save_checkpoint(sys.argv[1], model, blob=torch.randn(4_000_000))
""")


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    first = tiny_model()
    save_checkpoint(path, first, epoch=1)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # several saves of ~16 MB are under way
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    model = load_checkpoint(path)  # whichever complete version is there, it loads
    assert model.config.embed_size in (16, 256)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pth"]
    assert all(name.endswith(".hsc-tmp") for name in leftovers), leftovers  # only the killed writer's temporary file
    save_checkpoint(path, first, epoch=2)  # the next save removes the dead writer's temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
