"""One dataclass of every option. Defaults are the paper's (HSC README / SGRAF opts.py, see MODEL.md).

The command lines build their ``argparse`` parsers from :func:`add_config_arguments`, so a flag, its default and its
help text are written once, here. Presets (``hsc``, ``sgraf_saf``, ``sgraf_sgr``) are named overrides of these fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

LEVELS = ("object", "relational", "higher")


@dataclass
class Config:
    # ---- data ----
    data_path: str = field(default="data", metadata={"help": "folder that holds <data_name>/"})
    data_name: str = field(default="synthetic_precomp", metadata={"help": "f30k_precomp, coco_precomp, flickr8k_mini_precomp or synthetic_precomp"})
    vocab_path: str = field(default="", metadata={"help": "vocabulary JSON (SCAN format); built from the train split when empty or absent"})
    vocab_threshold: int = field(default=4, metadata={"help": "minimum train count for a word to enter a built vocabulary"})
    img_edges: str = field(default="full", metadata={"help": "region-graph edges: full, knn:K, spatial, none"})
    txt_edges: str = field(default="full", metadata={"help": "word-graph edges: full, window:K, none"})
    # ---- model ----
    preset: str = field(default="hsc", metadata={"help": "hsc, sgraf_saf or sgraf_sgr (sets the fields below unless given)"})
    img_dim: int = field(default=0, metadata={"help": "region feature size; 0 = read from the data"})
    num_regions: int = field(default=36, metadata={"help": "regions per image (VisualSA's BatchNorm is over this axis)"})
    vocab_size: int = field(default=0, metadata={"help": "set from the vocabulary"})
    embed_size: int = field(default=1024, metadata={"help": "joint embedding size d"})
    word_dim: int = field(default=300, metadata={"help": "word embedding size"})
    sim_dim: int = field(default=256, metadata={"help": "alignment vector size m"})
    img_gnn: str = field(default="hsc", metadata={"help": "layer type of the region graph (see hsc_pyg.nn.layers.LAYERS)"})
    txt_gnn: str = field(default="hsc_text", metadata={"help": "layer type of the word graph"})
    img_layers: int = field(default=4, metadata={"help": "relational layers on the region graph"})
    txt_layers: int = field(default=4, metadata={"help": "relational layers on the word graph"})
    head: str = field(default="saf", metadata={"help": "similarity head: saf or sgr"})
    sgr_step: int = field(default=3, metadata={"help": "reasoning steps of the sgr head"})
    lambda_softmax: float = field(default=9.0, metadata={"help": "inverse temperature of the word-to-region attention"})
    word_dropout: float = field(default=0.4, metadata={"help": "dropout after the word embedding"})
    sa_dropout: float = field(default=0.4, metadata={"help": "dropout inside VisualSA / TextSA"})
    txt_layer_dropout: float = field(default=0.0, metadata={"help": "dropout inside the hsc_text blocks (drop_out in the original)"})
    gru_layers: int = field(default=1, metadata={"help": "GRU layers of the text encoder"})
    no_imgnorm: bool = field(default=False, metadata={"help": "skip the l2norm of region states"})
    no_txtnorm: bool = field(default=False, metadata={"help": "skip the l2norm of word states"})
    first_stage_dim: int = field(default=0, metadata={"help": "size of the first stage's retrieval vectors: 0 = the global vectors themselves, else a learned projection to this size"})
    align_levels: str = field(default="higher", metadata={"help": "comma-separated levels to align and fuse: object, relational, higher"})
    # ---- training ----
    batch_size: int = field(default=128, metadata={"help": "captions (with their images) per step"})
    num_epochs: int = field(default=50, metadata={"help": "epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "Adam learning rate"})
    lr_update: int = field(default=20, metadata={"help": "multiply the learning rate by 0.1 every this many epochs"})
    grad_clip: float = field(default=2.0, metadata={"help": "clip the gradient norm at this value (0 = off)"})
    margin: float = field(default=0.2, metadata={"help": "hinge margin"})
    max_violation: bool = field(default=True, metadata={"help": "hardest negative (VSE++) instead of the sum of violations"})
    max_violation_after: int = field(default=0, metadata={"help": "warm-up: sum of violations for this many epochs, then the hardest negative"})
    val_step: int = field(default=1000, metadata={"help": "validate every this many iterations (and at each epoch end)"})
    log_step: int = field(default=10, metadata={"help": "log to TensorBoard every this many iterations"})
    workers: int = field(default=0, metadata={"help": "data loader worker processes"})
    logger_name: str = field(default="runs/run/log", metadata={"help": "TensorBoard folder"})
    model_name: str = field(default="runs/run/checkpoint", metadata={"help": "checkpoint folder (model_best.pth, checkpoint.pth)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (slower)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]"})
    amp: str = field(default="off", metadata={"help": "autocast: off, bf16 or fp16 (GPU)"})
    itc_weight: float = field(default=0.0, metadata={"help": "weight of the first stage's contrastive loss added to the hinge loss (0 = the papers' loss exactly)"})
    itc_loss: str = field(default="infonce", metadata={"help": "the first stage's loss: infonce (learned temperature, as CLIP/ALBEF) or hinge (on the cosine matrix)"})
    nan_policy: str = field(default="stop", metadata={"help": "on a NaN/inf loss: stop (keep the last good checkpoint) or skip the batch"})
    # ---- scoring ----
    score_chunk_mb: int = field(default=512, metadata={"help": "memory bound of one chunk of the dense pair scorer, in MiB"})

    # ------------------------------------------------------------------
    def levels(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in self.align_levels.split(",") if s.strip())
        bad = [n for n in names if n not in LEVELS]
        if bad or not names:
            raise ConfigError(f"align_levels={self.align_levels!r}: expected a comma-separated subset of {', '.join(LEVELS)}")
        return names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; see --help for the valid names")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a JSON file written by train.py (config.json)")
        try:
            values = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid JSON ({e}); fix or regenerate it") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {p} must hold a JSON object of option names to values")
        return cls.from_dict(values, source=str(p))


PRESETS: dict[str, dict[str, Any]] = {
    "hsc": dict(img_gnn="hsc", txt_gnn="hsc_text", img_layers=4, txt_layers=4, head="saf"),
    "sgraf_saf": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="saf"),
    "sgraf_sgr": dict(img_gnn="none", txt_gnn="none", img_layers=0, txt_layers=0, head="sgr"),
}


def apply_preset(config: Config, explicit: set[str] = frozenset()) -> Config:
    """Return ``config`` with its preset's fields set, except those the user gave explicitly."""
    if config.preset not in PRESETS:
        raise ConfigError(f"--preset {config.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    updates = {k: v for k, v in PRESETS[config.preset].items() if k not in explicit}
    return dataclasses.replace(config, **updates)


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add one ``--name`` flag per Config field (or per field in ``names``), all defaulting to ``SUPPRESS``.

    Defaults are left out of the namespace so that :func:`config_from_args` can tell what the user typed (a preset
    must not override an explicit flag); the help text shows the real default.
    """
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        kind = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
        parser.add_argument(
            f"--{f.name}", type=kind, default=argparse.SUPPRESS, metavar=f.name.upper() if kind is not _parse_bool else "BOOL",
            help=f"{f.metadata.get('help', '')} (default: {f.default!r})",
        )


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Build a Config from parsed flags: ``base`` (or defaults, or ``--config FILE``), the preset, then the flags."""
    given = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
    if base is None:
        base = Config.load(args.config) if getattr(args, "config", None) else Config()
    config = dataclasses.replace(base, **{k: v for k, v in given.items() if k == "preset"})
    if "preset" in given or not getattr(args, "config", None):
        # a saved config already holds concrete values; a preset typed on the command line overrides them
        config = apply_preset(config, explicit=set(given))
    return dataclasses.replace(config, **given)
