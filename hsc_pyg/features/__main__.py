"""``python -m hsc_pyg.features``: see :mod:`hsc_pyg.cli.features`."""
from ..cli.common import exit_with
from ..cli.features import main

exit_with(main)
