"""A full disk is an operator's problem, not a bug: it must read as one line naming the file being
written, never as a traceback. Python raises OSError (errno ENOSPC, EDQUOT, or EFBIG for a file-size
limit); Polars' Rust writers raise a PolarsError whose message ends in `(os error 28)`. Both are
recognised here, for both CLIs."""

from __future__ import annotations

import errno
import re

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
}
_POLARS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def disk_full_reason(error: BaseException) -> str | None:
    """Why a write failed for lack of space, or None when `error` is something else."""
    if isinstance(error, OSError) and error.errno in _REASONS:
        return _REASONS[error.errno]
    if type(error).__module__.startswith("polars"):
        match = _POLARS_OS_ERROR.search(str(error))
        if match and int(match.group(1)) in _REASONS:
            return _REASONS[int(match.group(1))]
    return None


def disk_error_message(error: BaseException, path=None) -> str | None:
    """One line for a disk-full error (naming `path`, else the error's own file name), or None."""
    reason = disk_full_reason(error)
    if reason is None:
        return None
    where = path or getattr(error, "filename", None) or "an output file"
    return f"{where}: cannot write: {reason}; free some space and rerun (finished stages are kept)"
