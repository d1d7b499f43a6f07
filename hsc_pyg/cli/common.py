"""Flags that several command lines share, written once."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, NoReturn


def add_model_and_split_arguments(parser: argparse.ArgumentParser, split_help: str) -> None:
    """``--model``, ``--vocab_path``, ``--data_path``, ``--data_name`` and ``--split``: a trained model and the
    split it reads."""
    parser.add_argument("--model", required=True, metavar="CKPT",
                        help="checkpoint (model_best.pth or an official one)")
    parser.add_argument("--vocab_path", default="", metavar="VOCAB.json",
                        help="vocabulary JSON (default: the one in the checkpoint; official checkpoints have none)")
    parser.add_argument("--data_path", default="data", help="folder that holds <data_name>/ (default: %(default)s)")
    parser.add_argument("--data_name", default="synthetic_precomp", help="dataset folder (default: %(default)s)")
    parser.add_argument("--split", default="test", help=split_help)


def exit_with(main: Callable[[], int]) -> NoReturn:
    """``sys.exit(main())``, except that output piped into a reader that stops early (``| head``) ends the command
    quietly with status 141, as Unix tools do, instead of a traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush at exit
        code = 128 + signal.SIGPIPE
    sys.exit(code)
