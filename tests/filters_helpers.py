"""Fixtures for the filter tests: frames from plain dicts, a stage context, a tiny trained tokenizer."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.records import canonical_frame
from curate.stage import StageContext, get_stage


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]
    return {"messages": messages}


def context(tmp_path: Path, name: str = "stage") -> StageContext:
    return StageContext(name=name, run_dir=tmp_path, stage_dir=tmp_path / name, pipeline_dir=tmp_path)


def run_stage(stage_type: str, records_or_frame, config: dict | None, tmp_path: Path, name: str | None = None):
    """Run a registered stage the way the runner does (validated config, LazyFrame in); collect outputs."""
    spec = get_stage(stage_type)
    frame = records_or_frame if isinstance(records_or_frame, pl.DataFrame) else canonical_frame(records_or_frame)
    output = spec.run(frame.lazy(), spec.config_model.model_validate(config or {}), context(tmp_path, name or stage_type))
    kept = output.kept.collect()
    dropped = output.dropped.collect() if output.dropped is not None else None
    return kept, dropped, output.report


def train_tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"])
    texts = ["Your refund was issued today.", "Please restart the router and try again.", "Thanks for waiting!"] * 20
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path
