"""Row-local stages for tests/test_engine_ray.py, loaded through `type: engine_plugins:<name>`: a
stage that drops (with a summarize report), one that only adds a column (and can be made slow on
chosen batches), and one that meets bad input on a worker."""

from __future__ import annotations

import time

import polars as pl

from curate.errors import InputFileError
from curate.stage import BatchOutput, StageConfig, drop_rows, register_row_stage


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


class DiesConfig(StageConfig):
    pass


@register_row_stage("dies", config=DiesConfig)
def dies(batch: pl.DataFrame, config: DiesConfig, ctx) -> BatchOutput:
    """A stage whose process is killed mid-run, as the kernel's out-of-memory killer would: run it only in
    a process of its own (`engine: isolate_stages: true`)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return BatchOutput(kept=batch)
