"""``python -m hsc_pyg.features``: see :mod:`hsc_pyg.cli.features`."""
import sys

from ..cli.features import main

sys.exit(main())
