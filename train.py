"""Train HSC or SGRAF: ``python train.py [flags]`` in a checkout, the same as ``hsc-pyg train [flags]`` once the
package is installed (see :mod:`hsc_pyg.cli.train` and ``python train.py --help``)."""
from hsc_pyg.cli.common import exit_with
from hsc_pyg.cli.train import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    exit_with(main)
