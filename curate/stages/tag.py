"""Stages that add columns: `tag` (quality scores), `pii` (redact or drop), `decontaminate` (eval overlap).

`tag` drops nothing: its config says *which* scores to compute (and with what tokenizer, languages and
phrases); the thresholds live in the `filter` stage, so a threshold change leaves `tag` cached.
See curate/filters/* for every column's definition.
"""

from __future__ import annotations

import re
from typing import Literal

import polars as pl
from pydantic import Field

from curate.filters import decontam, pii
from curate.filters import heuristics as heuristic_scores
from curate.filters import instruction as instruction_checks
from curate.filters import language as language_id
from curate.filters.text import ALL_TEXT, ASSISTANT_TEXT, TEMP_COLUMNS, USER_TEXT, with_role_texts
from curate.stage import BatchOutput, StageConfig, StageContext, drop_rows, register_row_stage


class LanguageConfig(StageConfig):
    min_confidence: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Below this lid.176 probability `lang` is null (unknown), and unknown rows never pass a "
        "language keep-list. 0.5 as CCNet: clear sentences score 0.9+, while a 3-word line often lands between "
        "two related languages (FineWeb's 0.65 is for whole web pages, longer than a chat turn).",
    )
    max_chars: int = Field(
        500, ge=20, le=100_000, description="Characters of user + assistant text the detector reads (the language "
        "is clear long before 500; cost grows with length)."
    )


class TagConfig(StageConfig):
    heuristics: bool = Field(True, description="Gopher/FineWeb-style per-role scores (user_*, assistant_*).")
    repetition: bool = Field(True, description="Assistant top-n-gram and duplicated-n-gram character fractions.")
    instruction: bool = Field(True, description="Echo, refusal, truncation, turn structure, length ratio.")
    refusal_phrases: tuple[str, ...] = Field(
        instruction_checks.DEFAULT_REFUSAL_PHRASES,
        description="Case-insensitive phrases marking refusals/boilerplate in assistant text (`refusal_phrase`).",
    )
    language: LanguageConfig | None = Field(
        default_factory=LanguageConfig, description="Language identification (`lang`, `lang_score`; fastText lid.176, offline); null: off."
    )
    tokenizer: str | None = Field(
        None,
        description="Path to a `tokenizers` tokenizer.json for `token_count` / `assistant_token_count`; without "
        "one no token scores are computed (the report says so).",
    )


def _tokenizer_path(config: TagConfig, ctx: StageContext):
    return [ctx.resolve(config.tokenizer)] if config.tokenizer else []


def _tag_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: TagConfig, ctx: StageContext) -> dict:
    """The tag report, from the written rows: one streaming aggregation per figure."""
    rows = kept.select(pl.len()).collect().item()
    report: dict = {"rows": rows}
    if config.language is not None:
        counts = (
            kept.group_by("lang").len().sort(["len", "lang"], descending=[True, False], nulls_last=True).head(20)
        ).collect(engine="streaming")
        report["languages"] = {str(lang): n for lang, n in counts.iter_rows()}
    else:
        report["languages"] = "not computed (language: null)"
    if config.tokenizer:
        report["tokenizer"] = str(config.tokenizer)
        if rows:
            token = pl.col("token_count")
            largest, p50, p99 = kept.select(
                token.max(), token.median().alias("p50"), token.quantile(0.99, "nearest").alias("p99")
            ).collect(engine="streaming").row(0)
            report["token_count"] = {"max": int(largest), "p50": float(p50), "p99": float(p99)}
    else:
        report["tokenizer"] = "none configured: token_count / assistant_token_count not computed"
    input_columns = set(ctx.input_schema or {})
    report["score_columns"] = [name for name in kept.collect_schema().names() if name not in input_columns]
    if config.instruction and rows:
        flags = kept.select(
            pl.col("turn_structure_error").is_not_null().sum(),
            pl.col("refusal_phrase").is_not_null().sum(),
            pl.col("assistant_ends_mid_sentence").sum(),
            pl.col("assistant_truncation").is_not_null().sum(),
        ).collect(engine="streaming")
        report["flags"] = {name: int(value) for name, value in flags.row(0, named=True).items()}
    return report


@register_row_stage("tag", config=TagConfig, version="3", extra_inputs=_tokenizer_path, summarize=_tag_summary)
def tag_stage(batch: pl.DataFrame, config: TagConfig, ctx: StageContext) -> BatchOutput:
    """Add quality, instruction, language and token score columns; drops nothing."""
    # Materialize the role texts once: left lazy, the optimizer inlines them into every score that
    # reads them and recomputes the list filtering/joining per score (measured 2x slower).
    table = with_role_texts(batch.lazy()).collect()
    score_exprs: list[pl.Expr] = []
    if config.heuristics or config.instruction:
        score_exprs += heuristic_scores.text_scores(pl.col(USER_TEXT), "user")
        score_exprs += heuristic_scores.text_scores(pl.col(ASSISTANT_TEXT), "assistant")
    # Lazy, so common subexpressions (each role's line list feeds six scores) are computed once.
    table = table.lazy().with_columns(score_exprs).collect()
    if config.instruction:
        table = _with_source_punctuation(table.with_columns(instruction_checks.shared_columns()), ctx)
        table = table.with_columns(instruction_checks.instruction_scores(list(config.refusal_phrases))).drop(
            *instruction_checks.SHARED_COLUMNS, *SOURCE_COLUMNS
        )
    if config.repetition:
        repetition = heuristic_scores.repetition_scores_chunked(table.select(ASSISTANT_TEXT), ASSISTANT_TEXT)
        table = pl.concat([table.drop(repetition.columns, strict=False), repetition], how="horizontal")
    if config.language is not None:
        texts = (pl.col(USER_TEXT) + "\n" + pl.col(ASSISTANT_TEXT)).str.slice(0, config.language.max_chars)
        labels = language_id.language_columns(table.select(texts.alias("t"))["t"], config.language.min_confidence)
        table = pl.concat([table.drop(labels.columns, strict=False), labels], how="horizontal")
    if config.tokenizer:
        path = ctx.resolve(config.tokenizer)
        tokenizer = ctx.cached("tokenizer", lambda: instruction_checks.load_tokenizer(path))
        table = instruction_checks.token_columns(table, tokenizer)
    return BatchOutput(kept=table.drop(TEMP_COLUMNS))


SOURCE_COLUMNS = (instruction_checks.SOURCE_FILE, instruction_checks.SOURCE_ROWS, instruction_checks.SOURCE_CLOSED_SHARE)


def _with_source_punctuation(table: pl.DataFrame, ctx: StageContext) -> pl.DataFrame:
    """The row's source-file figures (rows, share ending closed) as temporary columns: over the stage's
    whole input, read once per run, so no row's truncation evidence depends on its batch. Without an
    input file (a transform called directly) the batch is the whole input."""
    if ctx.input_path is not None:
        figures = ctx.cached(
            "source_punctuation",
            lambda: instruction_checks.source_punctuation(pl.scan_parquet(ctx.input_path, glob=False)).collect(engine="streaming"),
        )
    else:
        figures = instruction_checks.source_punctuation(table.lazy()).collect()
    source_file = pl.col("source").struct.field("file").alias(instruction_checks.SOURCE_FILE)
    return table.with_columns(source_file).join(
        figures, on=instruction_checks.SOURCE_FILE, how="left", nulls_equal=True, maintain_order="left"
    )


# --------------------------------------------------------------------------------------------------- PII

MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected")
PII_COUNT_COLUMNS = [f"pii_{kind}_count" for kind in pii.PII_TYPES]


class PiiConfig(StageConfig):
    mode: Literal["redact", "drop"] = Field(
        "redact",
        description="redact: replace PII with typed placeholders (<EMAIL>, <PHONE>, <IP_ADDRESS>, "
        "<CREDIT_CARD>, <SECRET>) in every message that flows on, its content and its tool calls' arguments; "
        "drop: remove rows that contain any.",
    )


def _pii_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: PiiConfig, ctx: StageContext) -> dict:
    """The pii report from the written rows (kept, plus dropped in drop mode): counts only, never PII."""
    parts = [kept.select(PII_COUNT_COLUMNS)]
    if all(column in dropped.collect_schema().names() for column in PII_COUNT_COLUMNS):
        parts.append(dropped.select(PII_COUNT_COLUMNS))
    total = pl.sum_horizontal(PII_COUNT_COLUMNS)
    counts = pl.concat(parts).select(
        (total > 0).sum().alias("rows_with_pii"),
        *(pl.col(f"pii_{kind}_count").sum().alias(f"matches_{kind}") for kind in pii.PII_TYPES),
        *((pl.col(f"pii_{kind}_count") > 0).sum().alias(f"rows_{kind}") for kind in pii.PII_TYPES),
    ).collect(engine="streaming").row(0, named=True)
    report: dict = {
        "mode": config.mode,
        "rows_with_pii": int(counts["rows_with_pii"]),
        "matches_by_type": {kind: int(counts[f"matches_{kind}"]) for kind in pii.PII_TYPES},
        "rows_by_type": {kind: int(counts[f"rows_{kind}"]) for kind in pii.PII_TYPES},
    }
    if config.mode == "drop":
        return report
    # Messages holding a placeholder in their content or a tool call's arguments, in rows this run
    # redacted (a placeholder typed by a user in such a row counts too: per-message matches are not kept).
    placeholder = "|".join(re.escape(text) for text in pii.PLACEHOLDERS.values())
    present = [column for column in MESSAGE_COLUMNS if column in kept.collect_schema().names()]
    redacted_now = kept.filter(total > 0)
    message = pl.element().struct
    in_content = message.field("content").str.contains(placeholder).fill_null(False)
    in_calls = (
        message.field("tool_calls").list.eval(pl.element().struct.field("function").struct.field("arguments").str.contains(placeholder))
        .list.any().fill_null(False)
    )
    by_column = redacted_now.select(
        pl.col(column).list.eval(in_content | in_calls).list.sum().sum() for column in present
    ).collect(engine="streaming").row(0, named=True) if present else {}
    report["rows_redacted"] = int(kept.select(pl.col("pii_redacted").sum()).collect().item())
    report["messages_redacted_by_column"] = {column: int(by_column.get(column) or 0) for column in MESSAGE_COLUMNS}
    report["placeholders"] = dict(pii.PLACEHOLDERS)
    report["id"] = "kept: ids identify the ingested row and do not change on redaction"
    return report


@register_row_stage("pii", config=PiiConfig, version="2", summarize=_pii_summary)
def pii_stage(batch: pl.DataFrame, config: PiiConfig, ctx: StageContext) -> BatchOutput:
    """Detect emails, phones, IPs, Luhn-valid cards and secrets in every message's content and in its
    tool calls' arguments; redact them or drop the rows.

    `id` is kept: it is the row's identity from ingest (dedup and labels refer to it), not a hash of
    the redacted text. Added columns: `pii_<type>_count` per type and `pii_redacted` (bool)."""
    table = batch
    # Running pii twice: counts are this run's; `pii_redacted` stays true for rows redacted before.
    previously = table["pii_redacted"] if "pii_redacted" in table.columns else pl.repeat(False, table.height, eager=True)
    table = table.drop([*PII_COUNT_COLUMNS, "pii_redacted"], strict=False).with_row_index("__row")
    messages = _messages_long(table)
    calls = _tool_calls_long(messages)
    texts = pii.redact_texts(_texts_of(messages, calls).lazy()).collect()
    found = pl.sum_horizontal(pl.col(kind).fill_null(0) for kind in pii.PII_TYPES)
    counts = texts.group_by("__row").agg(pl.col(kind).fill_null(0).sum().alias(f"pii_{kind}_count") for kind in pii.PII_TYPES)
    table = table.join(counts, on="__row", how="left", maintain_order="left").with_columns(
        pl.col(PII_COUNT_COLUMNS).fill_null(0).cast(pl.Int64)
    )
    total = pl.sum_horizontal(PII_COUNT_COLUMNS)
    if config.mode == "drop":
        table = table.with_columns(pl.lit(False).alias("pii_redacted"))
        reasons = pl.concat_list(
            [pl.when(pl.col(f"pii_{kind}_count") > 0).then(pl.lit(f"pii_{kind}")) for kind in pii.PII_TYPES]
        ).list.drop_nulls()
        has_pii = total > 0
        dropped = drop_rows(
            table.lazy().filter(has_pii).with_columns(reasons.alias("reasons")), ctx.name, pl.col("reasons").list.first()
        ).drop("__row")
        return BatchOutput(kept=table.filter(~has_pii).drop("__row"), dropped=dropped.collect())
    changed = texts.filter(found > 0).select("__row", "__column").unique()
    redacted = _redacted_messages(messages, calls, texts, changed)
    for column in MESSAGE_COLUMNS:
        table = _with_redacted_messages(table, redacted.filter(pl.col("__column") == column), column)
    table = table.with_columns(((total > 0) | pl.lit(previously.fill_null(False))).alias("pii_redacted")).drop("__row")
    return BatchOutput(kept=table)


def _messages_long(table: pl.DataFrame) -> pl.DataFrame:
    """One row per message of every message column: `__row`, `__column`, `__position` and the message's
    own fields (role, content, tool_calls, tool_call_id)."""
    return pl.concat(
        [
            table.select("__row", pl.lit(column).alias("__column"), pl.col(column).alias("__message"))
            .explode("__message")
            .filter(pl.col("__message").is_not_null())
            .with_columns(pl.int_range(pl.len()).over("__row").alias("__position"))
            .unnest("__message")
            for column in MESSAGE_COLUMNS
        ]
    )


_CALL_KEYS = ["__row", "__column", "__position"]


def _tool_calls_long(messages: pl.DataFrame) -> pl.DataFrame:
    """One row per tool call: the message keys, `__call` (its index in the message) and the call's fields
    (an empty frame when the messages carry no tool fields)."""
    if "tool_calls" not in messages.columns:
        return pl.DataFrame()
    return (
        messages.select(*_CALL_KEYS, "tool_calls")
        .filter(pl.col("tool_calls").list.len() > 0)
        .with_columns(pl.int_ranges(pl.col("tool_calls").list.len(), dtype=pl.Int64).alias("__call"))
        .explode("tool_calls", "__call")
        .unnest("tool_calls")
    )


def _texts_of(messages: pl.DataFrame, calls: pl.DataFrame) -> pl.DataFrame:
    """Every text PII can hide in, as `__row`, `__column`, `__position`, `__call` (null for a message's
    content, the call's index for its arguments) and `text`, with `__text_index` in that order."""
    contents = messages.select(*_CALL_KEYS, pl.lit(None, dtype=pl.Int64).alias("__call"), pl.col("content").alias("text"))
    parts = [contents]
    if calls.height:
        parts.append(calls.select(*_CALL_KEYS, "__call", pl.col("function").struct.field("arguments").alias("text")))
    return pl.concat(parts).with_row_index("__text_index")


def _redacted_messages(messages: pl.DataFrame, calls: pl.DataFrame, texts: pl.DataFrame, changed: pl.DataFrame) -> pl.DataFrame:
    """The messages of the (row, column) pairs in `changed`, with redacted contents and tool-call arguments
    and every other field as it was."""
    keys = ["__row", "__column"]
    redacted_content = texts.filter(pl.col("__call").is_null()).select(*_CALL_KEYS, pl.col("text").alias("__content"))
    rows = messages.join(changed, on=keys, how="semi").join(redacted_content, on=_CALL_KEYS, how="left", maintain_order="left")
    rows = rows.with_columns(pl.col("__content").alias("content")).drop("__content")
    calls = calls.join(changed, on=keys, how="semi") if calls.height else calls
    if calls.height:
        redacted_arguments = texts.filter(pl.col("__call").is_not_null()).select(*_CALL_KEYS, "__call", pl.col("text").alias("__arguments"))
        function = calls.schema["function"]
        rebuilt = (
            calls.join(redacted_arguments, on=[*_CALL_KEYS, "__call"], how="left", maintain_order="left")
            .with_columns(pl.col("function").struct.with_fields(pl.col("__arguments").alias("arguments")).cast(function))
            .sort(*_CALL_KEYS, "__call")
            .group_by(_CALL_KEYS, maintain_order=True)
            .agg(pl.struct(name for name in calls.columns if name not in (*_CALL_KEYS, "__call")).alias("__tool_calls"))
        )
        rows = (
            rows.join(rebuilt, on=_CALL_KEYS, how="left", maintain_order="left")
            .with_columns(pl.coalesce("__tool_calls", pl.col("tool_calls").cast(rebuilt.schema["__tool_calls"])).alias("tool_calls"))
            .drop("__tool_calls")
        )
    return rows


def _with_redacted_messages(table: pl.DataFrame, part: pl.DataFrame, column: str) -> pl.DataFrame:
    """`table` with `column` rebuilt, for the rows in `part` (their messages, redacted, every field kept)."""
    if part.height == 0:
        return table
    fields = [field.name for field in table.schema[column].inner.fields]
    rebuilt = (
        part.sort("__row", "__position")
        .group_by("__row", maintain_order=True)
        .agg(pl.struct(fields).alias("__new"))
        .with_columns(pl.col("__new").cast(table.schema[column]))
    )
    return (
        table.join(rebuilt, on="__row", how="left", maintain_order="left")
        .with_columns(pl.coalesce("__new", column).alias(column))
        .drop("__new")
    )


# --------------------------------------------------------------------------------------- decontaminate


class DecontaminateConfig(StageConfig):
    eval_files: tuple[str, ...] = Field(
        ..., min_length=1, description="Evaluation sets, in any format ingest reads (relative to the pipeline)."
    )
    ngram: int = Field(12, ge=3, le=50, description="Word n-gram size (12: long enough to be a real copy).")
    min_overlap: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="Share of an eval item's distinct n-grams a row must contain to be contaminated by it. "
        "0.6: a verbatim or lightly edited copy covers 0.7-1.0, while templated support conversations that "
        "merely share stock sentences with an eval item stay below (sample data: at most 0.61 unplanted, at "
        "least 0.69 planted).",
    )
    min_matching_ngrams: int = Field(
        1, ge=1, le=100_000, description="Also require at least this many shared n-grams (guards tiny eval items)."
    )
    mode: Literal["drop", "flag"] = Field(
        "drop", description="drop: remove contaminated rows here; flag: keep them with the column set "
        "(the filter stage's `drop_contaminated` then decides)."
    )


def _eval_paths(config: DecontaminateConfig, ctx: StageContext):
    return [ctx.resolve(path) for path in config.eval_files]


def _eval_items(config: DecontaminateConfig, ctx: StageContext) -> pl.DataFrame:
    """The evaluation items, read once per stage run (every batch and the report share them)."""
    return ctx.cached("eval_items", lambda: decontam.load_eval_items(_eval_paths(config, ctx), labels=list(config.eval_files)))


def _decontaminate_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: DecontaminateConfig, ctx: StageContext) -> dict:
    items = _eval_items(config, ctx)
    parts = [kept.select("contamination_eval_id")]
    if "contamination_eval_id" in dropped.collect_schema().names():
        parts.append(dropped.select("contamination_eval_id"))
    matched_id = pl.col("contamination_eval_id")
    contaminated_rows, eval_items_matched = pl.concat(parts).select(
        matched_id.is_not_null().sum(), matched_id.drop_nulls().n_unique().alias("matched")
    ).collect(engine="streaming").row(0)
    return {
        "mode": config.mode,
        "ngram": config.ngram,
        "eval_items": items.height,
        "eval_items_too_short": int(
            items.select(decontam.normalized_words(pl.col("text")).list.len() < config.ngram).to_series().sum()
        ),
        "min_overlap": config.min_overlap,
        "contaminated_rows": int(contaminated_rows),
        "eval_items_matched": int(eval_items_matched),
    }


@register_row_stage(
    "decontaminate", config=DecontaminateConfig, version="1", extra_inputs=_eval_paths, summarize=_decontaminate_summary
)
def decontaminate_stage(batch: pl.DataFrame, config: DecontaminateConfig, ctx: StageContext) -> BatchOutput:
    """Flag or drop rows covering an evaluation item's word n-grams (`contamination_eval_id`)."""
    items = _eval_items(config, ctx)
    texts = batch.lazy().select(decontam.scored_text().alias(ALL_TEXT))
    found = decontam.contamination(
        texts, ALL_TEXT, items, config.ngram, config.min_overlap, config.min_matching_ngrams
    ).collect()
    table = pl.concat([batch.drop(found.columns, strict=False), found], how="horizontal")
    if config.mode == "flag":
        return BatchOutput(kept=table)
    contaminated = pl.col("contamination_eval_id").is_not_null()
    dropped = drop_rows(table.lazy().filter(contaminated), ctx.name, "contaminated").collect()
    return BatchOutput(kept=table.filter(~contaminated), dropped=dropped)
