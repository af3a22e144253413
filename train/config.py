"""The training config: pydantic models, loaded from YAML, with `--set a.b=value` flags on top.

One config type serves `train sft`, `train dpo`, `train eval` and `train merge`; each verb reads the
sections it needs. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from train.errors import TrainConfigError


class _Section(BaseModel):
    # Every float must be finite: lr=inf or max_grad_norm=nan would train to an all-NaN adapter.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Names chat templates can be given by (`data.chat_template`); anything else is a .jinja file path.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}

UNION_TAGS = {"int", "float", "str", "bool", "none", "list", "tuple"}
Beta = Annotated[float, Field(ge=0, lt=1)]


class ModelConfig(_Section):
    path: str = Field(description="local HF model dir (safetensors), a .gguf file, or 'smollm2-135m-instruct'")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (set automatically for a .gguf path)")
    trust_remote_code: bool = False
    name: str | None = Field(
        None, description="the base model's Hugging Face id, recorded in the adapter (default: from the GGUF metadata, "
        "the HF cache layout, or `path` as written)",
    )  # fmt: skip


class LoraSettings(_Section):
    r: int = Field(16, ge=1, le=65536)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


class ReplayConfig(_Section):
    split_dir: str = Field(description="the previous run's split folder; rows of its train split are mixed into this run's")
    fraction: float = Field(gt=0, le=0.9, description="share of the mixed train split that is replayed rows (sampled with `seed`)")
    upsample: bool = Field(
        False,
        description="when the previous train split holds fewer rows than `fraction` needs: true repeats rows (every "
        "row once, the rest sampled with replacement) to reach it, as curate's mix does; false takes every row once, "
        "so the share is smaller (a warning says how much)",
    )


class DataConfig(_Section):
    split_dir: str = Field(description="folder with train-*.parquet and validation-*.parquet from `curate split`")
    max_seq_len: int = Field(1024, ge=8, le=1 << 24)
    overflow: Literal["truncate", "drop", "reject"] = Field(
        "truncate",
        description="a sample longer than max_seq_len: 'truncate' keeps its first max_seq_len tokens, 'drop' leaves it "
        "out, 'reject' refuses the run. Either way the counts are printed and recorded in train_config.json",
    )
    completion_only_loss: bool = Field(True, description="SFT loss on assistant tokens only; false = on every token")
    chat_template: str | None = Field(
        None, description="the model's own template (null), a named one (" + ", ".join(NAMED_TEMPLATES) + ") or a .jinja file"
    )
    max_train_samples: int | None = Field(None, ge=1)
    max_val_samples: int | None = Field(None, ge=1)
    replay: ReplayConfig | None = None


class OptimConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="AdamW denominator term")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null = no clipping)")
    warmup_steps: int = Field(0, ge=0, le=1 << 40)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_steps: int | None = Field(None, ge=1, le=1 << 40, description="optimizer steps (default 100 unless epochs is set)")
    epochs: float | None = Field(None, gt=0, le=1e6, description="passes over the packed train rows; sets max_steps")
    warmup_ratio: float | None = Field(None, ge=0, le=1, description="warmup as a share of max_steps (instead of warmup_steps)")
    batch_rows: int = Field(1, ge=1, le=1 << 20, description="packed rows per micro-batch (per process)")
    batch_samples: int | None = Field(
        None, ge=1, le=1 << 30,
        description="samples per micro-batch (per process), instead of batch_rows: turned into packed rows with the "
        "plan's average samples per row",
    )  # fmt: skip
    grad_accum: int = Field(1, ge=1, le=1 << 20, description="micro-batches per optimizer step")
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _one_way_each(self):
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set max_steps or epochs, not both")
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


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
    beta: float = Field(0.1, gt=0, le=1e6)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped labels (sigmoid = cDPO, robust)")
    precompute_ref_logps: bool = False

    @model_validator(mode="after")
    def _smoothing_fits_loss(self):
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to loss_type sigmoid or robust, not {self.loss_type}")
        return self


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
    report_to: list[Literal["tensorboard", "trackio", "none"]] = Field(
        default_factory=lambda: ["none"],
        description="experiment trackers, local only: tensorboard (<output_dir>/tensorboard), trackio (<output_dir>/trackio), or none",
    )
    progress: bool = True
    log_every: int = Field(
        1, ge=1, le=1 << 40,
        description="log loss, lr and grad norm every N steps (means over those steps); the loss is read from the "
        "device only then (and at checkpoints), so N > 1 saves a host sync per step on a GPU",
    )  # fmt: skip
    init_adapter: str | None = Field(
        None,
        description="continue this adapter folder (its adapter_model.safetensors; same base and LoRA shape) with a fresh optimizer and schedule",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_as_list(cls, value):
        return [value] if isinstance(value, str) else value  # TRL accepts report_to: tensorboard

    threads: Annotated[int, Field(ge=1)] | Literal["all", "auto"] = Field(
        "all",
        description="CPU threads for torch: 'all' cores (split between local DDP processes), a number, or 'auto' = "
        "the cores not already busy, for shared machines where oversubscribed threads spin 5-10x slower. 'auto' "
        "depends on the load at start, so results are only bit-reproducible with 'all' or a number.",
    )


# TRL / transformers / axolotl names people bring, and what they are called here.
FOREIGN_NAMES = {
    "gradient_accumulation_steps": "optim.grad_accum",
    "num_train_epochs": "optim.epochs",
    "num_epochs": "optim.epochs",
    "learning_rate": "optim.lr",
    "per_device_train_batch_size": "optim.batch_samples",
    "micro_batch_size": "optim.batch_samples",
    "train_batch_size": "optim.batch_samples",
    "lr_scheduler_type": "optim.schedule",
    "lr_scheduler": "optim.schedule",
    "warmup_ratio": "optim.warmup_ratio",
    "warmup_steps": "optim.warmup_steps",
    "max_steps": "optim.max_steps",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "gradient_checkpointing": "optim.gradient_checkpointing",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "bf16": "optim.precision",
    "max_length": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "assistant_only_loss": "data.completion_only_loss",
    "train_on_inputs": "data.completion_only_loss (inverted)",
    "completion_only_loss": "data.completion_only_loss",
    "chat_template": "data.chat_template",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "beta": "dpo.beta",
    "loss_type": "dpo.loss_type",
    "label_smoothing": "dpo.label_smoothing",
    "precompute_ref_log_probs": "dpo.precompute_ref_logps",
    "eval_steps": "eval.every",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "early_stopping_patience": "eval.early_stopping_patience",
    "logging_dir": "output_dir (tensorboard/ inside it)",
    "logging_steps": "log_every",
}


def _field_paths(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every config key as a dotted path: `optim.lr`, `data.max_seq_len`, ..."""
    model = model or TrainConfig
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            paths += _field_paths(kind, f"{prefix}{name}.")
    return paths


def did_you_mean(where: str) -> str:
    """A hint for an unknown key `where` (dotted): our name for a TRL/axolotl key, or the closest key."""
    import difflib

    key = where.rsplit(".", 1)[-1]
    if key in FOREIGN_NAMES:
        return f"; did you mean {FOREIGN_NAMES[key]}?"
    paths = _field_paths()
    close = difflib.get_close_matches(where, paths, n=1, cutoff=0.75) or difflib.get_close_matches(
        key, [p.rsplit(".", 1)[-1] for p in paths], n=1, cutoff=0.75
    )
    if not close:
        return ""
    match = close[0] if close[0] in paths else next(p for p in paths if p.rsplit(".", 1)[-1] == close[0])
    return f"; did you mean {match}?"


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
        # An unknown key is the likeliest root cause (a missing field is often its misspelling): report it first.
        problems = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = problems[0]
        # Drop pydantic's union-member tags ("constrained-int", "literal[...]") from the field path.
        where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p not in UNION_TAGS))
        given = first.get("input")
        got = f", got {given!r}" if isinstance(given, (int, float, str)) and first["type"] != "missing" else ""
        source = f"{path}: " if path else ""
        unknown = first["type"] == "extra_forbidden"
        message, hint = ("unknown key", did_you_mean(where)) if unknown else (first["msg"], "")
        raise TrainConfigError(f"{source}{where}: {message}{got}{hint} ({len(error.errors())} problem(s))") from None
