"""Ablation studies: ``python -m hsc_pyg.ablate --grid GRID.json`` (:mod:`hsc_pyg.cli.ablate`); the work is done by
:mod:`hsc_pyg.engine.ablation`."""
from ..engine.ablation import Grid, load_grid, summarize, welch

__all__ = ["Grid", "load_grid", "summarize", "welch"]
