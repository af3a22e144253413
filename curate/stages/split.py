"""Stage `split`: give every row a `split` (train / validation / test) by group — its near-duplicate
cluster joined with every row whose prompt is the same or a near-duplicate (curate.split) — and export
the `sft/` and `pref/` datasets into the run directory. Drops nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from curate.split import SplitConfig, export_splits, row_splits, with_splits
from curate.stage import BatchOutput, StageContext, StageOutput, decisions_for_batch, register_stage


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
    # The written rows are streamed into the shards (a lazy scan, never collected), and only the exported
    # columns are read: the score columns (most of a tagged row) stay on disk.
    return export_splits(kept, ctx.run_dir, _resolved(config, ctx), _seed(config, ctx), stage_name=ctx.name)


@register_stage("split", config=SplitConfig, version="3", extra_inputs=_previous_inputs, export=_export)
def split_stage(frame: pl.LazyFrame, config: SplitConfig, ctx: StageContext) -> StageOutput:
    """Assign train/validation/test by group (dup_cluster joined with same or near-duplicate prompts) and export sft/ and pref/."""
    ctx.progress("assigning splits by cluster")
    splits, report = row_splits(frame, _resolved(config, ctx), _seed(config, ctx), work_dir=ctx.stage_dir, phase=ctx.phase)

    def split_batch(batch: pl.DataFrame, offset: int) -> BatchOutput:
        # The engine writes the rows batch by batch from the input beside their splits: Polars' streaming
        # sink of the whole output held ~450 MB of 1 KB rows in flight whatever their count.
        part = decisions_for_batch(splits, offset, batch.height, "split")
        return BatchOutput(kept=with_splits(batch.lazy(), part.lazy()).collect())

    return StageOutput(kept=with_splits(frame, splits.lazy()), dropped=None, report=report, split_batch=split_batch)
