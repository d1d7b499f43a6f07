"""``python -m hsc_pyg.features``: the command line lives in :mod:`hsc_pyg.cli.features`."""
from ..cli.common import exit_with
from ..cli.features import main

if __name__ == "__main__":
    exit_with(main)
