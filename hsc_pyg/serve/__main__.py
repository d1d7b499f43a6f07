"""``python -m hsc_pyg.serve``: the command line lives in :mod:`hsc_pyg.cli.serve`."""
from ..cli.common import exit_with
from ..cli.serve import main

if __name__ == "__main__":
    exit_with(main)
