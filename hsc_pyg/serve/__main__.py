from hsc_pyg.cli.common import exit_with
from hsc_pyg.cli.serve import main

exit_with(main)
