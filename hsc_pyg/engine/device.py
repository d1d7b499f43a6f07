"""Devices and precision: which device a name means, the autocast of ``--amp``, eval mode without gradients."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch

from ..errors import ConfigError

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: CPU instructions that multiply bfloat16 matrices natively, as ``torch.cpu.get_capabilities()`` names them: Intel
#: AMX, AVX-512 BF16 (Intel Cooper Lake and later, AMD Zen 4 and later), Arm's SVE BF16 and BF16 (BFMMLA / BFDOT).
BF16_MATRIX_INSTRUCTIONS = ("amx_bf16", "avx512_bf16", "sve_bf16", "bf16")


def cpu_capabilities(cpuinfo: str = "/proc/cpuinfo") -> Mapping[str, Any]:
    """``torch.cpu.get_capabilities()``; on a torch without it (2.4 has none) the same names from the Linux kernel's
    CPU flags (``avx512_bf16``, ``amx_bf16`` ...; ``cpu_name``), which torch's oneDNN uses all the same; elsewhere
    empty (no CPU bf16 is found)."""
    if hasattr(torch.cpu, "get_capabilities"):
        return torch.cpu.get_capabilities()
    try:
        with open(cpuinfo) as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return {"cpu_name": fields.get("model name", "unnamed"), **dict.fromkeys(fields.get("flags", "").split(), True)}


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


def cpu_bf16_instructions() -> list[str]:
    """The names of :data:`BF16_MATRIX_INSTRUCTIONS` this CPU has, as torch detects them (empty: none)."""
    return [name for name in BF16_MATRIX_INSTRUCTIONS if cpu_capabilities().get(name) is True]


def autocast(device: torch.device, amp: str = "off", cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """The autocast context of ``--amp off|bf16|fp16`` (fp32 is the reference). On CUDA devices any of them; on the
    CPU only bf16, only where ``cpu_bf16`` (the caller can use it: pair scoring) and only on a CPU with native bf16
    matrix instructions (:func:`cpu_bf16_instructions`; elsewhere bf16 is emulated, slower than float32)."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"--amp {amp!r} is unknown; choose off, bf16 or fp16")
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[amp])
    if not (cpu_bf16 and amp == "bf16"):
        raise ConfigError(f"--amp {amp} needs a CUDA device (found {device}); use --amp off on the CPU")
    if not cpu_bf16_instructions():
        raise ConfigError(f"--amp bf16 on the CPU needs native bf16 matrix instructions (AMX-BF16, AVX512-BF16 or Arm "
                          f"BF16), which torch does not find on this CPU "
                          f"({cpu_capabilities().get('cpu_name', 'unnamed')}, torch {torch.__version__}); use --amp off")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's previous mode is restored after. A model already wholly in
    eval mode (a server's, every query) is left untouched: setting the mode of every module costs 0.6 ms."""
    was_training = model.training
    switch = any(module.training for module in model.modules())
    if switch:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if switch:
            model.train(was_training)
