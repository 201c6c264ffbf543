"""Errors caused by the user's input.

The entry point prints any ``UserError`` as a single line (``error: <message>``) and exits with status 2,
so every message must name what is wrong (the config key, the file, the path) and, where possible, how to
fix it. Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Base class: bad input that the user can fix."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type, or incompatible settings."""


class DataError(UserError):
    """Missing dataset root, unreadable or corrupt image, unusable image size."""


class CheckpointError(UserError):
    """Missing checkpoint or export, a file of the wrong kind, or mismatched weights."""


class MissingWeightsError(UserError):
    """Pretrained weights (VGG for LPIPS, Inception for FID) that are not on this machine."""


class NonFiniteLossError(UserError):
    """A loss became NaN or inf; training stopped after saving a checkpoint."""


class RunInterrupted(BaseException):
    """Training stopped before its end by a signal (pre-emption, Ctrl-C) after saving a checkpoint.

    A BaseException, like KeyboardInterrupt: it ends a sweep rather than counting as one failed trial. The entry
    point prints its message and exits with the shell's status for the signal (128 + its number).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)
