"""The `filter` stage: apply rules (curate/filters/thresholds.py) to the scores `tag` wrote.

Each dropped row carries `stage`, `reason` (the first failing rule, in rule order) and `reasons`
(every failing rule). The report holds the funnel: for every rule, the rows it dropped as first reason
and the rows failing it at all, plus the optional rules skipped because their score column is absent.
A required score column that is absent is a config error naming the stage that writes it.
"""

from __future__ import annotations

import polars as pl

from curate.errors import ConfigError
from curate.filters import language as language_id
from curate.filters.heuristics import repetition_score_names
from curate.filters.thresholds import FilterConfig, compile_rule, resolve_rules
from curate.stage import BatchOutput, StageContext, drop_rows, register_row_stage


INSTRUCTION_COLUMNS = ("assistant_ends_mid_sentence", "assistant_truncation")


def producer_of(column: str) -> str:
    """Which earlier stage (and option) writes a score column, for the missing-column error."""
    if column == "contamination_eval_id":
        return "a `decontaminate` stage with mode: flag"
    if column in ("lang", "lang_score"):
        return "a `tag` stage with language identification on (tag config `language:` not null)"
    if column in ("token_count", "assistant_token_count"):
        return "a `tag` stage with a `tokenizer`"
    if column in repetition_score_names():
        return "a `tag` stage (with repetition: true)"
    if column.startswith(("user_", "assistant_")) and column not in INSTRUCTION_COLUMNS:
        return "a `tag` stage (with heuristics: true)"
    return "a `tag` stage (with instruction: true)"


def _check_language_codes(specs) -> None:
    for spec in specs:
        if spec.column == "lang":
            language_id.validate_codes([*(spec.in_ or []), *(spec.not_in or [])], f"filter rule {spec.name!r}")


def _rules_for(columns: list[str], config: FilterConfig, ctx: StageContext) -> tuple[list, dict[str, str]]:
    """The rules that apply to a table with these columns, and the optional ones skipped (why)."""
    specs = resolve_rules(config)
    _check_language_codes(specs)
    present = set(columns)
    rules, skipped = [], {}
    for rule in map(compile_rule, specs):
        missing = [column for column in rule.columns if column not in present]
        if missing and rule.optional:
            skipped[rule.name] = f"column {', '.join(missing)} absent (written by {producer_of(missing[0])})"
        elif missing:
            raise ConfigError(
                f"stage {ctx.name!r}: rule {rule.name!r} needs column {missing[0]!r}, which no earlier stage wrote: "
                f"add {producer_of(missing[0])} before it (or disable the rule)"
            )
        else:
            rules.append(rule)
    return rules, skipped


def _filter_summary(kept: pl.LazyFrame, dropped: pl.LazyFrame, config: FilterConfig, ctx: StageContext) -> dict:
    """The funnel, from the written rows: dropped rows carry every failing rule in `reasons`."""
    rules, skipped = _rules_for(list(ctx.input_schema or kept.collect_schema()), config, ctx)
    kept_rows = kept.select(pl.len()).collect().item()
    dropped_rows = dropped.select(pl.len()).collect().item()
    return {
        "rows_in": kept_rows + dropped_rows,
        "kept": kept_rows,
        "dropped": dropped_rows,
        "preset": config.preset,
        "funnel": _funnel(kept_rows + dropped_rows, dropped, rules) if dropped_rows else _funnel(kept_rows, None, rules),
        "skipped_rules": skipped,
        "rules": [rule.name for rule in rules],
    }


@register_row_stage("filter", config=FilterConfig, version="2", summarize=_filter_summary)
def filter_stage(batch: pl.DataFrame, config: FilterConfig, ctx: StageContext) -> BatchOutput:
    """Drop rows failing a rule; reason = first failing rule, reasons = all failing rules."""
    rules, _ = ctx.cached(f"rules:{','.join(batch.columns)}", lambda: _rules_for(batch.columns, config, ctx))
    if rules:
        reasons = pl.concat_list(
            [pl.when(rule.fails).then(pl.lit(rule.name)).otherwise(None) for rule in rules]
        ).list.drop_nulls()
    else:
        reasons = pl.lit([], dtype=pl.List(pl.String))
    table = batch.with_columns(reasons.alias("reasons"))
    failing = pl.col("reasons").list.len() > 0
    dropped = drop_rows(table.lazy().filter(failing), ctx.name, pl.col("reasons").list.first()).collect()
    return BatchOutput(kept=table.filter(~failing).drop("reasons"), dropped=dropped)


def _funnel(rows_in: int, failing: pl.LazyFrame | None, rules) -> list[dict]:
    first_counts, any_counts = {}, {}
    if failing is not None:
        first_counts = dict(failing.group_by(pl.col("reasons").list.first()).len().collect(engine="streaming").iter_rows())
        any_counts = dict(
            failing.select(pl.col("reasons").explode()).group_by("reasons").len().collect(engine="streaming").iter_rows()
        )
    funnel, remaining = [], rows_in
    for rule in rules:
        dropped_here = int(first_counts.get(rule.name, 0))
        remaining -= dropped_here
        funnel.append(
            {"rule": rule.name, "dropped": dropped_here, "failing": int(any_counts.get(rule.name, 0)), "remaining": remaining}
        )
    return funnel
