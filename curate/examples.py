"""Example rows of a finished run, for `curate preview` and the report: kept rows of a stage, dropped
rows of a reason, quarantined raw lines with why. Rows are taken in file order (the first n), so the
same run always shows the same examples. Text is returned as plain strings; callers escape or render
it literally (user text is never markup)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.errors import ConfigError

PREVIEW_CHARS = 300
ROLE_COLUMNS = ("messages", "prompt", "chosen", "rejected")


def _turns(column: str) -> pl.Expr:
    turns = pl.col(column).list.eval(
        pl.element().struct.field("role").cast(pl.String) + ": " + pl.element().struct.field("content").cast(pl.String).fill_null("")
    )
    return turns.list.join("\n")


def conversation_text(schema: pl.Schema) -> pl.Expr:
    """One readable string per row: its turns as `role: content` lines (preference: chosen/rejected labelled)."""
    parts = []
    for column in ROLE_COLUMNS:
        if column in schema:
            label = "" if column in ("messages", "prompt") else f"[{column}] "
            parts.append(pl.when(pl.col(column).list.len() > 0).then(pl.lit(label) + _turns(column)))
    if not parts:
        return pl.lit("")
    return pl.concat_str(parts, separator="\n", ignore_nulls=True)


def _short(expr: pl.Expr, chars: int) -> pl.Expr:
    return pl.when(expr.str.len_chars() > chars).then(expr.str.slice(0, chars) + "…").otherwise(expr)


def row_examples(path: Path, n: int, reason: str | None = None, chars: int = PREVIEW_CHARS) -> pl.DataFrame:
    """Columns `id`, `source`, `reason` (dropped rows), `reasons`, `text` for the first n rows."""
    frame = pl.scan_parquet(path, glob=False)
    schema = frame.collect_schema()
    if reason is not None:
        frame = frame.filter(pl.col("reason") == reason) if "reason" in schema else frame.head(0)
    columns = [
        pl.col("id").cast(pl.String) if "id" in schema else pl.lit(None, pl.String).alias("id"),
        (pl.col("source").struct.field("file").cast(pl.String) + ":" + pl.col("source").struct.field("row").cast(pl.String)).alias("source")
        if "source" in schema
        else pl.lit(None, pl.String).alias("source"),
        pl.col("reason").cast(pl.String) if "reason" in schema else pl.lit(None, pl.String).alias("reason"),
        pl.col("reasons").list.join(", ") if "reasons" in schema else pl.lit(None, pl.String).alias("reasons"),
        _short(conversation_text(schema), chars).alias("text"),
    ]
    return frame.head(n).select(columns).collect()


def quarantine_examples(path: Path, n: int, reason: str | None = None, chars: int = PREVIEW_CHARS) -> pl.DataFrame:
    """Columns `where` (file:row), `reason`, `field`, `detail`, `raw` (cut to `chars`)."""
    frame = pl.scan_parquet(path, glob=False)
    schema = frame.collect_schema()
    if reason is not None:
        frame = frame.filter(pl.col("reason") == reason)
    text = lambda name: pl.col(name).cast(pl.String) if name in schema else pl.lit(None, pl.String).alias(name)  # noqa: E731
    return (
        frame.head(n)
        .select(
            (text("file") + ":" + text("row")).alias("where"),
            text("reason"),
            text("field"),
            text("detail"),
            _short(text("raw"), chars).alias("raw"),
        )
        .collect()
    )


def stage_names(manifest: dict) -> list[str]:
    return [str(stage.get("name")) for stage in manifest.get("stages", []) if isinstance(stage, dict)]


def stage_folder(run_dir: Path, manifest: dict, stage: str | None) -> tuple[str, Path]:
    """The named stage's folder (default: the last stage that wrote data); unknown names are an error."""
    names = stage_names(manifest)
    if stage is None:
        with_data = [name for name in names if (run_dir / name / "data.parquet").exists()]
        if not with_data:
            raise ConfigError(f"{run_dir}: no stage wrote data.parquet; nothing to preview")
        stage = with_data[-1]
    elif stage not in names:
        raise ConfigError(f"{run_dir}: no stage named {stage!r} (stages: {', '.join(names) or 'none'})")
    return stage, run_dir / stage
