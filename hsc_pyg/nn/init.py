"""Weight initialisation as the original code does it (MODEL.md §2, "Initialisation")."""
from __future__ import annotations

import math

from torch import nn


def xavier_linear(layer: nn.Linear) -> nn.Linear:
    """Xavier-uniform weight ``U(+-sqrt(6/(in+out)))`` and zero bias, as the original code initialises its Linears."""
    bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
    return layer
