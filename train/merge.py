"""`train merge`: fold the LoRA adapter into the base weights and write a plain safetensors model folder
(plus the tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no peft installed.

The output folder is ours or new: an existing `--out` is replaced only when a previous `train merge`
wrote it (its ownership marker lists everything inside); anything else is refused before the merge."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from safety.locking import exclusive_lock
from safety.ownership import check_replaceable, claim_dir, mark_new_dir, remove_marked_temp_dirs, replace_dir
from train.config import ModelConfig
from train.errors import ModelLoadError
from train.models import load_adapter, load_base_model, load_tokenizer

KIND = "merged-model"


def merge_adapter(
    model_config: ModelConfig,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    protected: Iterable[str | Path] = (),
) -> Path:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"{adapter_dir}: adapter folder not found")
    protected = [adapter_dir, *protected]
    check_replaceable(out_dir, "train", protected, option="--out")  # before minutes of merging
    # Load first: a base or adapter that cannot be loaded fails before any output folder exists.
    base = load_base_model(model_config, dtype=dtype)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = load_tokenizer(model_config)
    out_dir = claim_dir(out_dir, "train", KIND, protected, option="--out")
    with exclusive_lock(out_dir, "train merge"):
        # Temp folders of a killed merge sit beside --out (the rename must stay on one file system);
        # only those carrying our marker are ours to remove.
        remove_marked_temp_dirs(out_dir.parent, f".{out_dir.name}.", "train")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            mark_new_dir(tmp, "train", KIND)
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            replace_dir(tmp, out_dir, "train")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir
