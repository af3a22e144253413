"""Continual fine-tuning: start a run from an existing adapter's LoRA weights (`init_adapter`).

Only the weights are taken (adapter_model.safetensors, never a pickle); the optimizer and schedule start
fresh. The adapter's lineage (path, weights sha256, the run and data it came from) is recorded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from train.errors import ModelLoadError, TrainConfigError

WEIGHTS = "adapter_model.safetensors"
# adapter_config.json key -> the LoraSettings field it must equal
SHAPE_KEYS = {"r": "r", "lora_alpha": "alpha", "use_dora": "use_dora", "use_rslora": "use_rslora"}


def _files(adapter_dir: Path) -> tuple[Path, Path]:
    config_file, weights = adapter_dir / "adapter_config.json", adapter_dir / WEIGHTS
    if not config_file.is_file():
        raise ModelLoadError(f"{adapter_dir}: init_adapter has no adapter_config.json (not a PEFT adapter folder)")
    if not weights.is_file():  # a pickled adapter_model.bin is never loaded
        raise ModelLoadError(f"{adapter_dir}: init_adapter has no {WEIGHTS} (pickled adapter_model.bin is not loaded)")
    return config_file, weights


def weights_sha256(adapter_dir: str | Path) -> str:
    _, weights = _files(Path(adapter_dir))
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def init_adapter_lineage(adapter_dir: str | Path) -> dict:
    """Where the init adapter came from: its path, weights sha256, and (when its run's train_config.json
    sits beside it) that run's output_dir, data split and steps."""
    adapter_dir = Path(adapter_dir)
    lineage: dict = {"path": str(adapter_dir), "sha256": weights_sha256(adapter_dir)}
    run_config = adapter_dir.parent / "train_config.json"
    if run_config.is_file():
        try:
            previous = json.loads(run_config.read_text(encoding="utf-8"))
            lineage["output_dir"] = previous.get("output_dir")
            lineage["split_dir"] = (previous.get("data") or {}).get("split_dir")
            lineage["max_steps"] = (previous.get("optim") or {}).get("max_steps")
            lineage["mode"] = previous.get("mode")
        except (ValueError, AttributeError):
            lineage["train_config"] = "unreadable"
    return lineage


def check_init_adapter(adapter_dir: str | Path, config) -> None:
    """Refuse, in one line, an init adapter of another base model or LoRA shape than this run's."""
    from train.models import base_model_id

    adapter_dir = Path(adapter_dir)
    config_file, _ = _files(adapter_dir)
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelLoadError(f"{config_file}: unreadable JSON ({error})") from None
    if adapter_dir.resolve().is_relative_to(Path(config.output_dir).resolve()):
        raise TrainConfigError(f"{adapter_dir}: init_adapter lies inside this run's output_dir {config.output_dir} (the run replaces it); give a new output_dir")
    base = base_model_id(config.model)
    if saved.get("base_model_name_or_path") not in (None, base):
        raise TrainConfigError(f"{adapter_dir}: init_adapter was trained on base {saved['base_model_name_or_path']!r}, this run's base is {base!r}")
    for key, field in SHAPE_KEYS.items():
        mine = getattr(config.lora, field)
        if key in saved and saved[key] != mine:
            raise TrainConfigError(f"{adapter_dir}: init_adapter has {key}={saved[key]!r}, this run has lora.{field}={mine!r}")


def load_init_adapter(peft_model, adapter_dir: str | Path) -> None:
    """Copy the init adapter's LoRA weights into `peft_model` (in place); every LoRA tensor must match."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    _, weights_file = _files(adapter_dir)
    try:
        weights = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{weights_file}: unreadable safetensors: {' '.join(str(error).split())[:200]}") from None
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as error:
        raise TrainConfigError(f"{adapter_dir}: init_adapter does not fit this run's LoRA: {' '.join(str(error).split())[:200]}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise TrainConfigError(
            f"{adapter_dir}: init_adapter's LoRA modules differ from this run's (lora.target_modules): "
            f"{len(unexpected)} unexpected, {len(missing)} missing, e.g. {example}"
        )
