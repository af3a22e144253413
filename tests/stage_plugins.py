"""Stages defined outside curate/, loaded by the runner through `type: stage_plugins:<name>`."""

from __future__ import annotations

import os

import polars as pl

from curate.stage import BatchOutput, StageConfig, StageOutput, drop_rows, register_row_stage, register_stage

CALLS: list[str] = []


class MinLengthConfig(StageConfig):
    min_chars: int = 10


def _assistant_chars() -> pl.Expr:
    # Characters of the final assistant message.
    return pl.coalesce(pl.col("messages"), pl.col("chosen")).list.last().struct.field("content").str.len_chars()


@register_stage("min_length", config=MinLengthConfig)
def min_length(frame: pl.LazyFrame, config: MinLengthConfig, ctx) -> StageOutput:
    """Tag every row with its character count, drop rows shorter than min_chars."""
    CALLS.append(ctx.name)
    if os.environ.get("CRASH_STAGE") == ctx.name:
        raise RuntimeError("simulated crash")
    tagged = frame.with_columns(_assistant_chars().alias("chars"))
    short = pl.col("chars") < config.min_chars
    return StageOutput(
        kept=tagged.filter(~short),
        dropped=drop_rows(tagged.filter(short), ctx.name, "too_short"),
        report={"threshold": config.min_chars},
    )


class LosingConfig(StageConfig):
    pass


@register_stage("loses_rows", config=LosingConfig)
def loses_rows(frame: pl.LazyFrame, config: LosingConfig, ctx) -> StageOutput:
    """A buggy stage that silently loses a row: the runner must refuse it."""
    return StageOutput(kept=frame.slice(1))


# A row-local plugin: the engine streams it; BATCH_HEIGHTS records what each call saw.
BATCH_HEIGHTS: list[int] = []


def _min_length_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: MinLengthConfig, ctx) -> dict:
    return {
        "threshold": config.min_chars,
        "kept_chars": kept.select(pl.col("chars").sum()).collect().item(),
        "dropped": dropped.select(pl.len()).collect().item(),
    }


@register_row_stage("min_length_rows", config=MinLengthConfig, summarize=_min_length_summary)
def min_length_rows(batch: pl.DataFrame, config: MinLengthConfig, ctx) -> BatchOutput:
    """min_length as a row-local stage."""
    BATCH_HEIGHTS.append(batch.height)
    if os.environ.get("CRASH_STAGE") == ctx.name and len(BATCH_HEIGHTS) > 2:
        raise RuntimeError("simulated crash in a later batch")
    tagged = batch.with_columns(_assistant_chars().alias("chars"))
    short = pl.col("chars") < config.min_chars
    return BatchOutput(kept=tagged.filter(~short), dropped=drop_rows(tagged.lazy().filter(short), ctx.name, "too_short").collect())
