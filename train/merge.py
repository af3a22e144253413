"""`train merge`: fold the LoRA adapter into the base weights and write a plain safetensors model folder
(plus the tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no peft installed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from train.config import ModelConfig
from train.errors import ModelLoadError
from train.models import load_adapter, load_base_model, load_tokenizer


def merge_adapter(model_config: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"{adapter_dir}: adapter folder not found")
    base = load_base_model(model_config, dtype=dtype)
    merged = load_adapter(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True
    tokenizer = load_tokenizer(model_config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
