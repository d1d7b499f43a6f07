"""The command lines behind the console entry point ``hsc-pyg <command>`` (:mod:`hsc_pyg.cli.main`), one module per
command, also run as ``python -m hsc_pyg <command>`` and, for some, ``python -m hsc_pyg.<tool>``; the library never
imports this package."""
