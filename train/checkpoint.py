"""Checkpoints: adapter + optimizer + scheduler + RNG states + data position, written atomically.

A checkpoint is a folder `checkpoints/step-000123/`, built under a temp name and renamed into place, so
any `step-*` folder is complete (a `kill -9` mid-write leaves only a `.tmp` folder, which is ignored and
cleaned up).
"""

from __future__ import annotations

import json
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


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def save_checkpoint(output_dir: str | Path, step: int, peft_model, state: dict, keep: int) -> Path:
    """Write adapter + `state` (optimizer, scheduler, rng, position, ...) as checkpoints/step-N."""
    folder = Path(output_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    try:
        peft_model.save_pretrained(tmp / "adapter")
        torch.save(state, tmp / "state.pt")
        (tmp / "position.json").write_text(json.dumps({k: state[k] for k in ("step", "epoch", "cursor")}) + "\n")
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


def load_checkpoint(path: Path, peft_model, fingerprint: str) -> dict:
    """Check the checkpoint belongs to this run (`fingerprint`), load its adapter weights into
    `peft_model` in place and return the saved state dict."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = path / "adapter" / "adapter_model.safetensors"
    if not weights.is_file() or not (path / "state.pt").is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (adapter_model.safetensors or state.pt missing)")
    state = torch.load(path / "state.pt", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: saved by a different run (model, data, LoRA, seed or batch shape changed); "
            "use --no-resume to start over, or another output_dir"
        )
    try:
        result = set_peft_model_state_dict(peft_model, load_file(weights))
    except RuntimeError as error:
        raise CheckpointError(f"{path}: adapter does not fit the model: {' '.join(str(error).split())[:200]}") from None
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{path}: adapter does not match the model ({len(result.unexpected_keys)} unexpected keys)")
    return state
