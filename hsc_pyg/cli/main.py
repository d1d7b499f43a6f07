"""``hsc-pyg <command> [flags]`` (the package's console entry point) and ``python -m hsc_pyg <command>``: one door
to every command line of the package, each in its own module of :mod:`hsc_pyg.cli`."""
from __future__ import annotations

import importlib
import sys
from typing import NoReturn, Sequence

from .common import exit_with

#: command -> (module of hsc_pyg.cli, what it does)
COMMANDS = {
    "train": ("train", "train HSC or SGRAF on a SCAN precomp dataset (train.py in a checkout)"),
    "evaluate": ("evaluate", "retrieval recalls of checkpoints or saved score matrices (evaluate.py in a checkout)"),
    "search": ("search", "find the images that match a sentence, or the captions that match an image"),
    "viz": ("viz", "draw the relations a trained model learned, as PNG + GraphML + JSON"),
    "serve": ("serve", "the explorer: a web page and an HTTP API over a model and a gallery (extra: serve)"),
    "ablate": ("ablate", "train and evaluate a grid of configurations x seeds; a table and a plot of the study"),
    "features": ("features", "a folder of photos -> region features in the precomp layout"),
    "import-captions": ("import_captions", "captions from Karpathy / COCO JSON, CSV or text files -> {split}_caps.txt"),
    "vocab": ("vocab", "build a vocabulary JSON from a split's captions"),
    "synthetic": ("synthetic", "write the built-in synthetic dataset"),
    "convert": ("convert", "convert an official SGRAF / HSC checkpoint into this project's format"),
}

USAGE = "usage: hsc-pyg <command> [flags]   (or: python -m hsc_pyg <command> [flags])\n\ncommands:\n" + "\n".join(
    f"  {name:<16} {summary}" for name, (_, summary) in COMMANDS.items()) + (
    "\n\n`hsc-pyg <command> --help` explains a command's flags.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hsc-pyg argv``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"no command {argv[0]!r}" if argv else "a command is needed"
        print(f"hsc-pyg: error: {given}; one of {', '.join(COMMANDS)} (see hsc-pyg --help)", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    return importlib.import_module(f"{__package__}.{COMMANDS[name][0]}").main(rest)


def run() -> NoReturn:
    """The console entry point ``hsc-pyg``."""
    exit_with(main)


if __name__ == "__main__":
    run()
