"""Every value checked once, at construction of its configuration class, and every flag of train / evaluate / search
generated from those classes: a bad value is one line (status 2) before any work, whichever command it reaches."""
from __future__ import annotations

from dataclasses import fields

import pytest

from hsc_pyg.cli import evaluate as evaluate_cli, search as search_cli, synthetic as synthetic_cli
from hsc_pyg.cli import train as train_cli
from hsc_pyg.config import PARTS, EvaluateConfig, ModelConfig, SearchConfig, TrainConfig
from hsc_pyg.errors import ConfigError


@pytest.mark.parametrize("build, message", [
    (lambda: ModelConfig(head="xyz"), r"^head='xyz': unknown similarity head 'xyz'; choose one of saf, sgr$"),
    (lambda: TrainConfig(device="gpu7"), r"^device='gpu7' is not a device; use auto, cpu or cuda\[:N\]$"),
    (lambda: TrainConfig(seed=10**30), r"^seed=10{30} is invalid: expected an integer >= 0 and < 4294967296$"),
    (lambda: TrainConfig(workers=-1), r"^workers=-1 is invalid"),
    (lambda: EvaluateConfig(models=("m.pth",), batch_size=0), r"^batch_size=0 is invalid"),
    (lambda: EvaluateConfig(), r"^nothing to evaluate"),
    (lambda: EvaluateConfig(models=("m.pth",), rerank_k=(5, 0)), r"^rerank_k: 0 is invalid: expected an integer >= 1$"),
    (lambda: EvaluateConfig(models=("m.pth",), device="gpu"), r"^device='gpu' is not a device"),
    (lambda: SearchConfig(model="m.pth", query="a dog", k=0), r"^k=0 is invalid"),
    (lambda: SearchConfig(model="m.pth", query="   "), r"^--query is empty"),
    (lambda: SearchConfig(model="m.pth"), r"^give exactly one of --query"),
    (lambda: SearchConfig(model="m.pth", query="a dog", sheet="s.png"), r"^--sheet s\.png draws the photos of "),
])
def test_a_configuration_refuses_a_bad_value_at_construction(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_a_list_given_for_a_tuple_field_is_kept_as_a_tuple():
    config = EvaluateConfig(models=["a.pth", "b.pth"], rerank_k=[5, 10])
    assert config.models == ("a.pth", "b.pth") and config.rerank_k == (5, 10)
    assert config == EvaluateConfig(models=("a.pth", "b.pth"), rerank_k=(5, 10))


@pytest.mark.parametrize("cli, config_classes", [(train_cli, PARTS.values()), (evaluate_cli, [EvaluateConfig]),
                                                 (search_cli, [SearchConfig])])
def test_every_field_is_a_flag_of_its_command(cli, config_classes):
    dests = {action.dest for action in cli.build_parser()._actions}
    assert {f.name for cls in config_classes for f in fields(cls)} <= dests


@pytest.mark.parametrize("cli, argv, message", [
    (evaluate_cli, ["--model", "missing.pth", "--workers", "-1"], "error: workers=-1 is invalid"),
    (evaluate_cli, ["--model", "missing.pth", "--seed", "1"], "hsc-pyg evaluate: error: unrecognized arguments"),
    (evaluate_cli, ["--model", "missing.pth", "--amp", "fp8"], "error: amp='fp8' is invalid: expected one of off"),
    (train_cli, ["--seed", str(10**30)], "error: seed=1000000000000000000000000000000 is invalid"),
    (train_cli, ["--device", "gpu7"], "error: device='gpu7' is not a device"),
    (train_cli, ["--max_iters", "-1"], "hsc-pyg train: error: argument --max_iters: expected an integer >= 0"),
    (search_cli, ["--model", "missing.pth", "--query", "a dog", "--k", "0"], "error: k=0 is invalid"),
    (synthetic_cli, ["--seed", str(10**30)], "hsc-pyg synthetic: error: argument --seed: expected an integer >= 0"),
])
def test_a_bad_flag_is_one_line_and_status_2_before_any_work(cli, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # a checkpoint or data folder that does not exist is never reached
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []
