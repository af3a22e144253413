"""A full disk is an operator's problem, not a bug: it must read as one line naming the file being
written, never as a traceback. Python raises OSError (errno ENOSPC, EDQUOT, or EFBIG for a file-size
limit); Rust writers (Polars, safetensors) raise their own error whose message names the OS error
(`(os error 28)`, `Os { code: 28, ... }`). All are recognised here, for both CLIs."""

from __future__ import annotations

import errno
import re

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or the process's file-size limit",
}
# Rust writers (Polars, safetensors) carry the errno in their message only.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")


def disk_full_reason(error: BaseException | None) -> str | None:
    """Why a write failed for lack of space, or None when `error` is something else (its cause and
    context are looked at too: a library may wrap the OSError in its own exception)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _REASONS:
            return _REASONS[error.errno]
        for match in _RUST_OS_ERROR.finditer(str(error)):
            code = int(match.group(1) or match.group(2))
            if code in _REASONS:
                return _REASONS[code]
        error = error.__cause__ or error.__context__
    return None


def disk_error_message(error: BaseException, path=None) -> str | None:
    """One line for a disk-full error (naming `path`, else the error's own file name), or None."""
    reason = disk_full_reason(error)
    if reason is None:
        return None
    where = path or getattr(error, "filename", None) or "an output file"
    return f"{where}: cannot write: {reason}; free some space and rerun"
