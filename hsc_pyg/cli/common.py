"""What every command line shares, written once: its parser (one-line usage errors, ``--debug``), the runner that
turns an expected error into one line on stderr and an exit status, and the flags of a trained model and its split."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, NoReturn, Sequence

from ..errors import HSCError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (what is wrong, and where to look) and exits with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_parser(command: str, description: str, epilog: str | None = None) -> OneLineParser:
    """The parser of ``hsc-pyg <command>``: the description printed as written, usage errors in one line, and
    ``--debug``, which :func:`run_command` reads."""
    parser = OneLineParser(prog=f"hsc-pyg {command}", description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its one line")
    return parser


def run_command(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None = None, interrupted: str = "interrupted") -> int:
    """Parse ``argv`` and return ``work(args)``'s exit status. A usage error is argparse's one line and status 2 (and
    ``--help`` status 0), returned rather than raised; an expected error (:class:`~hsc_pyg.errors.HSCError`) becomes
    its one-line message on stderr and its status (2), or its traceback with ``--debug``; Ctrl-C prints
    ``interrupted`` (what was kept, how to go on) and returns 130."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:            # the message (or the help) is printed already
        return e.code if isinstance(e.code, int) else 2
    try:
        return work(args)
    except HSCError as e:
        if getattr(args, "debug", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 128 + signal.SIGINT


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
