"""The adapter's README.md: a filled model card (base model, data lineage, config, metrics) so a folder
copied elsewhere still says what it is and how it was made."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from train.data import SPLITS, split_files
from train.models import base_model_id


def curation_lineage(split_dir: str | Path) -> dict:
    """What the split folder says about where it came from: the curate run's manifest (its sha256 and
    pipeline config hash, when the manifest sits beside or in the split folder) and rows per split file set."""
    split_dir = Path(split_dir)
    found: dict = {"split_dir": str(split_dir)}
    for candidate in (split_dir / "manifest.json", split_dir.parent / "manifest.json"):
        if candidate.is_file():
            raw = candidate.read_bytes()
            found["manifest"] = str(candidate)
            found["manifest_sha256"] = hashlib.sha256(raw).hexdigest()
            try:
                pipeline = json.loads(raw).get("pipeline") or {}
                found["pipeline_config_hash"] = pipeline.get("config_hash")
                found["pipeline_name"] = pipeline.get("name")
            except (ValueError, AttributeError):
                pass
            break
    import pyarrow.parquet as pq

    rows = {}
    for split in SPLITS:
        try:
            rows[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in split_files(split_dir, split))
        except Exception:  # noqa: BLE001 - the card reports what it can read; training already read the data
            rows[split] = None
    found["split_rows"] = rows
    return found


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(config, mode: str, steps: int, data_stats: dict, final: dict, init_lineage: dict | None = None) -> str:
    base = base_model_id(config.model)
    lineage = curation_lineage(config.data.split_dir)
    lines = ["---", f"base_model: {json.dumps(base)}", "library_name: peft", "tags:", "- lora", f"- {mode}", "- curate-train", "---", ""]
    lines += [f"# LoRA adapter ({mode.upper()}) for {base}", "", f"Trained with `train {mode}` for {steps} optimizer steps.", ""]
    if init_lineage:
        lines += ["## Continued from", "", "Started from this adapter's weights (fresh optimizer and schedule):", ""]
        lines += [f"- {key.replace('_', ' ')}: `{value}`" for key, value in init_lineage.items() if value is not None]
        lines.append("")
    lines += ["```python", "from peft import AutoPeftModelForCausalLM", 'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]
    lines += ["## Data", "", f"- split folder: `{lineage['split_dir']}`"]
    for key in ("manifest_sha256", "pipeline_config_hash", "pipeline_name"):
        if lineage.get(key):
            lines.append(f"- curation {key.replace('_', ' ')}: `{lineage[key]}`")
    lines.append("- rows in the split files: " + ", ".join(f"{s} {n}" for s, n in lineage["split_rows"].items()))
    lines += ["", "| split | samples | target tokens | cut by max_seq_len | target tokens removed | target tokens trained on |", "|---|---|---|---|---|---|"]
    for split, stats in data_stats.items():
        lines.append(f"| {split} | {stats['samples']} | {stats['target_tokens']} | {stats['samples_cut']} | {stats['target_tokens_removed']} | {stats['target_tokens_left']} |")
    if final:
        lines += ["", "## Validation: base vs adapter", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in final.items()]
    settings = config.model_dump(mode="json")
    settings["model"]["name"] = base
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(settings, sort_keys=True).rstrip(), "```", ""]
    return "\n".join(lines)


def write_model_card(adapter_dir: Path, config, mode: str, steps: int, data_stats: dict, final: dict, lineage: dict | None = None) -> None:
    """README.md in the adapter folder (replacing peft's empty template), written atomically."""
    tmp = adapter_dir / ".README.md.tmp"
    tmp.write_text(model_card(config, mode, steps, data_stats, final, lineage), encoding="utf-8")
    os.replace(tmp, adapter_dir / "README.md")
