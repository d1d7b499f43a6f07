"""Command lines behind ``python -m hsc_pyg.<tool>``; the library never imports this package."""
