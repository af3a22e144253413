"""The training config: pydantic models, loaded from YAML, with `--set a.b=value` flags on top.

One config type serves `train sft`, `train dpo`, `train eval` and `train merge`; each verb reads the
sections it needs. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from train.errors import TrainConfigError


class _Section(BaseModel):
    # Every float must be finite: lr=inf or max_grad_norm=nan would train to an all-NaN adapter.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "tuple"}
Beta = Annotated[float, Field(ge=0, lt=1)]


class ModelConfig(_Section):
    path: str = Field(description="local HF model dir (safetensors), a .gguf file, or 'smollm2-135m-instruct'")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (set automatically for a .gguf path)")
    trust_remote_code: bool = False


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=65536)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


class DataConfig(_Section):
    split_dir: str = Field(description="folder with train-*.parquet and validation-*.parquet from `curate split`")
    max_seq_len: int = Field(1024, ge=8, le=1 << 24)
    overflow: Literal["truncate", "reject"] = "truncate"
    max_train_samples: int | None = Field(None, ge=1)
    max_val_samples: int | None = Field(None, ge=1)


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="AdamW denominator term")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null = no clipping)")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_rows: int = Field(1, ge=1, description="packed rows per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class EvalConfig(_Section):
    every: int = Field(0, ge=0, description="validation loss every N steps (0 = only at the end)")
    max_rows: int | None = Field(None, ge=1, description="cap on packed validation rows per evaluation")
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evaluations without improvement (0 = off)")
    early_stopping_min_delta: float = Field(0.0, ge=0)
    at_end: bool = Field(True, description="after training, compare base vs adapter validation loss")
    general_set: str | None = Field(None, description="optional split dir / parquet of general chats, to see forgetting")
    samples: int = Field(2, ge=0, description="generated samples shown side by side by `train eval`")
    max_new_tokens: int = Field(48, ge=1)


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class DpoConfig(_Section):
    beta: float = Field(0.1, gt=0)
    precompute_ref_logps: bool = False


class TrainConfig(_Section):
    model: ModelConfig
    data: DataConfig
    output_dir: str = "runs/train"
    seed: int = Field(0, ge=0, lt=1 << 32, description="seeds torch, numpy and python (numpy needs 0 <= seed < 2**32)")
    lora: LoraSettings = LoraSettings()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    dpo: DpoConfig = DpoConfig()
    progress: bool = True
    threads: Annotated[int, Field(ge=1)] | Literal["all", "auto"] = Field(
        "all",
        description="CPU threads for torch: 'all' cores (split between local DDP processes), a number, or 'auto' = "
        "the cores not already busy, for shared machines where oversubscribed threads spin 5-10x slower. 'auto' "
        "depends on the load at start, so results are only bit-reproducible with 'all' or a number.",
    )


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise TrainConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, object]:
    """`a.b=value` -> ("a.b", YAML-parsed value)."""
    if "=" not in item:
        raise TrainConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise TrainConfigError(f"--set {key}: cannot parse value {raw!r}: {error}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """Read YAML (if given), apply `overrides` ({"optim.max_steps": 5, ...}) and validate."""
    tree: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise TrainConfigError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(loaded, dict):
            raise TrainConfigError(f"{path}: the top level must be a mapping")
        tree.update(loaded)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)  # `--set optim.max_grad_norm=null` means null
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        # Drop pydantic's union-member tags ("constrained-int", "literal[...]") from the field path.
        where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p not in UNION_TAGS))
        given = first.get("input")
        got = f", got {given!r}" if isinstance(given, (int, float, str)) and first["type"] != "missing" else ""
        source = f"{path}: " if path else ""
        raise TrainConfigError(f"{source}{where}: {first['msg']}{got} ({len(error.errors())} problem(s))") from None
