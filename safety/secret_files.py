"""Files that hold secrets (API keys, passwords, a database holding them) are private from their first
byte: created 0600 with O_EXCL (never a chmod after the fact, which leaves a window where the file is
readable by others), in folders created 0700. Written atomically like every other output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SECRET_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create `path` (and missing parents) 0700. A folder that already exists is left as it is: it
    may be the user's, and the secret files inside are 0600 either way."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)  # the umask can only remove bits from 0700
        except FileExistsError:
            pass
    return path


def write_secret_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically, the file 0600 from the moment it exists."""
    path = Path(path)
    private_dir(path.parent)
    # mkstemp creates with O_CREAT | O_EXCL and mode 0600.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_secret_json(path: str | Path, payload) -> None:
    write_secret_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def ensure_secret_file(path: str | Path) -> Path:
    """Make sure `path` exists as a 0600 file before another program (a database server) opens it:
    that program then writes into a private file instead of creating one with its own umask."""
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE))
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, SECRET_FILE_MODE)  # one our tools created earlier, before this rule
    return path
