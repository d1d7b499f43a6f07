"""``python -m hsc_pyg.viz``: the command line lives in :mod:`hsc_pyg.cli.viz`."""
from ..cli.common import exit_with
from ..cli.viz import main

if __name__ == "__main__":
    exit_with(main)
