"""Checkpoints: this project's format, and an explicit converter for the official SGRAF and HSC (LHSC) layouts.

This project's checkpoint is a dict ``{"format": "hsc_pyg", "version", "config", "vocab", "model", ...}`` holding the
config, the vocabulary and the training state, so that one file is enough to evaluate or resume.

The official layout (SGRAF ``train.py`` / LHSC ``train.py``) is ``{"epoch", "model": [img_enc, txt_enc, sim_enc],
"best_rsum", "opt", "Eiters"}`` with ``opt`` an ``argparse.Namespace``; its sizes come from ``opt``. Loading always uses
``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed: a file that needs anything else to
unpickle is refused, never executed.

Command: ``python -m hsc_pyg.engine.checkpoint IN OUT [--vocab_path VOCAB.json]`` converts an official checkpoint.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import Config
from ..data.vocab import Vocabulary
from ..errors import CheckpointError, HSCError, os_error_reason
from ..nn.model import HSCModel, build_model

FORMAT = "hsc_pyg"
VERSION = 1


# --------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the previous file or the complete new one, never a truncated file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({os_error_reason(e)}); choose a writable path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # e.g. the disk is full: the previous file is intact
            raise CheckpointError(f"cannot write {path} ({e.strerror}); the previous {path.name}, if any, is intact; "
                                  "free disk space or choose another path") from None
        raise


def checkpoint_dict(model: HSCModel, **state: Any) -> dict[str, Any]:
    """The dict this project saves: config, vocabulary, weights, plus any training state given."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "vocab": model.vocab.to_dict() if model.vocab is not None else None,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **state,
    }


def save_checkpoint(path: str | Path, model: HSCModel, **state: Any) -> None:
    """Save ``model`` (with its config and vocabulary) and optional training state (``epoch``, ``iteration``,
    ``best_rsum``, ``optimizer``, ``scheduler``, ``rng`` ...) atomically to ``path``."""
    atomic_save(checkpoint_dict(model, **state), path)


# --------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file safely and return it in this project's dict layout (converting official ones)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth/.pth.tar file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if refused:
            raise CheckpointError(f"checkpoint {path} was refused: it needs code outside the safe list to load "
                                  f"({refused.group(1)}); it may be malicious, so it was not unpickled") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint "
                              f"({(detail.group(1) if detail else type(e).__name__).strip()[:160]})") from None
    except Exception as e:  # the unpickler raises many kinds of errors on garbage: any of them means unreadable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                              f"{msg[:160]}); re-download or re-save it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a checkpoint dict")
    if raw.get("format") == FORMAT:
        return raw
    if isinstance(raw.get("model"), (list, tuple)) and isinstance(raw.get("opt"), argparse.Namespace):
        return convert_official(raw, source=str(path))
    raise CheckpointError(f"checkpoint {path} is neither an hsc_pyg nor an official SGRAF/HSC checkpoint "
                          f"(top-level keys: {', '.join(sorted(map(str, raw))[:8]) or 'none'})")


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> HSCModel:
    """Build the model a checkpoint dict describes and load its weights (strictly)."""
    config = Config.from_dict(ckpt["config"], source=source)
    model = build_model(config)
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
    values = dict(
        preset=preset, head=head, img_dim=opt.img_dim, embed_size=opt.embed_size, word_dim=opt.word_dim,
        sim_dim=opt.sim_dim, vocab_size=opt.vocab_size, sgr_step=sgr_steps or getattr(opt, "sgr_step", 3),
        img_gnn="hsc" if img_layers else "none", txt_gnn="hsc_text" if txt_layers else "none",
        img_layers=img_layers, txt_layers=txt_layers, gru_layers=getattr(opt, "num_layers", 1),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        txt_layer_dropout=float(getattr(opt, "drop_out", 0.0)) if txt_layers else 0.0,
    )
    for name in ("data_name", "margin", "max_violation", "learning_rate", "batch_size", "num_epochs", "lr_update",
                 "grad_clip"):
        if hasattr(opt, name):
            values[name] = getattr(opt, name)
    model = {}
    for part, sd, rules in (("img_enc", img_sd, IMAGE_RULES), ("txt_enc", txt_sd, TEXT_RULES),
                            ("sim_enc", sim_sd, SIM_RULES)):
        model.update(_rename(sd, rules, source, part))
    return {
        "format": FORMAT, "version": VERSION, "config": Config(**values).to_dict(), "vocab": None, "model": model,
        "epoch": raw.get("epoch", 0), "iteration": raw.get("Eiters", 0), "best_rsum": raw.get("best_rsum", 0.0),
        "converted_from": f"official {preset} checkpoint",
    }


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hsc_pyg.engine.checkpoint",
        description="Convert an official SGRAF (SAF/SGR) or HSC checkpoint into this project's format, optionally "
                    "bundling the vocabulary it was trained with, so that evaluate.py needs only the one file.")
    parser.add_argument("source", help="official checkpoint (e.g. model_best.pth.tar)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--vocab_path", default="", help="vocabulary JSON to bundle (e.g. f30k_precomp_vocab.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        out = Path(args.output)
        if out.exists() and not args.overwrite:
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it or choose another path")
        ckpt = read_checkpoint(args.source)
        model = model_from_checkpoint(ckpt, source=args.source)
        if args.vocab_path:
            model.vocab = Vocabulary.load(args.vocab_path)
            if len(model.vocab) != model.config.vocab_size:
                raise CheckpointError(f"{args.vocab_path} has {len(model.vocab)} words but {args.source} was trained "
                                      f"with vocab_size={model.config.vocab_size}; pass the matching vocabulary")
        keep = {k: ckpt[k] for k in ("epoch", "iteration", "best_rsum", "converted_from") if k in ckpt}
        save_checkpoint(out, model, **keep)
        print(f"wrote {out} ({model.config.preset}, {model.num_parameters():,} parameters)")
        return 0
    except HSCError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
