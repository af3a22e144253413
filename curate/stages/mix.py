"""Stage `mix`: combine sources to target ratios or weights (deterministic up/down-sampling)."""

from __future__ import annotations

import polars as pl

from curate.mix import MixConfig, mix_sources
from curate.stage import StageContext, StageOutput, register_stage


@register_stage("mix", config=MixConfig, version="1", may_add_rows=True)
def mix_stage(frame: pl.LazyFrame, config: MixConfig, ctx: StageContext) -> StageOutput:
    """Mix sources to target ratios or weights; downsampled rows are dropped as mix_downsampled."""
    ctx.progress("sampling sources")
    seed = ctx.seed if config.seed is None else config.seed
    kept, dropped, report = mix_sources(frame, config, seed, ctx.name)
    return StageOutput(kept=kept, dropped=dropped, report=report)
