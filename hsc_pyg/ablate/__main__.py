"""``python -m hsc_pyg.ablate``: the command line lives in :mod:`hsc_pyg.cli.ablate`."""
import sys

from ..cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
