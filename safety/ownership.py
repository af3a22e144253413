"""Which folders and files the tools own, and so may overwrite or remove.

Every output folder a tool creates carries MARKER, written when the folder is created:

    {"tool": "curate", "kind": "run", "created": "...", "generation": 3, "paths": {"ingest": 3, ...}}

A folder is ours only if it carries the marker; inside it, only the top-level names the marker records
(`paths`) are ours, and a recorded folder is ours as a whole. A name is recorded before it is first
written, so a crash never leaves an output we would not recognize. `claim_dir` is the one gate: it
creates a new or empty folder with the marker, accepts one that carries the marker of the same tool and
kind, and refuses everything else with a one-line OwnershipError — and it refuses outright `/`, the
home folder, the working folder and its parents, and any folder holding an input or a config file.

`generation` counts the runs that wrote into the folder; each recorded name keeps the generation that
last recorded it, so a run can remove what an earlier configuration wrote and this one did not
(`remove_stale`). Removal never follows a symbolic link: a recorded link is unlinked, its target kept.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from safety.errors import OwnershipError
from safety.locking import LOCK_FILE

MARKER = ".curate-owned.json"
# Temp names our writers use: tempfile's 8 random characters ([a-z0-9_]) between the target's name and
# `.tmp` / `.old` (atomic_path, atomic_dir, checkpoints, merge), TemporaryDirectory's `.ingest-parts-`,
# and the trainer's fixed `.adapter.tmp`. Only these are removed as leftovers, and only in our folders.
TEMP_NAME = re.compile(r"^\.(?:.+\.[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?\.tmp|.+?(?:\.[a-z0-9_]{8})?\.old|ingest-parts-[a-z0-9_]{8}|adapter\.tmp)$")
_ALWAYS_OURS = {MARKER, LOCK_FILE}

_UMASK = os.umask(0)
os.umask(_UMASK)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_marker(folder: str | Path) -> dict | None:
    """The marker of `folder`, or None when it has none (or one we cannot read: then it is not ours)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("paths"), dict):
        return None
    return marker


def _write_marker(folder: Path, marker: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, folder / MARKER)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_owned(folder: str | Path, tool: str | None = None, kind: str | None = None) -> bool:
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = read_marker(folder)
    if marker is None:
        return False
    return (tool is None or marker.get("tool") == tool) and (kind is None or marker.get("kind") == kind)


def mark_new_dir(folder: str | Path, tool: str, kind: str) -> None:
    """Write a fresh marker into a folder this process just created (a temp folder about to be swapped in)."""
    _write_marker(Path(folder), {"tool": tool, "kind": kind, "created": _now(), "generation": 0, "paths": {}})


def _holds(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


def forbidden_reason(folder: Path, protected: Iterable[str | Path] = ()) -> str | None:
    """Why `folder` (resolved) must never be written into or removed by a tool, or None."""
    if folder == Path(folder.anchor):
        return "is the root folder"
    home = Path.home().resolve()
    if _holds(folder, home):
        return "is the home folder" if folder == home else "holds the home folder"
    cwd = Path.cwd().resolve()
    if _holds(folder, cwd):
        return "is the working folder" if folder == cwd else "holds the working folder"
    for item in protected:
        path = Path(item).expanduser().resolve()
        holder = path if path.is_dir() else path.parent
        if _holds(folder, holder):
            return f"holds {path}, an input or config of this run"
    return None


def claim_dir(
    path: str | Path,
    tool: str,
    kind: str,
    protected: Iterable[str | Path] = (),
    option: str = "the output folder",
    adopt_unmarked: bool = False,
) -> Path:
    """Make `path` an output folder of `tool`: create it (with the marker) when it is missing or empty,
    accept it when it carries our marker, refuse anything else. Returns the resolved folder.

    `adopt_unmarked` is for locations the tool itself chose (a default cache or server home written by
    versions before markers): never for a folder a user named."""
    folder = Path(path).expanduser().resolve()
    reason = forbidden_reason(folder, protected)
    if reason:
        raise OwnershipError(f"{path}: {reason}; {tool} never writes there. Choose a new or empty folder for {option}")
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"{path}: is a file, not a folder; choose a new or empty folder for {option}")
    marker = read_marker(folder)
    if marker is not None:
        if marker.get("tool") != tool or marker.get("kind") != kind:
            raise OwnershipError(
                f"{path}: is a {marker.get('tool')} {marker.get('kind')} folder, not a {tool} {kind} folder; "
                f"choose a new or empty folder for {option}"
            )
        return folder
    if folder.exists() and any(folder.iterdir()) and not adopt_unmarked:
        raise OwnershipError(
            f"{path}: exists and was not created by {tool} (no {MARKER}); {tool} will not write into it. "
            f"Choose a new or empty folder for {option}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    mark_new_dir(folder, tool, kind)
    return folder


def _marker_of(folder: Path) -> dict:
    marker = read_marker(folder)
    if marker is None:
        raise OwnershipError(f"{folder}: has no {MARKER}; it is not a folder the tools created")
    return marker


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name in _ALWAYS_OURS:
        raise ValueError(f"not a top-level output name: {name!r}")


def recorded(folder: str | Path) -> set[str]:
    marker = read_marker(folder)
    return set(marker["paths"]) if marker else set()


def _check_recordable(folder: Path, marker: dict, name: str) -> None:
    _check_name(name)
    target = folder / name
    if target.is_symlink():
        # Writing through a link would write wherever it points; removing it is all we ever do to one.
        raise OwnershipError(f"{target}: is a link to {os.readlink(target)}; {marker.get('tool')} writes only into folders it created. Remove the link")
    if name not in marker["paths"] and target.exists() and not is_owned(target, marker.get("tool")):
        raise OwnershipError(
            f"{target}: exists and was not written by {marker.get('tool')}; move it out of {folder} (a run writes its {name} there)"
        )


def record(folder: str | Path, *names: str) -> None:
    """Record top-level `names` in `folder`'s marker (stamped with its current generation) before they are
    written. A name that already exists there without being ours is refused: it is someone else's."""
    folder = Path(folder)
    marker = _marker_of(folder)
    for name in names:
        _check_recordable(folder, marker, name)
    generation = marker.get("generation", 0)
    if any(marker["paths"].get(name) != generation for name in names):
        marker["paths"].update({name: generation for name in names})
        _write_marker(folder, marker)


def new_generation(folder: str | Path, *names: str) -> int:
    """Start a new run in `folder` that will write `names`: they are checked, then recorded with the new
    generation; names recorded from now on are this run's too, and the rest is stale (`remove_stale`)."""
    folder = Path(folder)
    marker = _marker_of(folder)
    for name in names:
        _check_recordable(folder, marker, name)
    marker["generation"] = int(marker.get("generation", 0)) + 1
    marker["paths"].update({name: marker["generation"] for name in names})
    _write_marker(folder, marker)
    return marker["generation"]


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, its target never followed
    elif path.is_dir():
        shutil.rmtree(path)


def remove_recorded(folder: str | Path, name: str, forget: bool = False) -> bool:
    """Remove `folder/name` if the marker records it; True when something was removed."""
    folder = Path(folder)
    marker = _marker_of(folder)
    _check_name(name)
    if name not in marker["paths"]:
        return False
    target = folder / name
    existed = target.exists() or target.is_symlink()
    _remove_path(target)
    if forget:
        del marker["paths"][name]
        _write_marker(folder, marker)
    return existed


def remove_stale(folder: str | Path) -> list[str]:
    """Remove the recorded outputs the current generation did not record (an earlier configuration's
    stages and exports); returns their names."""
    folder = Path(folder)
    marker = _marker_of(folder)
    generation = marker.get("generation", 0)
    stale = sorted(name for name, stamp in marker["paths"].items() if stamp != generation)
    removed = [name for name in stale if remove_recorded(folder, name, forget=True)]
    return removed


def remove_all_recorded(folder: str | Path) -> list[str]:
    """Everything the marker records, removed (`curate run --clean`); unrelated files stay."""
    folder = Path(folder)
    return [name for name in sorted(recorded(folder)) if remove_recorded(folder, name, forget=True)]


def _check_replaceable(target: Path, tool: str) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OwnershipError(f"{target}: exists and is not a folder {tool} wrote; move it away or choose another output")
    if not target.exists() or not any(target.iterdir()):
        return
    marker = read_marker(target)
    if marker is None or marker.get("tool") != tool:
        raise OwnershipError(
            f"{target}: exists and was not created by {tool} (no {MARKER}); move it away or choose another output folder"
        )
    foreign = sorted(p.name for p in target.iterdir() if p.name not in marker["paths"] and p.name not in _ALWAYS_OURS)
    if foreign:
        raise OwnershipError(f"{target}: holds files {tool} did not write ({', '.join(foreign[:3])}); move them out first")


def check_replaceable(target: str | Path, tool: str, protected: Iterable[str | Path] = (), option: str = "the output folder") -> Path:
    """Fail early (before hours of work) when `replace_dir` onto `target` would be refused."""
    resolved = Path(target).expanduser().resolve()
    reason = forbidden_reason(resolved, protected)
    if reason:
        raise OwnershipError(f"{target}: {reason}; {tool} never writes there. Choose a new or empty folder for {option}")
    _check_replaceable(Path(target).expanduser().absolute(), tool)
    return resolved


def replace_dir(tmp: Path, target: Path, tool: str) -> None:
    """Swap the finished folder `tmp` (carrying its marker) into `target`, which must be missing, empty,
    or ours holding nothing but what its marker records. The old folder is renamed aside first, so
    `target` is always either the old or the new folder."""
    tmp, target = Path(tmp), Path(target)
    marker = _marker_of(tmp)
    marker["paths"].update({p.name: marker.get("generation", 0) for p in tmp.iterdir() if p.name not in _ALWAYS_OURS})
    _write_marker(tmp, marker)
    _check_replaceable(target, tool)
    if target.is_dir() and any(target.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # onto a missing or empty folder


def claim_file(path: str | Path, tool: str, protected: Iterable[str | Path] = ()) -> Path:
    """A single output file (`--json FILE`, `--out FILE.html`): written when new, or when it lies in a
    folder of `tool` that records it; an existing file of anyone else is refused."""
    target = Path(path).expanduser().absolute()
    parent = target.parent.resolve()
    for item in protected:
        if Path(item).expanduser().resolve() == parent / target.name:
            raise OwnershipError(f"{path}: is an input of this command; choose another output file")
    if is_owned(parent, tool) and forbidden_reason(parent) is None:
        record(parent, target.name)
        return target
    if target.exists() or target.is_symlink():
        raise OwnershipError(f"{path}: exists and was not written by {tool}; choose a new file name, or remove it yourself")
    return target


def _temp_leftovers(folder: Path, names: Iterable[str]) -> list[Path]:
    found = []
    for name in names:
        top = folder / name
        if TEMP_NAME.match(name):
            found.append(top)
            continue
        if top.is_symlink() or not top.is_dir():
            continue
        for root, dirs, files in os.walk(top, followlinks=False):
            for entry in [*dirs, *files]:
                if TEMP_NAME.match(entry):
                    found.append(Path(root) / entry)
            dirs[:] = [d for d in dirs if not TEMP_NAME.match(d)]
    return found


def remove_leftover_temps(folder: str | Path) -> list[Path]:
    """Remove temp files and folders a killed run left in our folder `folder` and in the folders its
    marker records. Call it only while holding the folder's lock: then no live run is writing them."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return []
    candidates = [p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)] + sorted(marker["paths"])
    leftovers = _temp_leftovers(folder, candidates)
    for path in leftovers:
        _remove_path(path)
    return leftovers


def remove_marked_temp_dirs(parent: str | Path, prefix: str, tool: str) -> list[Path]:
    """Remove `prefix*.tmp` folders in `parent` (not our folder) that carry `tool`'s marker: temp folders
    a killed run of ours left beside its output (e.g. `train merge`). Anything unmarked stays."""
    removed = []
    for path in Path(parent).glob(f"{glob.escape(prefix)}*.tmp"):
        if TEMP_NAME.match(path.name) and is_owned(path, tool):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
