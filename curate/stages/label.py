"""Pipeline stages for human labeling in Argilla: `label_push` and `label_pull`.

Both talk to the server named by `api_url` (or `ARGILLA_API_URL`) with the key in the environment
variable `api_key_env` (default `ARGILLA_API_KEY`; keys never go into YAML or the manifest). When no
URL is set the stage does nothing: rows pass through unchanged and the report says why, so the sample
pipeline runs anywhere and labels where a server is configured.

    - name: label_push
      type: label_push
      config: {dataset: support, min_submitted: 3, guidelines: guidelines.md, metadata_columns: [source_file, lang]}
    - name: label_pull
      type: label_pull
      config: {dataset: support, min_responses: 3, insufficient: hold_back}

Both are volatile (rerun every time): their result depends on the server, not only on the input.
Pushing again is cheap, unchanged records are skipped (state in the stage folder).
"""

from __future__ import annotations

import os
from typing import Literal

import polars as pl
from pydantic import Field

from curate.label.client import DEFAULT_WORKSPACE, connection_settings
from curate.label.schema import DATASET_NAME_PATTERN, read_guidelines
from curate.stage import StageConfig, StageContext, StageOutput, register_stage

SKIP_MESSAGE = "ARGILLA_API_URL is not set: labeling skipped, rows pass through unchanged"


class LabelServerConfig(StageConfig):
    dataset: str = Field(min_length=1, pattern=DATASET_NAME_PATTERN)
    workspace: str = DEFAULT_WORKSPACE
    api_url: str | None = None  # default: $ARGILLA_API_URL
    api_key_env: str = "ARGILLA_API_KEY"
    max_retries: int = Field(5, ge=0, le=100)


class LabelPushConfig(LabelServerConfig):
    min_submitted: int = Field(2, ge=1, le=1000)  # annotators per record before Argilla marks it completed
    preference_question: Literal["label", "ranking"] = "label"  # label: "Which answer is better? A / B / Tie"
    guidelines: str | None = None  # Markdown file shown to annotators (relative to the pipeline file)
    suggestions: dict[str, str] = {}  # question (quality | decision) -> column
    metadata_columns: list[str] | None = None  # default: source_file, source_row, lang (those present)
    batch_size: int = Field(100, ge=1, le=1000)


class LabelPullConfig(LabelServerConfig):
    min_responses: int = Field(1, ge=1, le=1000)
    insufficient: Literal["keep", "hold_back", "drop"] = "keep"
    preference_tie: Literal["keep", "hold_back", "drop"] = "keep"
    corrections_as_pairs: bool = True


def _connection(config: LabelServerConfig):
    return connection_settings(config.api_url, os.environ.get(config.api_key_env))


@register_stage("label_push", config=LabelPushConfig, version="1", volatile=True)
def label_push(frame: pl.LazyFrame, config: LabelPushConfig, ctx: StageContext) -> StageOutput:
    """Push rows to Argilla for human review (rows pass through unchanged)."""
    from curate.label.push import PushOptions, push_frame

    # Read first: a missing guidelines file is an error even where no server is configured yet.
    guidelines = read_guidelines(ctx.resolve(config.guidelines)) if config.guidelines else None
    connection = _connection(config)
    if connection is None:
        ctx.progress(SKIP_MESSAGE)
        return StageOutput(kept=frame, report={"skipped": True, "message": SKIP_MESSAGE})
    data = frame.collect()
    options = PushOptions(
        dataset=config.dataset,
        workspace=config.workspace,
        min_submitted=config.min_submitted,
        preference_question=config.preference_question,
        guidelines=guidelines,
        suggestions=dict(config.suggestions),
        metadata_columns=config.metadata_columns,
        batch_size=config.batch_size,
        max_retries=config.max_retries,
    )
    report = push_frame(
        data,
        connection,
        options,
        state_dir=ctx.stage_dir / "push_state",
        progress=lambda name, done, total: ctx.progress(f"{name}: {done}/{total} records"),
        on_retry=ctx.progress,
    )
    return StageOutput(kept=frame, report={"skipped": False, "api_url": connection.api_url, **report})


@register_stage("label_pull", config=LabelPullConfig, version="1", volatile=True, may_add_rows=True)
def label_pull(frame: pl.LazyFrame, config: LabelPullConfig, ctx: StageContext) -> StageOutput:
    """Pull annotators' answers from Argilla, aggregate them and apply them (discards, corrections, pairs)."""
    from curate.label.pull import apply_labels, pull_labels

    connection = _connection(config)
    if connection is None:
        ctx.progress(SKIP_MESSAGE)
        return StageOutput(kept=frame, report={"skipped": True, "message": SKIP_MESSAGE})
    data = frame.collect()
    ctx.progress("fetching responses")
    aggregates, datasets = pull_labels(data, connection, config.dataset, config.workspace, config.max_retries)
    kept, dropped, counts = apply_labels(
        data,
        aggregates,
        ctx.name,
        min_responses=config.min_responses,
        insufficient=config.insufficient,
        preference_tie=config.preference_tie,
        corrections_as_pairs=config.corrections_as_pairs,
    )
    report = {"skipped": False, "api_url": connection.api_url, "datasets": datasets, **counts}
    return StageOutput(kept=kept.lazy(), dropped=dropped.lazy(), report=report)
