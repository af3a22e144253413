"""Checkpoints: adapter + optimizer + scheduler + RNG states + data position, written atomically.

A checkpoint is a folder `checkpoints/step-000123/`, built under a temp name and renamed into place, so
any `step-*` folder is complete (a `kill -9` mid-write leaves only a `.tmp` folder, which is ignored and
cleaned up). Nothing in it is pickled, so loading one never runs code:

    adapter/             peft's adapter (safetensors + adapter_config.json)
    state.json           step, epoch, cursor, fingerprint, scheduler, optimizer param groups, RNG states
                         (numpy/python as JSON), with `{"$tensor": name}` where a tensor was
    state.safetensors    those tensors: optimizer moments and step counts, torch/cuda RNG ByteTensors
    manifest.json        sha256 and size of every other file, written last

Loading checks the manifest (a truncated or damaged file is caught before it is parsed), then the run
fingerprint in state.json, and only then reads a tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from train.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
FORMAT = "train-checkpoint/1"
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, damaged or not in our format (an older one may still be good)."""


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------- state <-> JSON + tensors
def _encode(value, name: str, tensors: dict):
    """A JSON-able form of `value`; tensors go to `tensors[name]`. Tuples, int-keyed dicts, numpy arrays
    and non-finite floats are tagged so `_decode` gives back exactly what was saved."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        return {"$ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, f"{name}.key{i}", tensors), _encode(v, f"{name}.{i}", tensors)] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {name}: cannot store a {type(value).__name__}")


def _decode(value, tensors):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        return np.asarray(value["$ndarray"], dtype=np.dtype(value["dtype"]))
    if "$float" in value:
        return float(value["$float"])
    if "$items" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["$items"]}
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def _tensor_names(value) -> set[str]:
    if isinstance(value, list):
        return set().union(*map(_tensor_names, value)) if value else set()
    if isinstance(value, dict):
        if "$tensor" in value:
            return {value["$tensor"]}
        return set().union(*map(_tensor_names, value.values())) if value else set()
    return set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- save
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every `step-*` folder, oldest first (complete or not: loading decides which are usable)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _write_state(folder: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict = {}
    encoded = _encode(state, "state", tensors)
    save_file(tensors, folder / STATE_TENSORS)
    (folder / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": encoded}, sort_keys=True) + "\n")


def _write_manifest(folder: Path) -> None:
    files = {
        path.relative_to(folder).as_posix(): {"sha256": _sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True) + "\n")


def save_checkpoint(output_dir: str | Path, step: int, peft_model, state: dict, keep: int) -> Path:
    """Write adapter + `state` (optimizer, scheduler, rng, position, ...) as checkpoints/step-N."""
    folder = Path(output_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    try:
        peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        _write_state(tmp, state)
        (tmp / "position.json").write_text(json.dumps({k: state[k] for k in ("step", "epoch", "cursor")}) + "\n")
        _write_manifest(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".step-*.tmp"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------- load
def _read_json(path: Path, what: str) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable {what} ({type(error).__name__})") from None
    if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path}: not a {FORMAT} {what}")
    return loaded


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest; CorruptCheckpointError names the first that does not match."""
    if not (path / MANIFEST).is_file():
        legacy = " (an older pickle-based state.pt, never loaded)" if (path / "state.pt").exists() else ""
        raise CorruptCheckpointError(f"{path}: no {MANIFEST}{legacy}")
    files = _read_json(path / MANIFEST, "checkpoint manifest").get("files")
    if not isinstance(files, dict) or not {STATE_JSON, STATE_TENSORS, ADAPTER_WEIGHTS} <= files.keys():
        raise CorruptCheckpointError(f"{path / MANIFEST}: does not list {STATE_JSON}, {STATE_TENSORS} and {ADAPTER_WEIGHTS}")
    for name, expected in sorted(files.items()):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_file():
            raise CorruptCheckpointError(f"{file}: missing")
        if not isinstance(expected, dict) or file.stat().st_size != expected.get("bytes") or _sha256(file) != expected.get("sha256"):
            raise CorruptCheckpointError(f"{file}: damaged (size or sha256 differs from {MANIFEST})")


def load_checkpoint(path: Path, peft_model, fingerprint: str) -> dict:
    """Check the checkpoint is intact (manifest) and belongs to this run (`fingerprint`, read from JSON
    before any tensor), load its adapter weights into `peft_model` in place and return the saved state."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    verify_checkpoint(path)
    encoded = _read_json(path / STATE_JSON, "checkpoint state").get("state")
    if not isinstance(encoded, dict) or encoded.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: saved by a different run (model, data, LoRA, seed or batch shape changed); "
            "use --no-resume to start over, or another output_dir"
        )
    try:
        tensors = load_file(path / STATE_TENSORS)
        weights = load_file(path / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{path}: unreadable safetensors: {' '.join(str(error).split())[:200]}") from None
    missing = _tensor_names(encoded) - tensors.keys()
    if missing:
        raise CorruptCheckpointError(f"{path / STATE_TENSORS}: lacks {len(missing)} tensor(s) named in {STATE_JSON}, e.g. {min(missing)}")
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: adapter does not fit the model: {' '.join(str(error).split())[:200]}") from None
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{path}: adapter does not match the model ({len(result.unexpected_keys)} unexpected keys)")
    try:
        return _decode(encoded, tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptCheckpointError(f"{path / STATE_JSON}: malformed state ({type(error).__name__})") from None


def latest_usable_checkpoint(output_dir: str | Path, warn, set_aside: bool = True) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`. Each damaged newer one is reported through
    `warn(message)` and (with `set_aside`) renamed `damaged-step-N`, kept for inspection but out of the
    way of resume and pruning. None when there is no checkpoint; CheckpointError when none is intact."""
    found = list_checkpoints(output_dir)
    damaged: list[tuple[Path, str]] = []
    good = None
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as error:
            damaged.append((path, str(error)))
            continue
        good = path
        break
    if damaged and good is None:
        raise CheckpointError(f"no intact checkpoint in {damaged[0][0].parent}: {damaged[0][1]}; use --no-resume to start over")
    for path, problem in damaged:
        if set_aside:
            os.replace(path, path.with_name(f"damaged-{path.name}"))
        warn(f"resuming from {good.name}, set aside as damaged-{path.name}: {problem}")
    return good
