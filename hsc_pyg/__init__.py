"""hsc_pyg: HSC (ICMR 2022) and SGRAF (AAAI 2021) cross-modal retrieval on PyTorch Geometric.

    from hsc_pyg import build_model, load_checkpoint, ModelConfig
    model = build_model(ModelConfig(img_dim=2048, vocab_size=8481))
    model = load_checkpoint("model_best.pth")
"""
from .config import Config, DataConfig, ModelConfig, TrainConfig
from .engine.checkpoint import load_checkpoint
from .errors import HSCError
from .nn.model import build_model

__version__ = "0.1.0"

__all__ = ["Config", "DataConfig", "HSCError", "ModelConfig", "TrainConfig", "build_model", "load_checkpoint",
           "__version__"]
