"""Stage `split`: give every row a `split` (train / validation / test) by group — its near-duplicate
cluster joined with every row whose prompt is the same or a near-duplicate (curate.split) — and export
the `sft/` and `pref/` datasets into the run directory. Drops nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from curate.split import EXPORT_COLUMNS, SplitConfig, export_splits, split_assignment
from curate.stage import StageContext, StageOutput, register_stage


def _seed(config: SplitConfig, ctx: StageContext) -> int:
    return ctx.seed if config.seed is None else config.seed


def _resolved(config: SplitConfig, ctx: StageContext) -> SplitConfig:
    if config.previous_splits is None:
        return config
    return config.model_copy(update={"previous_splits": str(ctx.resolve(config.previous_splits))})


def _previous_inputs(config: SplitConfig, ctx: StageContext) -> list[Path]:
    """Earlier split shards change the assignment, so the runner fingerprints them."""
    if config.previous_splits is None:
        return []
    folder = ctx.resolve(config.previous_splits)
    return sorted(path for sub in ("sft", "pref") for path in (folder / sub).glob("*.parquet"))


def _export(kept: pl.LazyFrame, config: SplitConfig, ctx: StageContext) -> dict[str, Any]:
    ctx.progress("writing sft/ and pref/ datasets")
    # Only the exported columns are read: the score columns (most of a tagged row) stay on disk.
    needed = {"kind", "split", "id", config.cluster_column, *config.extra_columns, *(c for cs in EXPORT_COLUMNS.values() for c in cs)}
    rows = kept.select([name for name in kept.collect_schema().names() if name in needed]).collect()
    return export_splits(rows, ctx.run_dir, _resolved(config, ctx), _seed(config, ctx), stage_name=ctx.name)


@register_stage("split", config=SplitConfig, version="3", extra_inputs=_previous_inputs, export=_export)
def split_stage(frame: pl.LazyFrame, config: SplitConfig, ctx: StageContext) -> StageOutput:
    """Assign train/validation/test by group (dup_cluster joined with same or near-duplicate prompts) and export sft/ and pref/."""
    ctx.progress("assigning splits by cluster")
    rows, report = split_assignment(frame, _resolved(config, ctx), _seed(config, ctx))
    return StageOutput(kept=rows, dropped=None, report=report)
