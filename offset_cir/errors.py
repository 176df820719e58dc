"""Exceptions that carry a message meant for a person (the CLI prints them without a traceback)."""


class UserInputError(ValueError):
    """Bad input from the user: a file, record or field that is not what was expected.

    The message must name the file, the record or the field and say what was expected.
    """


class DatasetError(UserInputError):
    """A dataset folder or annotation file is missing something or is malformed."""


class CheckpointError(UserInputError):
    """A checkpoint cannot be loaded into the requested model (wrong architecture, missing keys, ...)."""


class OfflineError(UserInputError):
    """Weights were requested from a hub that cannot be reached."""
