"""User-facing errors.

Every expected failure (bad data, bad config, bad checkpoint) raises a subclass of :class:`HSCError` whose message is a
single line: what is wrong, where, and how to fix it. The command lines print that line to stderr and exit with status 2.
"""


class HSCError(Exception):
    """Base class of the errors a user can cause and fix."""

    exit_code = 2


class DataError(HSCError):
    """A dataset file or folder is missing or malformed."""


class VocabError(HSCError):
    """A vocabulary file is missing or malformed, or disagrees with a model."""


class ConfigError(HSCError):
    """An option has an invalid value or options contradict each other."""


class CheckpointError(HSCError):
    """A checkpoint is missing, unreadable, unsafe or of an unknown layout."""


class TrainingError(HSCError):
    """Training cannot go on (for example the loss became NaN)."""
