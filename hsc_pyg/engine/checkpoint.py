"""Checkpoints: this project's format, and an explicit converter for the official SGRAF and HSC (LHSC) layouts.

This project's checkpoint is a dict ``{"format": "hsc_pyg", "version": 2, "model_config", "data_config",
"train_config", "vocab", "model", ...}``: the :class:`~hsc_pyg.config.ModelConfig` the weights were built from (the
model is rebuilt from it alone), the run's other configurations (for information and resuming), the vocabulary and the
training state, so that one file is enough to evaluate or resume. Version 1 files (one flat ``config`` dict, written
until the configurations were split) are converted on load by :func:`upgrade_v1`.

The official layout (SGRAF ``train.py`` / LHSC ``train.py``) is ``{"epoch", "model": [img_enc, txt_enc, sim_enc],
"best_rsum", "opt", "Eiters"}`` with ``opt`` an ``argparse.Namespace``; its sizes come from ``opt``. Loading always uses
``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed: a file that needs anything else to
unpickle is refused, never executed.

Command: ``hsc-pyg convert IN OUT [--vocab_path VOCAB.json]`` converts an official checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..config import PART_OF, Config, DataConfig, ModelConfig, TrainConfig, model_config_from_dict
from ..data.precomp import PrecompSplit
from ..data.vocab import Vocabulary
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write, file_fingerprint, file_kind_problem
from ..nn.model import HSCModel

FORMAT = "hsc_pyg"
VERSION = 2
#: ``torch.save`` stores its zip members uncompressed; a member that expands beyond its file this much (plus slack for
#: small files) is a decompression bomb (a 1 MB deflated file can ask for gigabytes), refused before unpickling.
MAX_EXPANSION = 4
EXPANSION_SLACK = 64 * 2**20


# --------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through the atomic writer (:mod:`hsc_pyg.io`): a crash or a full disk at any moment leaves
    either the previous file or the complete new one, never a truncated file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_dict(model: HSCModel, run: Config | None = None, **state: Any) -> dict[str, Any]:
    """The dict this project saves: the model config, the run's data and train configs (when ``run`` is given),
    vocabulary, weights, plus any training state given."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(model.config),
        "data_config": dataclasses.asdict(run.data) if run is not None else None,
        "train_config": dataclasses.asdict(run.train) if run is not None else None,
        "vocab": model.vocab.to_dict() if model.vocab is not None else None,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **state,
    }


def save_checkpoint(path: str | Path, model: HSCModel, run: Config | None = None, **state: Any) -> None:
    """Save ``model`` (with its config and vocabulary), the run's configs and optional training state (``epoch``,
    ``iteration``, ``best_rsum``, ``optimizer``, ``scheduler``, ``rng`` ...) atomically to ``path``."""
    atomic_save(checkpoint_dict(model, run, **state), path)


def upgrade_v1(raw: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A version 1 checkpoint (one flat ``config`` dict of every option) in the version 2 layout.

    ``txt_layer_dropout`` was a float given to every text layer type and ignored by all but ``hsc_text``: it is kept
    only where it took effect (a non-zero value on ``hsc_text``), so the model config says what the weights saw.
    """
    flat = raw.get("config")
    if not isinstance(flat, dict):
        raise CheckpointError(f"{source}: its 'config' is a {type(flat).__name__}, not a dict of options; the file is "
                              "damaged")
    flat = dict(flat)
    if flat.get("txt_gnn") != "hsc_text" or flat.get("txt_layer_dropout") == 0.0:
        flat["txt_layer_dropout"] = None
    parts: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for key, value in flat.items():
        if key not in PART_OF:
            raise CheckpointError(f"{source}: unknown option {key!r} in its version 1 config")
        parts[PART_OF[key]][key] = value
    upgraded = {k: v for k, v in raw.items() if k != "config"}
    upgraded.update(version=VERSION, model_config=parts["model"], data_config=parts["data"],
                    train_config=parts["train"])
    return upgraded


def model_config_of(ckpt: dict[str, Any], source: str = "checkpoint") -> ModelConfig:
    """The checked :class:`ModelConfig` of a checkpoint dict (ConfigError naming ``source`` for a bad value)."""
    if "model_config" not in ckpt:
        raise CheckpointError(f"{source} holds no model config; the file is damaged or was not written by hsc_pyg")
    return model_config_from_dict(ckpt["model_config"], source=source)


def run_config_of(ckpt: dict[str, Any], source: str = "checkpoint") -> Config:
    """The run's :class:`Config` saved in a checkpoint (defaults for the data and train parts it lacks)."""
    parts = {}
    for key, cls in (("data_config", DataConfig), ("train_config", TrainConfig)):
        values = ckpt.get(key) or {}
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: its {key!r} is a {type(values).__name__}, not a dict; the file is damaged")
        try:
            parts[key.split("_")[0]] = cls(**values)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
    return Config(model_config_of(ckpt, source), **parts)


# --------------------------------------------------------------------------- the data a run trains on
#: the files of a split that the data fingerprint covers (what training reads)
FINGERPRINT_FILES = ("ims.npy", "caps.txt", "boxes.npy")


def data_fingerprint(*splits: PrecompSplit) -> dict[str, Any]:
    """What identifies the data of a run, stored in its checkpoints: per split (train, dev) its image and caption
    counts and, per file it reads, the size and the SHA-256 of sampled blocks (as the gallery cache: cheap for
    files of gigabytes). Paths and modification times are left out: the same data moved or copied is the same."""
    def file(path: Path) -> dict[str, Any]:
        found = file_fingerprint(path)
        return {"size": found["size"], "sample_sha256": found["sample_sha256"]}

    return {split.split: {"images": split.num_images, "captions": split.num_captions,
                          "files": {suffix: file(split.file(suffix)) for suffix in FINGERPRINT_FILES
                                    if split.file(suffix).is_file()}}
            for split in splits}


def check_same_data(checkpoint: dict[str, Any], fingerprint: dict[str, Any], source: str) -> None:
    """ConfigError when the run of ``checkpoint`` was trained on other data than ``fingerprint`` describes: a
    resumed run would then mix two datasets (and choose its best model by comparing the rsums of two dev sets).
    Checkpoints written before the fingerprint was stored are not checked."""
    saved = checkpoint.get("data_fingerprint")
    if not isinstance(saved, dict):
        return
    changes = []
    for split, now in fingerprint.items():
        before = saved.get(split) if isinstance(saved.get(split), dict) else {}
        for count in ("images", "captions"):
            if before.get(count) != now[count]:
                changes.append(f"{split} has {now[count]} {count}, {before.get(count)} before")
        if not any(c.startswith(split) for c in changes):
            changed = [s for s in sorted(set(now["files"]) | set(before.get("files") or {}))
                       if (before.get("files") or {}).get(s) != now["files"].get(s)]
            changes += [f"{split}_{suffix} changed" for suffix in changed]
    if changes:
        raise ConfigError(f"{source} was trained on other data than the data found now ({'; '.join(changes[:3])}); "
                          "resume on the data it was trained on, or pass --other_data to continue on this data "
                          "anyway")


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file safely and return it in this project's dict layout (converting official ones)."""
    path = Path(path)
    problem = file_kind_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}; pass the path of a .pth/.pth.tar file")
    check_expansion(path)
    check_header(path)
    try:
        with allow_namespace():
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's safe unpickler raises this both for a global outside its safe list and for damaged bytes, in
        # wordings that change between versions: which one it was is read from the pickle itself
        refused = unsafe_globals(path)
        if refused is None:
            raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt "
                                  "pickle data); re-download or re-save it") from None
        named = f" ({', '.join(refused[:3])})" if refused else ""
        raise CheckpointError(f"checkpoint {path} was refused: it needs code outside the safe list to load{named}; "
                              "it may be malicious, so it was not unpickled") from None
    except Exception as e:  # the unpickler raises many kinds of errors on garbage: any of them means unreadable
        msg = _first_words(str(e)) or type(e).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                              f"{msg}); re-download or re-save it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a checkpoint dict")
    if raw.get("format") == FORMAT:
        check_layout(raw, f"checkpoint {path}")
        return upgrade_v1(raw, str(path)) if raw.get("version") == 1 else raw
    if isinstance(raw.get("model"), (list, tuple)) and isinstance(raw.get("opt"), argparse.Namespace):
        return convert_official(raw, source=str(path))
    raise CheckpointError(f"checkpoint {path} is neither an hsc_pyg nor an official SGRAF/HSC checkpoint "
                          f"(top-level keys: {', '.join(sorted(map(str, raw))[:8]) or 'none'})")


@contextlib.contextmanager
def allow_namespace() -> Iterator[None]:
    """``argparse.Namespace`` (the official checkpoints' ``opt``) on torch's safe-unpickler list inside; the list as it
    was after. torch 2.5's ``torch.serialization.safe_globals`` does the same; this uses only calls torch 2.4 has."""
    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def _first_words(text: str, limit: int = 160) -> str:
    """The first line of ``text``, cut at a word boundary to at most ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


#: how files that ``torch.load`` reads begin: a zip archive (``torch.save`` since 1.6) or a pickle of protocol 2+
#: (the legacy format, official checkpoints of that time)
HEADERS = (b"PK\x03\x04", b"\x80")


def check_header(path: Path) -> None:
    """CheckpointError for a file that begins as neither a zip archive nor a pickle (checked on its first bytes, so
    a multi-gigabyte file of zeros is refused at once)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not any(head.startswith(h) for h in HEADERS):
        kind = "an empty file" if not head else f"starts with bytes {head.hex(' ')}"
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint ({kind}, not a zip archive "
                              "or a pickle); re-download or re-save it")


def unsafe_globals(path: Path) -> list[str] | None:
    """The globals (``module.name``) that the pickle inside ``path`` asks for, outside torch's safe list, or None
    when the pickle is not well formed (damaged, not hostile). A well-formed pickle that the safe unpickler refused
    asked for something outside its list (an empty list: it refused something else, such as a ``__reduce__``)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            with open(path, "rb") as f:
                data = f.read(64 * 2**20)
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, UnicodeDecodeError):
        return None
    safe = set(_safe_global_names())
    return [g for g in dict.fromkeys(found) if g not in safe]


def _safe_global_names() -> list[str]:
    """``module.name`` of every global torch's safe unpickler accepts, plus this project's allow list."""
    from torch import _weights_only_unpickler as unpickler

    names = ["argparse.Namespace"]
    names += list(getattr(unpickler, "_get_allowed_globals", dict)())
    for obj in torch.serialization.get_safe_globals():
        obj = obj[0] if isinstance(obj, tuple) else obj
        names.append(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return names


def check_expansion(path: Path) -> None:
    """CheckpointError when the zip members of ``path`` would expand far beyond the file (checked from the zip's
    directory, before anything is decompressed). Files in the legacy (non-zip) format cannot be checked."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (legacy format or garbage): torch.load judges it
    if expanded > MAX_EXPANSION * size + EXPANSION_SLACK:
        raise CheckpointError(f"checkpoint {path} would expand from {size / 2**20:.1f} MB to {expanded / 2**20:,.0f} MB "
                              f"when read (torch.save writes uncompressed files); it is damaged or hostile, so it was "
                              "not loaded")


def check_layout(ckpt: dict[str, Any], source: str) -> None:
    """CheckpointError unless this project's checkpoint has its model configuration as a dict (``model_config``;
    ``config`` in version 1) and a ``model`` dict of tensors."""
    for key in ("config" if ckpt.get("version") == 1 else "model_config", "model"):
        if not isinstance(ckpt.get(key), dict):
            found = "nothing" if ckpt.get(key) is None else f"a {type(ckpt[key]).__name__}"
            raise CheckpointError(f"{source}: '{key}' must be a dict but the checkpoint holds {found}; the file is "
                                  "damaged or was not written by hsc_pyg; use another checkpoint")
    bad = next((k for k, v in ckpt["model"].items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: weight {bad!r} is a {type(ckpt['model'][bad]).__name__}, not a tensor; the "
                              "file is damaged; use another checkpoint")


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> HSCModel:
    """Build the model a checkpoint dict describes (from its ModelConfig alone) and load its weights (strictly)."""
    config = model_config_of(ckpt, source)
    model = HSCModel(config)
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{source}: its 'model' is a {type(ckpt.get('model')).__name__}, not a state dict; the "
                              "file is damaged")
    state = dict(ckpt["model"])
    if not any(k.startswith("first_stage.") for k in state):
        # written before the first stage existed (official checkpoints, hsc_pyg 0.1): its untrained form, the cosine
        # of the global vectors, with ``trained`` false
        state.update({f"first_stage.{k}": v for k, v in model.first_stage.state_dict().items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise CheckpointError(f"{source}: weights do not fit the model its config describes ({detail})") from None
    if ckpt.get("vocab") is not None:
        model.vocab = Vocabulary.from_dict(ckpt["vocab"])
        if len(model.vocab) != config.vocab_size:
            raise CheckpointError(f"{source}: its vocabulary has {len(model.vocab)} words but the model was built "
                                  f"for vocab_size={config.vocab_size}")
    return model


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> HSCModel:
    """Load this project's checkpoints and the official SGRAF (SAF or SGR) and HSC ones; returns a model in eval mode
    with ``model.vocab`` set when the checkpoint carries a vocabulary."""
    model = model_from_checkpoint(read_checkpoint(path, map_location), source=str(path))
    return model.eval()


# --------------------------------------------------------------------------- official layouts
Rule = tuple[str, str, Callable[[Tensor], Tensor] | None]


def _squeeze_conv(t: Tensor) -> Tensor:
    """A 1x1 ``Conv1d`` weight ``[out, in, 1]`` as a ``Linear`` weight ``[out, in]``."""
    return t.squeeze(-1) if t.dim() == 3 else t


_SA = [(r"embedding_local\.(\d)\.", r"local_embed.\1."), (r"embedding_global\.(\d)\.", r"global_embed.\1."),
       (r"embedding_common\.0\.", "attn_score.")]

IMAGE_RULES: list[Rule] = [
    (r"^fc\.", "image_encoder.fc.", None),
    (r"^IM_GCN_(\d+)\.g\.", "image_encoder.stack.layers.{k}.message_proj.", _squeeze_conv),
    (r"^IM_GCN_(\d+)\.W\.0\.", "image_encoder.stack.layers.{k}.update_proj.", _squeeze_conv),
    (r"^IM_GCN_(\d+)\.W\.1\.", "image_encoder.stack.layers.{k}.norm.", None),
    (r"^IM_GCN_(\d+)\.fc1\.", "image_encoder.stack.layers.{k}.theta_mix.", None),
    (r"^IM_GCN_(\d+)\.fc2\.", "image_encoder.stack.layers.{k}.phi_mix.", None),
]
TEXT_RULES: list[Rule] = [
    (r"^embed\.", "text_encoder.embed.", None),
    (r"^cap_rnn\.", "text_encoder.gru.", None),
    (r"^W_att(\d+)\.embedding_local\.0\.", "text_encoder.stack.layers.{k}.query.", None),
    (r"^W_att(\d+)\.embedding_global\.0\.", "text_encoder.stack.layers.{k}.key.", None),
    (r"^W_att(\d+)\.embedding_v\.0\.", "text_encoder.stack.layers.{k}.value.", None),
]
SIM_RULES: list[Rule] = [
    *[(r"^v_global_w\." + p, "similarity.visual_sa." + r, None) for p, r in _SA],
    *[(r"^t_global_w\." + p, "similarity.text_sa." + r, None) for p, r in _SA],
    (r"^sim_tranloc_w\.", "similarity.loc_proj.", None),
    (r"^sim_tranglo_w\.", "similarity.glo_proj.", None),
    (r"^sim_eval_w\.", "similarity.score_proj.", None),
    (r"^(?:SAF_module|cal_sim_base_atten)\.attn_sim_w\.", "similarity.head.gate.", None),
    (r"^(?:SAF_module|cal_sim_base_atten)\.bn\.", "similarity.head.norm.", None),
    (r"^SGR_module\.(\d+)\.graph_query_w\.", "similarity.head.steps.{s}.query.", None),
    (r"^SGR_module\.(\d+)\.graph_key_w\.", "similarity.head.steps.{s}.key.", None),
    (r"^SGR_module\.(\d+)\.sim_graph_w\.", "similarity.head.steps.{s}.update.", None),
]
_STACKED_HEADS = re.compile(r"^IM_GCN_(\d+)\.(theta|phi)(\d?)\.(weight|bias)$")


def _rename(state: dict[str, Tensor], rules: list[Rule], source: str, part: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    stacked: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, value in state.items():
        heads = _STACKED_HEADS.match(key)
        if heads:  # theta, theta1, theta2, theta3 -> one stacked Linear, in that order (as the original concatenates)
            layer, name, idx, kind = heads.groups()
            prefix = f"image_encoder.stack.layers.{int(layer) - 1}.{name}.{kind}"
            stacked.setdefault((prefix, kind), {})[int(idx or 0)] = _squeeze_conv(value)
            continue
        for pattern, target, transform in rules:
            m = re.match(pattern, key)
            if m:
                number = int(m.group(1)) if m.groups() else 0
                prefix = m.expand(target.format(k=number - 1, s=number))
                out[prefix + key[m.end():]] = transform(value) if transform else value
                break
        else:
            raise CheckpointError(f"{source}: unknown parameter {key!r} in the official {part} state dict; "
                                  "only SGRAF (SAF/SGR) and HSC/LHSC checkpoints can be converted")
    for (prefix, _), parts in stacked.items():
        out[prefix] = torch.cat([parts[i] for i in sorted(parts)], 0)
    return out


def convert_official(raw: dict[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """Official SGRAF / HSC checkpoint dict -> this project's checkpoint dict."""
    opt = raw["opt"]
    parts = raw["model"]
    if len(parts) != 3 or not all(isinstance(p, dict) for p in parts):
        raise CheckpointError(f"{source}: 'model' must be the three state dicts [img_enc, txt_enc, sim_enc]")
    img_sd, txt_sd, sim_sd = parts
    if not getattr(opt, "bi_gru", True):
        raise CheckpointError(f"{source}: opt.bi_gru is False; only the bidirectional GRU of SGRAF/HSC is supported")
    img_layers = len({k.split(".")[0] for k in img_sd if k.startswith("IM_GCN_")})
    txt_layers = len({k.split(".")[0] for k in txt_sd if k.startswith("W_att")})
    sgr_steps = len({k.split(".")[1] for k in sim_sd if k.startswith("SGR_module.")})
    head = "sgr" if sgr_steps else "saf"
    preset = "hsc" if img_layers or txt_layers else f"sgraf_{head}"
    drop_out = getattr(opt, "drop_out", 0.0)
    missing = [k for k in ("img_dim", "embed_size", "word_dim", "sim_dim", "vocab_size") if not hasattr(opt, k)]
    if missing:
        raise CheckpointError(f"{source}: its opt has no {', '.join(missing)}; it is not a complete SGRAF/HSC checkpoint")
    values = dict(
        preset=preset, head=head, img_dim=opt.img_dim, embed_size=opt.embed_size, word_dim=opt.word_dim,
        sim_dim=opt.sim_dim, vocab_size=opt.vocab_size, sgr_step=sgr_steps or getattr(opt, "sgr_step", 3),
        img_gnn="hsc" if img_layers else "none", txt_gnn="hsc_text" if txt_layers else "none",
        img_layers=img_layers, txt_layers=txt_layers, gru_layers=getattr(opt, "num_layers", 1),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        txt_layer_dropout=drop_out if txt_layers and drop_out != 0.0 else None,
    )
    if hasattr(opt, "lambda_softmax"):
        values["lambda_softmax"] = opt.lambda_softmax
    # the opt's values go through the same checks as any other config (a string or a NaN is a ConfigError)
    model_config = model_config_from_dict(values, source=f"{source} (opt)")
    train_values = {name: getattr(opt, name) for name in ("margin", "max_violation", "learning_rate", "batch_size",
                                                            "num_epochs", "lr_update", "grad_clip")
                    if hasattr(opt, name)}
    data_values = {"data_name": opt.data_name} if hasattr(opt, "data_name") else {}
    try:
        run = Config(model_config, DataConfig(**data_values), TrainConfig(**train_values))
    except ConfigError as e:
        raise ConfigError(f"{source} (opt): {e}") from None
    model = {}
    for part, sd, rules in (("img_enc", img_sd, IMAGE_RULES), ("txt_enc", txt_sd, TEXT_RULES),
                            ("sim_enc", sim_sd, SIM_RULES)):
        model.update(_rename(sd, rules, source, part))
    return {
        "format": FORMAT, "version": VERSION, "model_config": dataclasses.asdict(run.model),
        "data_config": dataclasses.asdict(run.data), "train_config": dataclasses.asdict(run.train),
        "vocab": None, "model": model,
        "epoch": raw.get("epoch", 0), "iteration": raw.get("Eiters", 0), "best_rsum": raw.get("best_rsum", 0.0),
        "converted_from": f"official {preset} checkpoint",
    }
