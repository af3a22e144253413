"""Errors a user can cause. Each carries a one-line message (file, row, field, what was expected);
the CLIs print it without a traceback and exit non-zero."""

from __future__ import annotations


class CurateError(Exception):
    """Base class: `str(error)` is the whole one-line message shown to the user."""

    exit_code = 2

    def __init__(self, message: str):
        # Newlines would break the one-line promise (and could smuggle raw input into logs).
        super().__init__(" ".join(str(message).split()))


class InputFileError(CurateError):
    """A raw input file that cannot be read at all (missing, unreadable, not the format it claims)."""


class ConfigError(CurateError):
    """A pipeline or stage config that does not match its schema."""


class SchemaValidationError(CurateError):
    """A record file that does not match a canonical schema (`curate validate`)."""


class RunStateError(CurateError):
    """A run directory in a state the command cannot work with (missing stage, manifest, ...)."""


class ExternalServiceError(CurateError):
    """A service the run depends on (Argilla, Redis) is down or refused us."""


class OutputWriteError(CurateError):
    """An output could not be written for lack of space (disk full, quota, file-size limit)."""
