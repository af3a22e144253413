"""Atomic writes: every output is written to a temp file in the same folder, then renamed over the
target, so a crash or `kill -9` never leaves a half-written file where a finished one is expected."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

from curate.errors import OutputWriteError

# Every Parquet file the pipeline hands between stages is cut into row groups of this many rows: a
# reader of a slice (a stage's batch, dedup's sketches) decompresses only the groups it touches, so
# memory follows the group size, not the file size (a 100k-row file in one group cost ~300 MB to read
# any slice of). Fixed, so the bytes written never depend on a batch size.
ROW_GROUP_ROWS = 10_000
from safety.disk import disk_error_message
from safety.ownership import mark_new_dir, replace_dir

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextmanager
def disk_full_as_error(path: str | Path) -> Iterator[None]:
    """Turn a disk-full failure while writing `path` into a one-line OutputWriteError naming it."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - anything but a full disk re-raises unchanged
        message = disk_error_message(error, path)
        if message is None:
            raise
        raise OutputWriteError(message) from None


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `target`; on success rename it onto `target`, on error delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with disk_full_as_error(target):
            yield tmp
            os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; outputs are ordinary shared files
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success swap it in place of `target`.

    The new folder carries an ownership marker listing what it holds; an existing `target` is replaced
    only when it is ours the same way (missing, empty, or marked with nothing unrecorded inside), so a
    folder of the user's that happens to sit where an output goes is refused, never removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        mark_new_dir(tmp, "curate", "folder")
        with disk_full_as_error(target):
            yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        replace_dir(tmp, target, "curate")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, payload) -> None:
    """Write JSON with sorted keys and a trailing newline, so reruns give identical bytes."""
    write_text(target, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def write_parquet(frame: pl.DataFrame | pl.LazyFrame, target: str | Path) -> None:
    """Write a frame to Parquet atomically (a LazyFrame is streamed with sink_parquet)."""
    with atomic_path(target, suffix=".parquet") as tmp:
        if isinstance(frame, pl.LazyFrame):
            frame.sink_parquet(tmp, compression="zstd", statistics=True, row_group_size=ROW_GROUP_ROWS, engine="streaming")
        else:
            frame.write_parquet(tmp, compression="zstd", statistics=True, row_group_size=ROW_GROUP_ROWS)
