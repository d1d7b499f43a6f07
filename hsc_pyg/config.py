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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import read_json, write_text
from .nn.loss import KINDS as ITC_KINDS
from .nn.model_config import (LEVELS, PRESETS, ModelConfig, model_config_from_dict,  # noqa: F401  (the run's parts
                              model_differences)                                      # are read from here)
from .options import add_arguments, check_device, check_fields, given, option

DEVICE_HELP = "auto (the first GPU, else the CPU), cpu or cuda[:N]"
#: Data loader / decoding processes any command may start.
MAX_WORKERS = 256
#: Seeds are 0 .. 2**32 - 1 (numpy's generator takes 32 bits); the ablation runner's grids too.
MAX_SEED = 2**32
#: Re-scored top K per query of ``--amp bf16|fp16`` when ``--rescore_k`` is not given: the smallest K at which no
#: float32 top-10 item fell outside the bf16 top K on the built-in data and on Flickr8k-mini (README, "bf16 scoring").
DEFAULT_RESCORE_K = 15
#: Items of the first stage a search scores exactly when ``--shortlist`` is not given.
DEFAULT_SHORTLIST = 50
STORE_DTYPES = ("float32", "float16")
#: Working memory of one block of the pair scorer, in MiB, when a run does not say (hsc_pyg/engine/blocking.py).
SCORE_CHUNK_MB = 512
#: How a gallery's first stage finds its shortlist: brute force, or a FAISS index (engine/vector_index.py).
INDEX_KINDS = ("auto", "brute", "flat", "ivf", "ivf_sq8", "hnsw")


def _data_path() -> Any:
    return option("data", "folder that holds <data_name>/")


def _data_name() -> Any:
    return option("synthetic_precomp", "dataset folder: f30k_precomp, coco_precomp, flickr8k_mini_precomp, "
                                       "synthetic_precomp ...")


def _device() -> Any:
    return option("auto", DEVICE_HELP)


def _workers() -> Any:
    return option(0, "data loader worker processes", low=0, below=MAX_WORKERS + 1)


def _batch_size(help: str) -> Any:
    return option(128, help, low=1)


@dataclass(frozen=True)
class DataConfig:
    """Where the data and the vocabulary come from."""

    data_path: str = _data_path()
    data_name: str = _data_name()
    vocab_path: str = option("", "vocabulary JSON (SCAN format); built from the train split when empty or absent")
    vocab_threshold: int = option(4, "minimum train count for a word to enter a built vocabulary", low=1)
    word_vectors: str = option("", "pretrained word vectors that initialise the embedding of the vocabulary's words "
                                   "(glove-6b-50d, needs --word_dim 50 and pip install -e '.[vectors]'; spacy-en-md, "
                                   "300-d like the default --word_dim, installed by make (README); or a GloVe-format "
                                   "text file); words without a vector start random; empty = none")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """How to train, where to write, on what device; and the scorer's memory bound."""

    batch_size: int = _batch_size("captions (with their images) per step")
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
    workers: int = _workers()
    logger_name: str = option("runs/run/log", "TensorBoard folder")
    model_name: str = option("runs/run/checkpoint", "checkpoint folder (model_best.pth, checkpoint.pth)")
    seed: int = option(0, "random seed", low=0, below=MAX_SEED)
    deterministic: bool = option(False, "deterministic algorithms (slower)")
    device: str = _device()
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
    score_chunk_mb: int = option(SCORE_CHUNK_MB, "memory bound of one chunk of the dense pair scorer, in MiB", low=1)

    def __post_init__(self) -> None:
        check_fields(self)
        check_device("device", self.device)


@dataclass(frozen=True)
class EvaluateConfig:
    """What ``hsc-pyg evaluate`` evaluates and how; combinations that cannot work are refused here, before any work."""

    models: tuple[str, ...] = option((), "checkpoint: this project's (model_best.pth) or an official SGRAF / HSC one; "
                                         "repeat to average several models' scores", repeat="append", flag="model",
                                     metavar="CKPT")
    sims: tuple[str, ...] = option((), "a score matrix saved by --save_sims ([images, captions] of the same split); "
                                       "repeat to average; combines with --model", repeat="append", metavar="FILE.npy")
    vocab_path: str = option("", "vocabulary JSON for every --model (default: the one stored in the checkpoint; "
                                 "official checkpoints have none, pass the SCAN f30k/coco vocabulary)",
                             metavar="VOCAB.json")
    data_path: str = _data_path()
    data_name: str = _data_name()
    split: str = option("test", "test, testall (COCO 5,000 images: the fair COCO protocol) or dev")
    fold5: bool = option(False, "COCO 1K: five folds of 1,000 images / 5,000 captions, metrics averaged (needs "
                                "--split testall); only the five diagonal blocks are scored", switch=True)
    rerank_k: tuple[int, ...] = option((), "also re-rank: order all captions (images) by the model's first stage (the "
                                           "cosine of its retrieval vectors), score only each query's top K exactly; "
                                           "reports the first stage's own recalls and, per K, the re-ranked recalls "
                                           "and the exact pair scores needed (needs --model; several K at once: "
                                           "--rerank_k 5 10 20 50)", low=1, repeat="nargs", metavar="K")
    save_sims: str = option("", "write the [images, captions] float32 score matrix (the average when several sources "
                                "are given) for later --sims runs", metavar="FILE.npy")
    overwrite: bool = option(False, "let --save_sims replace an existing file", switch=True)
    json: str = option("", "write the printed numbers as JSON (replaces the file; its folder is created)",
                       metavar="OUT.json")
    device: str = _device()
    amp: str = option("off", "precision of the pair scores (off = float32, the reference). bf16 (on a GPU, or a CPU "
                             "with AMX-BF16 / AVX512-BF16 / Arm BF16; refused elsewhere) or fp16 (GPU): every pair is "
                             "scored in that precision, then again in float32: each query's top --rescore_k in both "
                             "directions, every ground-truth pair, and every pair whose score lies within the largest "
                             "bf16 error seen of its query's best ground-truth score, so that the recall table is "
                             "float32's. The encoders run in float32", choices=("off", "bf16", "fp16"))
    rescore_k: int | None = option(None, "with --amp bf16/fp16: the top K of every query, in both directions, "
                                         f"re-scored in float32 (null: {DEFAULT_RESCORE_K}); 0 = pure bf16/fp16 scores, "
                                         "nothing re-scored (about 3 significant digits: near-equal scores tie, and "
                                         "ties count against the query)", low=0, metavar="K")
    batch_size: int = _batch_size("images or captions per encoder call")
    workers: int = _workers()
    score_chunk_mb: int = option(SCORE_CHUNK_MB, "memory bound of one chunk of the pair scorer in MiB; on a GPU with "
                                                 "room, 4096 scores about 1.4x faster", low=1, metavar="MB")
    store_dtype: str = option("float32", "precision the encodings are kept in between encoding and scoring (float16 "
                                         "halves their memory)", choices=STORE_DTYPES)

    def __post_init__(self) -> None:
        check_fields(self)
        check_device("device", self.device)
        if not self.models and not self.sims:
            raise ConfigError("nothing to evaluate: pass --model CKPT and/or --sims FILE.npy")
        if self.rerank_k and not self.models:
            raise ConfigError("--rerank_k needs --model (re-ranking uses the model's global vectors and its pair "
                              "scorer)")
        if self.rerank_k and self.sims:
            raise ConfigError("--rerank_k cannot use --sims matrices (they hold no global vectors); drop --sims")
        if self.save_sims and self.fold5:
            raise ConfigError("--save_sims with --fold5 would save only the five diagonal blocks; save the full "
                              "matrix without --fold5, then evaluate it with --sims FILE --fold5")
        if self.rescore_k is not None and self.amp == "off":
            raise ConfigError("--rescore_k re-scores the top K of a --amp bf16 or fp16 pass in float32; it does nothing "
                              "with --amp off: drop it or add --amp bf16")
        if self.save_sims and self.rescored_k():
            raise ConfigError(f"--save_sims with --amp {self.amp} and --rescore_k {self.rescored_k()} would save a "
                              "matrix that mixes precisions; save it with --amp off, or --rescore_k 0 for pure "
                              f"{self.amp} scores")

    def rescored_k(self) -> int:
        """The top K per query re-scored in float32 (0: none; always 0 with --amp off or without --model)."""
        if self.amp == "off" or not self.models:
            return 0
        return DEFAULT_RESCORE_K if self.rescore_k is None else self.rescore_k


@dataclass(frozen=True)
class SearchConfig:
    """What ``hsc-pyg search`` looks for, in which gallery, and what it writes; checked before the gallery is
    opened."""

    model: str = option("", "checkpoint (model_best.pth or an official one)", metavar="CKPT")
    vocab_path: str = option("", "vocabulary JSON (default: the one in the checkpoint; official checkpoints have "
                                 "none)", metavar="VOCAB.json")
    data_path: str = _data_path()
    data_name: str = _data_name()
    split: str = option("test", "split whose images (and captions) are searched")
    query: str | None = option(None, "a sentence: find the images that match it", metavar="TEXT")
    image: str | None = option(None, "an image of the split, by row or by id: find its captions", metavar="I|ID")
    k: int = option(5, "results to return", low=1, below=100_001)
    shortlist: int = option(DEFAULT_SHORTLIST, "items of the first stage scored exactly (at least --k)", low=1,
                            below=1_000_001)
    cache: str = option("", "gallery cache folder (default: $HSC_PYG_CACHE or ~/.cache/hsc_pyg, under galleries/, "
                            "named by the model and the data)", metavar="DIR")
    rebuild: bool = option(False, "encode the gallery again, replacing the --cache folder", switch=True)
    store_dtype: str = option("float16", "precision of the cached encodings", choices=STORE_DTYPES)
    index: str = option("auto", "first stage over the images: brute force, or a FAISS index kept in the cache "
                                "(flat, ivf, ivf_sq8, hnsw; the faiss extra); auto: brute below 200,000 images, ivf "
                                "from there",
                        choices=INDEX_KINDS)
    image_root: str = option("", "folder of the photos named in {split}_ids.txt: write a contact sheet (--sheet)",
                             metavar="DIR")
    sheet: str = option("", "contact sheet written with --image_root (default: search.png)", metavar="FILE.png")
    json: str = option("", "write the results as JSON", metavar="FILE")
    overwrite: bool = option(False, "replace an existing --json or --sheet file", switch=True)
    device: str = _device()
    batch_size: int = _batch_size("items per encoder call when building the cache")

    def __post_init__(self) -> None:
        check_fields(self)
        check_device("device", self.device)
        if not self.model:
            raise ConfigError("--model is required: the checkpoint to search with")
        if (self.query is None) == (self.image is None):
            raise ConfigError("give exactly one of --query TEXT (find images) or --image I|ID (find captions)")
        if self.query is not None and not self.query.strip():
            raise ConfigError("--query is empty; give a sentence, e.g. --query \"a dog runs on the beach\"")
        if self.image is not None and not self.image.strip():
            raise ConfigError("--image is empty; give an image row (0, 1, ...) or id of the split")
        if self.sheet and not self.image_root:
            raise ConfigError(f"--sheet {self.sheet} draws the photos of --image_root, which is not given; add "
                              "--image_root DIR or drop --sheet")

    def sheet_path(self) -> str:
        """The contact sheet to write ('' without --image_root)."""
        return (self.sheet or "search.png") if self.image_root else ""


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
        values = read_json(p, "config file", "pass a JSON file written by train.py (config.json)", ConfigError)
        return cls.from_dict(values, source=str(p))


def add_config_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                         names: list[str] | None = None) -> None:
    """One ``--name`` flag per field of the run's three configurations (or per field in ``names``); see
    :func:`~hsc_pyg.options.add_arguments`."""
    add_arguments(parser, PARTS.values(), names)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """A Config from parsed flags: ``base`` (or ``--config FILE``, or the defaults), then the flags. A preset typed on
    the command line sets its fields again (except those also typed), even over a ``--config`` file."""
    typed = given(args, PARTS.values())
    if base is None and getattr(args, "config", None):
        base = Config.load(args.config)
    if base is None:
        return Config(**typed)
    values = base.to_dict()
    if "preset" in typed:
        for name in PRESETS[typed["preset"]] if typed["preset"] in PRESETS else ():
            values.pop(name)
    values.update(typed)
    return Config(**values)
