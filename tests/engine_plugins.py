"""Stages for tests/test_engine_ray.py, loaded through `type: engine_plugins:<name>`: row-local stages
(a per-batch transform) and a global stage with a distributed form, so both Ray engine paths run on
real data whatever the built-in stages are today."""

from __future__ import annotations

import dataclasses
import time

import polars as pl

from curate import stage as stage_registry
from curate.errors import InputFileError
from curate.stage import BatchOutput, StageConfig, StageOutput, drop_rows, register_row_stage, register_stage


def _last_reply() -> pl.Expr:
    # The final assistant message of a chat row, or the chosen reply of a preference row.
    return pl.coalesce(pl.col("messages"), pl.col("chosen")).list.last().struct.field("content")


class ReplyWordsConfig(StageConfig):
    min_words: int = 3


def _reply_words_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: ReplyWordsConfig, ctx) -> dict:
    return {
        "min_words": config.min_words,
        "kept_words": kept.select(pl.col("reply_words").sum()).collect().item() or 0,
        "dropped": dropped.select(pl.len()).collect().item(),
    }


@register_row_stage("reply_words", config=ReplyWordsConfig, summarize=_reply_words_summary)
def reply_words(batch: pl.DataFrame, config: ReplyWordsConfig, ctx) -> BatchOutput:
    """Tag the final reply's word count; drop replies shorter than min_words."""
    tagged = batch.with_columns(_last_reply().str.split(" ").list.len().alias("reply_words"))
    short = pl.col("reply_words") < config.min_words
    return BatchOutput(kept=tagged.filter(~short), dropped=drop_rows(tagged.lazy().filter(short), ctx.name, "short_reply").collect())


class MentionsConfig(StageConfig):
    word: str = "order"
    # Batches holding a reply with this text take a second longer: on two workers the batch after it
    # finishes first, so an engine that wrote batches in the order they finish would be caught.
    slow_batches_with: str | None = None


@register_row_stage("mentions", config=MentionsConfig)
def mentions(batch: pl.DataFrame, config: MentionsConfig, ctx) -> BatchOutput:
    """Add a boolean column: does the reply mention `word`? Drops nothing (no dropped frame at all)."""
    if config.slow_batches_with and batch.select(_last_reply().str.contains(config.slow_batches_with, literal=True).any()).item():
        time.sleep(1.0)
    return BatchOutput(kept=batch.with_columns(_last_reply().str.to_lowercase().str.contains(config.word, literal=True).alias("mentions")))


class FailOnConfig(StageConfig):
    needle: str


@register_row_stage("fail_on", config=FailOnConfig)
def fail_on(batch: pl.DataFrame, config: FailOnConfig, ctx) -> BatchOutput:
    """A stage that meets bad input in one batch: its own one-line error must reach the user as is."""
    hit = batch.filter(_last_reply().str.contains(config.needle, literal=True))
    if hit.height:
        raise InputFileError(f"row {hit['id'][0]}: field messages: contains {config.needle!r}")
    return BatchOutput(kept=batch)


class KindShareConfig(StageConfig):
    min_rows: int = 1


def _kind_counts(frame: pl.LazyFrame) -> pl.LazyFrame:
    return frame.group_by("kind").agg(pl.len().cast(pl.Int64).alias("kind_rows"))


@register_stage("kind_share", config=KindShareConfig)
def kind_share(frame: pl.LazyFrame, config: KindShareConfig, ctx) -> StageOutput:
    """A global stage: every row gets how many rows share its `kind`; kinds with fewer than min_rows go."""
    tagged = frame.join(_kind_counts(frame), on="kind", how="left", maintain_order="left")
    rare = pl.col("kind_rows") < config.min_rows
    return StageOutput(kept=tagged.filter(~rare), dropped=drop_rows(tagged.filter(rare), ctx.name, "rare_kind"), report={"kinds": 0})


def kind_share_distributed(dataset, config: KindShareConfig, ctx):
    """kind_share on Ray: counts per batch on the workers, summed on the driver (a handful of rows); the
    join and the split into kept and dropped run per batch."""
    per_batch = dataset.map_batches(
        lambda table: _kind_counts(pl.from_arrow(table).lazy()).collect().to_arrow(), batch_format="pyarrow", batch_size=None
    )
    counts = pl.DataFrame(per_batch.take_all()).group_by("kind").agg(pl.col("kind_rows").sum())
    stage_name = ctx.name  # not ctx itself: its callbacks hold the driver's live display

    def side(rare: bool):
        def select(table):
            batch = pl.from_arrow(table).join(counts, on="kind", how="left", maintain_order="left")
            chosen = batch.filter((pl.col("kind_rows") < config.min_rows) == rare)
            return (drop_rows(chosen.lazy(), stage_name, "rare_kind").collect() if rare else chosen).to_arrow()

        return dataset.map_batches(select, batch_format="pyarrow", batch_size=None)

    return side(False), side(True), {"kinds": 0}


# register_stage has no slot for the distributed form yet: attach it to the registered spec.
stage_registry._REGISTRY["kind_share"] = dataclasses.replace(stage_registry._REGISTRY["kind_share"], distributed=kind_share_distributed)
