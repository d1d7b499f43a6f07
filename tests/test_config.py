"""Configurations: one check of every value whatever its source, presets, the flags built from the dataclasses, the
model built from its ModelConfig alone, and the one registry."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hsc_pyg.config import (PRESETS, Config, DataConfig, ModelConfig, TrainConfig, add_config_arguments,
                            config_from_args, model_differences)
from hsc_pyg.engine.checkpoint import convert_official
from hsc_pyg.errors import ConfigError
from hsc_pyg.nn.model import HSCModel, build_model
from hsc_pyg.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_dim=10, vocab_size=20, embed_size=16, word_dim=8, sim_dim=8, num_regions=6)


def parse(argv, config_file=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=config_file or "")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_the_shipped_configs_load(path):
    config = Config.load(path)
    assert config.preset == json.loads(path.read_text())["preset"] and config.img_layers == 4


def test_fields_are_split_by_what_they_shape():
    config = Config(**SMALL, batch_size=32, data_name="coco_precomp")
    assert (config.model.embed_size, config.train.batch_size, config.data.data_name) == (16, 32, "coco_precomp")
    assert config.embed_size == 16 and config.replace(lambda_softmax=4.0).model.lambda_softmax == 4.0
    assert Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^x\.json: unknown option\(s\) embed_sise; see --help"):
        Config.from_dict({"embed_sise": 3}, source="x.json")
    with pytest.raises(AttributeError):
        config.model.embed_size = 3   # frozen: a model's config cannot drift from its weights


def test_a_preset_sets_its_fields_unless_given():
    assert (ModelConfig(preset="sgraf_sgr").img_layers, ModelConfig(preset="sgraf_sgr").head) == (0, "sgr")
    assert ModelConfig(img_layers=2).txt_layers == 4
    with pytest.raises(ConfigError, match=r"^preset='sgraf_saf' with img_layers=2 is not sgraf_saf"):
        ModelConfig(preset="sgraf_saf", img_layers=2)
    with pytest.raises(ConfigError, match=r"^preset='hsc' with img_layers=0 and txt_layers=0 has no relational "
                                          r"layers: that is --preset sgraf_saf$"):
        ModelConfig(img_layers=0, txt_layers=0)


def test_flags_over_a_config_file_and_a_preset_typed_over_it(tmp_path):
    path = tmp_path / "c.json"
    Config(**SMALL, batch_size=8).save(path)
    assert parse(["--embed_size", "32"], path).model == ModelConfig(**{**SMALL, "embed_size": 32})
    config = parse(["--preset", "sgraf_sgr", "--sgr_step", "2"], path)
    assert (config.img_layers, config.head, config.sgr_step, config.batch_size) == (0, "sgr", 2, 8)
    assert parse(["--no_imgnorm", "true"]).no_imgnorm is True


@pytest.mark.parametrize("values, message", [
    (dict(embed_size=0), r"embed_size=0 is invalid: expected an integer >= 1$"),
    (dict(embed_size="32"), r"embed_size='32' is invalid: expected an integer >= 1$"),
    (dict(embed_size=32.0), r"embed_size=32\.0 is invalid: expected an integer >= 1$"),
    (dict(batch_size=None), r"batch_size=None is invalid: expected an integer >= 1$"),
    (dict(no_txtnorm=1), r"no_txtnorm=1 is invalid: expected true or false$"),
    (dict(max_violation="yes"), r"max_violation='yes' is invalid: expected true or false$"),
    (dict(img_layers=True), r"img_layers=True is invalid: expected an integer >= 0$"),
    (dict(margin=float("nan")), r"margin=nan is invalid: expected a finite number >= 0\.0$"),
    (dict(grad_clip=float("inf")), r"grad_clip=inf is invalid: expected a finite number >= 0\.0$"),
    (dict(lambda_softmax=float("-inf")), r"lambda_softmax=-inf is invalid"),
    (dict(sa_dropout=1.0), r"sa_dropout=1\.0 is invalid: expected a finite number >= 0\.0 and < 1\.0$"),
    (dict(img_layer_heads=0), r"img_layer_heads=0 is invalid: expected an integer >= 1 \(or null"),
    (dict(amp="fp8"), r"amp='fp8' is invalid: expected one of off, bf16, fp16$"),
    (dict(align_levels="higher,top"), r"align_levels='higher,top' is invalid: expected a comma-separated subset"),
    (dict(txt_edges="knn:3"), r"txt_edges: txt_edges='knn:3' applies to region graphs only"),
    (dict(vocab_threshold=0), r"vocab_threshold=0 is invalid: expected an integer >= 1$"),
])
def test_every_value_is_checked_once_whatever_its_source(values, message, tmp_path):
    with pytest.raises(ConfigError, match="^" + message):
        Config(**{**SMALL, **values})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(values, allow_nan=True))
    with pytest.raises(ConfigError, match=f"^{path}: " + message):
        Config.load(path)


def test_an_official_opt_goes_through_the_same_checks():
    opt = argparse.Namespace(img_dim=10, embed_size="16", word_dim=8, sim_dim=8, vocab_size=20)
    with pytest.raises(ConfigError, match=r"^old\.pth \(opt\): embed_size='16' is invalid: expected an integer >= 1$"):
        convert_official({"opt": opt, "model": [{}, {}, {}]}, source="old.pth")


def test_the_model_takes_its_model_config_only():
    config = Config(**SMALL, score_chunk_mb=64)
    model = build_model(config)
    assert model.config == config.model and not hasattr(model, "score_chunk_mb")   # a run option, not the model's
    with pytest.raises(TypeError, match="HSCModel takes a ModelConfig, found Config"):
        HSCModel(config)
    other = ModelConfig(**{**SMALL, "lambda_softmax": 4.0, "no_imgnorm": True})
    assert model_differences(config.model, other) == ["lambda_softmax", "no_imgnorm"]


def test_the_parameter_estimate_is_close_to_the_real_count():
    for values in (SMALL, {**SMALL, "preset": "sgraf_sgr"}, {**SMALL, "gru_layers": 2, "txt_gnn": "gat"}):
        real = build_model(ModelConfig(**values)).num_parameters()
        assert 0.8 < ModelConfig(**values).parameter_estimate() / real < 1.25, values


def test_one_registry_error_path_and_declared_capabilities():
    things = Registry("thing")

    @things.register("plain", fast=True)
    class Plain:
        slow = True

        def __init__(self, size: int, scale: float = 1.0):
            self.size, self.scale = size, scale

    assert things.build("plain", 3, scale=2.0).scale == 2.0 and Plain.registry_name == "plain"
    assert (things.capability("plain", "fast"), things.capability("plain", "slow"),
            things.capability("plain", "other", 5)) == (True, True, 5)
    with pytest.raises(ConfigError, match=r"^unknown thing 'plian'; choose one of plain$"):
        things.get("plian")
    with pytest.raises(ConfigError, match=r"^thing 'plain' cannot take shift; it accepts scale$"):
        things.build("plain", 3, shift=1)
    with pytest.raises(ValueError, match="thing 'plain' is already registered"):
        things.register("plain")(Plain)


def test_parts_are_dataclasses_of_their_own():
    assert {f for f in DataConfig.__dataclass_fields__} == {"data_path", "data_name", "vocab_path", "vocab_threshold",
                                                            "word_vectors"}
    assert "score_chunk_mb" in TrainConfig.__dataclass_fields__ and "img_edges" in ModelConfig.__dataclass_fields__
    assert set(PRESETS) == {"hsc", "sgraf_saf", "sgraf_sgr"}
