"""Shared test fixtures.

``../shared`` (beside the project root) holds the official fixtures and the real mini benchmark. A user's clone has no
such folder, so every test that reads it asks for the ``shared_dir`` fixture, which skips with the reason.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=(
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                         reason="no CUDA device (benchmarks/gpu_check.sh runs these on a GPU)")))])
def device(request) -> str:
    """Each test that asks for it runs on the CPU and, marked ``cuda``, on the GPU (``pytest -m cuda``)."""
    return request.param


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the reference fixtures and the mini benchmark live beside the project root")
    return SHARED
