"""The training loop: exact resume (also after Ctrl-C), learning on the built-in data, dry run, NaN policy, CLI errors."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from hsc_pyg.config import Config
from hsc_pyg.data.precomp import PrecompSplit
from hsc_pyg.data.synthetic import make_synthetic
from hsc_pyg.engine import train as train_module
from hsc_pyg.engine.checkpoint import load_checkpoint, read_checkpoint
from hsc_pyg.engine.scoring import evaluate
from hsc_pyg.engine.train import BEST, CHECKPOINT, resume_config, train
from hsc_pyg.errors import ConfigError, TrainingError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train as train_cli  # noqa: E402  (the command line at the project root)

TINY = dict(data_name="synthetic_precomp", embed_size=16, word_dim=8, sim_dim=8, img_layers=2, txt_layers=2,
            batch_size=8, vocab_threshold=1, val_step=1000, log_step=1, num_epochs=3, device="cpu", seed=3)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """10 train images (50 captions: 6 batches of 8 per epoch), 10 dev, 10 test; 16 regions x 16 features."""
    root = tmp_path_factory.mktemp("tiny")
    make_synthetic(root / "synthetic_precomp", num_train=10, num_dev=10, num_test=10, img_dim=16, num_regions=16)
    return root


def tiny_config(data: Path, run: Path, **changes) -> Config:
    return Config(data_path=str(data), model_name=str(run / "checkpoint"), logger_name=str(run / "log"),
                  **{**TINY, **changes})


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def resume(path: Path, **overrides):
    checkpoint = read_checkpoint(path)
    return resume_config(checkpoint, overrides, source=str(path)), checkpoint


# --------------------------------------------------------------------------- exact resume
def test_resume_mid_epoch_gives_the_same_parameters_and_loss_curve(tiny_data, tmp_path):
    steps = 14  # epochs of 6 batches: the second half crosses two epoch ends (validation, lr schedule)
    straight = train(tiny_config(tiny_data, tmp_path / "straight"), max_iters=steps)
    assert straight.iteration == steps and len(straight.losses) == steps

    first = train(tiny_config(tiny_data, tmp_path / "split"), max_iters=steps // 2)
    assert first.iteration == steps // 2 and first.epoch == 1  # stopped in the middle of epoch 1
    config, checkpoint = resume(tmp_path / "split" / "checkpoint" / CHECKPOINT)
    second = train(config, resume=checkpoint, max_iters=steps)

    assert first.losses + second.losses == straight.losses
    assert_same_state(parameters(second.model), parameters(straight.model))
    resumed, direct = (read_checkpoint(tmp_path / run / "checkpoint" / CHECKPOINT) for run in ("split", "straight"))
    assert resumed["best_rsum"] == direct["best_rsum"] and resumed["iteration"] == direct["iteration"] == steps
    assert_same_state(resumed["optimizer"]["state"][0], direct["optimizer"]["state"][0])


def test_the_checkpoint_counts_the_training_time_of_every_attempt(tiny_data, tmp_path):
    """checkpoint.pth's train_seconds: this attempt's wall time added to what the resumed checkpoint counted (the
    runner's killed attempts included); unknown (None) from then on after resuming a checkpoint that did not count."""
    path = tmp_path / "run" / "checkpoint" / CHECKPOINT
    started = time.perf_counter()
    first = train(tiny_config(tiny_data, tmp_path / "run"), max_iters=4)
    took = time.perf_counter() - started
    saved = read_checkpoint(path)["train_seconds"]
    assert 0 < saved <= first.train_seconds <= took

    config, checkpoint = resume(path)
    checkpoint["train_seconds"] = 1000.0           # as if earlier attempts had trained for 1,000 s
    started = time.perf_counter()
    second = train(config, resume=checkpoint, max_iters=8)
    took = time.perf_counter() - started
    assert 1000 < read_checkpoint(path)["train_seconds"] <= second.train_seconds <= 1000 + took

    config, checkpoint = resume(path)
    del checkpoint["train_seconds"]                # a checkpoint of a version that did not count
    third = train(config, resume=checkpoint, max_iters=10)
    assert third.iteration == 10 and third.train_seconds is None and read_checkpoint(path)["train_seconds"] is None


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    steps, stop_at = 10, 4
    straight = train(tiny_config(tiny_data, tmp_path / "straight"), max_iters=steps)

    calls = {"n": 0}

    class InterruptedLoss(train_module.ContrastiveLoss):
        def forward(self, scores, max_violation=None):
            calls["n"] += 1
            if calls["n"] == stop_at:  # Ctrl-C in the middle of a step: it must finish the step, then save
                os.kill(os.getpid(), signal.SIGINT)
            return super().forward(scores, max_violation)

    monkeypatch.setattr(train_module, "ContrastiveLoss", InterruptedLoss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_data, tmp_path / "split"), max_iters=steps)
    monkeypatch.undo()

    saved = read_checkpoint(tmp_path / "split" / "checkpoint" / CHECKPOINT)
    assert saved["iteration"] == stop_at
    config, checkpoint = resume(tmp_path / "split" / "checkpoint" / CHECKPOINT)
    rest = train(config, resume=checkpoint, max_iters=steps)
    assert rest.losses == straight.losses[stop_at:]
    assert_same_state(parameters(rest.model), parameters(straight.model))


def test_resume_refuses_to_change_the_architecture_but_takes_a_new_schedule(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path, lr_update=20), max_iters=2)
    with pytest.raises(ConfigError, match="--embed_size cannot change when resuming"):
        resume(tmp_path / "checkpoint" / CHECKPOINT, embed_size=32)
    # every ModelConfig field is compared, also those that shape only the scores (once missed: lambda_softmax, the
    # norms, the edges)
    for name, value in (("lambda_softmax", 4.0), ("no_imgnorm", True), ("img_edges", "knn:4"), ("txt_layer_dropout", 0.1)):
        with pytest.raises(ConfigError, match=f"^--{name} cannot change when resuming .*; start a new run"):
            resume(tmp_path / "checkpoint" / CHECKPOINT, **{name: value})
    config, checkpoint = resume(tmp_path / "checkpoint" / CHECKPOINT, lr_update=1, num_epochs=2)
    result = train(config, resume=checkpoint)
    saved = read_checkpoint(tmp_path / "checkpoint" / CHECKPOINT)
    assert (result.epoch, result.iteration) == (2, 12)
    assert saved["scheduler"]["step_size"] == 1
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(config.learning_rate * 0.01)


# --------------------------------------------------------------------------- it learns
def test_training_on_the_built_in_data_lowers_the_loss_and_raises_dev_rsum(tmp_path):
    make_synthetic(tmp_path / "synthetic_precomp", num_train=160, num_dev=50, num_test=2, img_dim=32, num_regions=16)
    config = tiny_config(tmp_path, tmp_path / "run", embed_size=64, word_dim=32, sim_dim=32, batch_size=32,
                         learning_rate=2e-3, num_epochs=8, lr_update=6, max_violation_after=4)
    dev = PrecompSplit.open(tmp_path, "synthetic_precomp", "dev")
    result = train(config)

    torch.manual_seed(config.seed)
    untrained = train_module.build_model(result.model.config)  # the run's initial weights (same seed)
    before = evaluate(untrained, dev, result.model.vocab)["rsum"]
    after = evaluate(load_checkpoint(tmp_path / "run" / "checkpoint" / BEST), dev)["rsum"]

    losses = [loss for _, loss in result.losses]
    per_epoch = len(losses) // config.num_epochs
    assert sum(losses[-per_epoch:]) < 0.5 * sum(losses[:per_epoch])
    assert after == pytest.approx(result.best_rsum)
    assert after > before + 100, (before, after)


# --------------------------------------------------------------------------- NaN policy
def nan_loss_at(step: int):
    calls = {"n": 0}

    class NaNLoss(train_module.ContrastiveLoss):
        def forward(self, scores, max_violation=None):
            calls["n"] += 1
            loss = super().forward(scores, max_violation)
            return loss * math.nan if calls["n"] == step else loss

    return NaNLoss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    train(tiny_config(tiny_data, tmp_path, val_step=3), max_iters=3)
    before = (tmp_path / "checkpoint" / CHECKPOINT).read_bytes()
    config, checkpoint = resume(tmp_path / "checkpoint" / CHECKPOINT)
    monkeypatch.setattr(train_module, "ContrastiveLoss", nan_loss_at(2))
    with pytest.raises(TrainingError, match=r"non-finite \(loss nan\) at epoch 0, iteration 5; training stopped and "
                                            r".*checkpoint.pth \(iteration 3\) is the last good checkpoint"):
        train(config, resume=checkpoint, max_iters=6)
    assert (tmp_path / "checkpoint" / CHECKPOINT).read_bytes() == before


def test_nan_loss_with_skip_drops_that_batch_only(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "ContrastiveLoss", nan_loss_at(2))
    result = train(tiny_config(tiny_data, tmp_path, nan_policy="skip"), max_iters=4)
    assert result.skipped == 1 and result.iteration == 4
    assert math.isnan(result.losses[1][1]) and all(math.isfinite(v) for _, v in result.losses[::2])
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# --------------------------------------------------------------------------- command line
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = train_cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_runs_one_batch_and_writes_nothing(tiny_data, tmp_path, capsys):
    code, out, err = cli(capsys, "--data_path", str(tiny_data), "--dry_run", "--model_name", str(tmp_path / "ck"),
                         "--logger_name", str(tmp_path / "log"), "--embed_size", "16", "--word_dim", "8",
                         "--sim_dim", "8", "--batch_size", "8", "--vocab_threshold", "1", "--device", "cpu")
    assert code == 0, err
    assert "dry run: one batch of 8 captions" in out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "log").exists()


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "many"], "argument --batch_size: invalid int value: 'many'"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--max_violation", "maybe"], "argument --max_violation: expected true or false, got 'maybe'"),
    (["--nan_policy", "ignore"], "nan_policy='ignore' is invalid: expected one of stop, skip"),
    (["--preset", "clip"], "preset='clip' is invalid: expected one of hsc, sgraf_saf, sgraf_sgr"),
    (["--batch_size", "0"], "batch_size=0 is invalid: expected an integer >= 1"),
    (["--batch_size", "51"], "--batch_size 51 is larger than the 50 captions"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
    (["--resume", "nowhere.pth"], "checkpoint nowhere.pth does not exist"),
    (["--config", "nowhere.json"], "config file nowhere.json does not exist"),
    (["--data_name", "missing_precomp"], "dataset folder"),
])
def test_bad_flags_give_one_line_errors_and_status_2(tiny_data, tmp_path, capsys, argv, message):
    code, out, err = cli(capsys, "--data_path", str(tiny_data), "--model_name", str(tmp_path / "ck"),
                         "--logger_name", str(tmp_path / "log"), "--dry_run", *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert "Traceback" not in err


def test_refuses_a_folder_with_checkpoints_unless_overwrite(tiny_data, tmp_path, capsys):
    args = ["--config", str(tmp_path / "tiny.json"), "--max_iters", "1", "--no_progress"]
    tiny_config(tiny_data, tmp_path).save(tmp_path / "tiny.json")
    assert cli(capsys, *args)[0] == 0
    before = (tmp_path / "checkpoint" / CHECKPOINT).read_bytes()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already holds checkpoint.pth" in err and "--overwrite" in err
    assert (tmp_path / "checkpoint" / CHECKPOINT).read_bytes() == before
    assert cli(capsys, *args, "--overwrite")[0] == 0
    saved = Config.load(tmp_path / "checkpoint" / "config.json")
    assert (saved.img_dim, saved.num_regions, saved.vocab_size) == (16, 16, len(read_checkpoint(
        tmp_path / "checkpoint" / CHECKPOINT)["vocab"]["word2idx"]))


def test_help_explains_every_option(capsys):
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for flag in ("--resume", "--dry_run", "--overwrite", "--config", "--max_violation_after", "--val_step",
                 "--logger_name", "--model_name", "--lr_update", "--img_gnn", "--amp", "--nan_policy"):
        assert flag in out
    assert "hardest negative (VSE++)" in out and "(default: 128)" in out


def test_validation_scores_the_first_val_images_dev_images(tiny_data, tmp_path, monkeypatch):
    """--val_images N: each validation encodes and scores the first N dev images (and their 5 N captions)."""
    import hsc_pyg.engine.train as train_module
    seen = []
    real = train_module.evaluate

    def recording(model, split, vocab, max_images=None, **kwargs):
        seen.append(max_images)
        return real(model, split, vocab, max_images=max_images, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", recording)
    train(tiny_config(tiny_data, tmp_path / "run", val_images=4, num_epochs=1))
    assert seen == [4]
    assert Config(val_images=1000).val_images == 1000 and Config().val_images == 1000
    with pytest.raises(ConfigError, match=r"val_images"):
        Config(val_images=0)
