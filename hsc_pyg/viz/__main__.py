"""``python -m hsc_pyg.viz``: the command line lives in :mod:`hsc_pyg.cli.viz`."""
import sys

from ..cli.viz import main

if __name__ == "__main__":
    sys.exit(main())
