import sys

from hsc_pyg.cli.search import main

sys.exit(main())
