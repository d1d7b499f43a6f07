"""User-facing errors.

Every expected failure (bad data, bad config, bad checkpoint) raises a subclass of :class:`HSCError` whose message is a
single line: what is wrong, where, and how to fix it. The command lines print that line to stderr and exit with status 2.
"""
import os
from pathlib import Path
from typing import NoReturn


class HSCError(Exception):
    """Base class of the errors a user can cause and fix."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        # A DataLoader worker's error is raised again in the main process as ``type(error)(text)``, where the text is
        # "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nhsc_pyg.errors.DataError: <line>":
        # keep the original one-line message.
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            last = args[0].rstrip().rsplit("\n", 1)[-1]
            args = (last.partition(": ")[2] or last,)
        super().__init__(*args)


class DataError(HSCError):
    """A dataset file or folder is missing or malformed."""


class VocabError(HSCError):
    """A vocabulary file is missing or malformed, or disagrees with a model."""


class ConfigError(HSCError):
    """An option has an invalid value or options contradict each other."""


class CheckpointError(HSCError):
    """A checkpoint is missing, unreadable, unsafe or of an unknown layout."""


class OutputError(HSCError):
    """A file or folder cannot be written (a full disk, no permission, a file in the way); the old one is intact."""


class TrainingError(HSCError):
    """Training cannot go on (for example the loss became NaN)."""


def os_error_reason(error: OSError) -> str:
    """Why a file or folder could not be written, for a one-line message: the file that stands where a folder is
    needed, else the system's reason and the path it names."""
    if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename:
        path = Path(error.filename)
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder"
    return f"{error.strerror}: {error.filename}" if error.filename else str(error.strerror or error)


def refuse_as_command(module: str, command: str) -> NoReturn:
    """``python -m`` on a library module that users once ran as a command: one line naming the command that does the
    job, and status 2, instead of exiting 0 having done nothing."""
    os.write(2, f"error: {module} is a library module, not a command; run `hsc-pyg {command}` (or `python -m "
                f"hsc_pyg {command}`; --help lists its flags)\n".encode())
    raise SystemExit(2)
