"""``python -m hsc_pyg <command> [flags]``: the same as the console entry point ``hsc-pyg``
(:mod:`hsc_pyg.cli.main`)."""
from .cli.main import run

if __name__ == "__main__":
    run()
