"""Devices and precision: which device a name means, the autocast of ``--amp``, eval mode without gradients."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first GPU when there is one, else the CPU; ``cpu``; ``cuda[:N]`` (ConfigError without one)."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def autocast(device: torch.device, amp: str = "off") -> contextlib.AbstractContextManager:
    """The autocast context of ``--amp off|bf16|fp16`` (fp32 is the reference; autocast is a GPU option)."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"--amp {amp!r} is unknown; choose off, bf16 or fp16")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"--amp {amp} needs a CUDA device (found {device}); use --amp off on the CPU")
    return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
