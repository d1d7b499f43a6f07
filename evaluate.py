"""Evaluate image-text retrieval: ``python evaluate.py [flags]`` in a checkout, the same as ``hsc-pyg evaluate
[flags]`` once the package is installed (see :mod:`hsc_pyg.cli.evaluate` and ``python evaluate.py --help``)."""
from hsc_pyg.cli.common import exit_with
from hsc_pyg.cli.evaluate import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    exit_with(main)
