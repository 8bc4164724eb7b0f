"""User-facing errors.

Every error a user can cause (a bad file, a wrong checkpoint, an unreachable hub) is raised as a
subclass of :class:`RSRefSegError` whose message is one line naming the file and the problem. The
command-line interface prints ``error: <message>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class RSRefSegError(Exception):
    """Base class of errors with a one-line, user-facing message."""


class DataError(RSRefSegError):
    """A data file (image, JSONL, annotation) is missing, corrupt or inconsistent."""


class WeightsError(RSRefSegError):
    """Base weights cannot be found or loaded (hub unreachable, bad directory, bad file)."""


class ConfigError(RSRefSegError):
    """A configuration key or value is not valid."""


class OutputError(RSRefSegError, OSError):
    """An output cannot be written (disk full, I/O error, no permission, not a folder).

    Also an :class:`OSError` (``errno`` kept), so code catching ``OSError`` still catches it.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        if errno is None:
            super().__init__(message)
        else:
            super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointMismatchError(WeightsError):
    """A checkpoint's keys or shapes do not match the model it is loaded into."""

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        shape_mismatch: list[str] | None = None,
    ) -> None:
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.shape_mismatch = list(shape_mismatch or [])
        super().__init__(message)
