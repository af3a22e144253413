"""The one exception class of the safety promises. Both CLIs print it as one line and exit 2, like
their own CurateError / TrainError (safety/ imports neither tool, so it cannot reuse their classes)."""

from __future__ import annotations


class SafetyError(Exception):
    """A refused write, removal or lock: `str(error)` is the whole one-line message shown to the user."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class OwnershipError(SafetyError):
    """A folder or file the tools did not create (or must never touch) was about to be written or removed."""


class LockedError(SafetyError):
    """Another process holds the exclusive lock of an output folder."""
