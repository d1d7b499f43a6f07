"""``python -m hsc_pyg.ablate``: the command line lives in :mod:`hsc_pyg.cli.ablate`."""
from ..cli.ablate import main
from ..cli.common import exit_with

if __name__ == "__main__":
    exit_with(main)
