"""``python -m hsc_pyg.search``: the command line lives in :mod:`hsc_pyg.cli.search`."""
from ..cli.common import exit_with
from ..cli.search import main

if __name__ == "__main__":
    exit_with(main)
