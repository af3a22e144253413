"""An exclusive lock on an output folder, held for a whole run, so two runs never interleave their writes.

The lock is `flock` on LOCK_FILE inside the folder. The kernel releases it when the holder's process
ends, however it ends (`kill -9` included), so a stale lock never blocks the next run; the file only
carries the holder's pid for the message a second run prints. The file is never deleted (deleting a
flock'ed file lets two processes lock two different files of one name).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safety.errors import LockedError

LOCK_FILE = ".curate.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextmanager
def exclusive_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold the lock of `folder` (which must exist) for the `with` block; a second holder gets a one-line
    LockedError naming the first one's pid."""
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{folder}: another {what} is writing here (pid {_holder(fd)}); wait for it to finish, or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
