"""`train eval --adapter NEW --compare PREV`: did continuing the adapter forget? Validation loss of the
base, the previous and the new adapter on this run's validation split, the previous adapter's own
validation split (from its train_config.json, when it differs) and `eval.general_set`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.errors import DataError, TrainConfigError


def _is_dpo(adapter_dir: Path) -> bool:
    mode_file = adapter_dir / "train_mode.txt"
    return mode_file.is_file() and mode_file.read_text().strip() == "dpo"


def _previous_split(adapter_dir: Path) -> str | None:
    run_config = adapter_dir.parent / "train_config.json"
    try:
        return (json.loads(run_config.read_text(encoding="utf-8")).get("data") or {}).get("split_dir")
    except (OSError, ValueError, AttributeError):
        return None


def eval_sets(config, previous: Path) -> list[tuple[str, str, str]]:
    """(name, split folder, split) for every set compared: the general set uses its validation split, else its train split."""
    from train.data import split_files

    sets = [("validation", config.data.split_dir, "validation")]
    earlier = _previous_split(previous)
    if earlier and Path(earlier).resolve() != Path(config.data.split_dir).resolve() and split_files(earlier, "validation"):
        sets.append(("previous validation", earlier, "validation"))
    if config.eval.general_set:
        general = config.eval.general_set
        sets.append(("general", general, "validation" if split_files(general, "validation") else "train"))
    return sets


@torch.no_grad()
def compare_adapters(config, new: str | Path, previous: str | Path) -> dict:
    """Loss of base / previous / new on every set of `eval_sets`; `change` = new - previous (> 0: forgot)."""
    from train.data import load_sft_split, planner_overflow, set_chat_template
    from train.evaluate import sft_loss
    from train.models import load_adapter, load_base_model, load_tokenizer, set_cpu_threads
    from train.packing import plan_packing, prepare_packed_model

    new, previous = Path(new), Path(previous)
    if _is_dpo(new) or _is_dpo(previous):
        raise TrainConfigError("--compare measures SFT validation loss; a DPO adapter is compared with `train eval --adapter` on each")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        set_cpu_threads(config.threads)
    tokenizer = load_tokenizer(config.model)
    set_chat_template(tokenizer, config.data.chat_template)
    model = load_adapter(load_base_model(config.model).to(device), new, adapter_name="new")
    load_adapter(model, previous, adapter_name="previous")
    model.to(device)
    prepare_packed_model(model)  # losses as training measured them: attention per packed sample, fused head loss
    overflow = planner_overflow(config.data.overflow)
    rows = []
    for name, split_dir, split in eval_sets(config, previous):
        data = load_sft_split(tokenizer, split_dir, split, config.data.max_val_samples, config.data.completion_only_loss)
        if data is None:
            raise DataError(f"{split_dir}: no sft rows in its {split} split to compare on")
        plan = plan_packing(data.lengths, config.data.max_seq_len, overflow)
        loss = lambda: sft_loss(model, data, plan, config.optim.batch_rows, tokenizer.pad_token_id, device, config.eval.max_rows)  # noqa: E731
        with model.disable_adapter():
            base, targets = loss()
        measured = {}
        for adapter in ("previous", "new"):
            model.set_adapter(adapter)
            measured[adapter] = loss()[0]
        rows.append({"set": name, "split_dir": str(split_dir), "split": split, "target_tokens": targets, "base_loss": base,
                     "previous_loss": measured["previous"], "new_loss": measured["new"], "change": measured["new"] - measured["previous"]})  # fmt: skip
    return {"new": str(new), "previous": str(previous), "rows": rows}
