"""hsc_pyg: HSC (ICMR 2022) and SGRAF (AAAI 2021) cross-modal retrieval on PyTorch Geometric."""
from .config import Config
from .errors import HSCError

__version__ = "0.1.0"


def build_model(config: Config):
    from .nn.model import build_model as _build

    return _build(config)


def load_checkpoint(path, map_location="cpu"):
    from .engine.checkpoint import load_checkpoint as _load

    return _load(path, map_location=map_location)


__all__ = ["Config", "HSCError", "build_model", "load_checkpoint", "__version__"]
