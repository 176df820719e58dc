"""Exceptions that carry a message meant for a person (the CLI prints them without a traceback)."""


class OffsetError(Exception):
    """Base of the errors whose message is meant for a person (the CLI prints it, exits non-zero)."""


class UserInputError(OffsetError, ValueError):
    """Bad input from the user: a file, record or field that is not what was expected.

    The message must name the file, the record or the field and say what was expected.
    """


class DatasetError(UserInputError):
    """A dataset folder or annotation file is missing something or is malformed."""


class CheckpointError(UserInputError):
    """A checkpoint cannot be loaded into the requested model (wrong architecture, missing keys, ...)."""


class OfflineError(UserInputError):
    """Weights were requested from a hub that cannot be reached."""


class TrainingError(OffsetError, RuntimeError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""


class ExportError(OffsetError, RuntimeError):
    """An exported graph does not reproduce the model it came from; nothing was written."""
