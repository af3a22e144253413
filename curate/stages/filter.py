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
from curate.stage import StageContext, StageOutput, drop_rows, register_stage


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


@register_stage("filter", config=FilterConfig, version="2")
def filter_stage(frame: pl.LazyFrame, config: FilterConfig, ctx: StageContext) -> StageOutput:
    """Drop rows failing a rule; reason = first failing rule, reasons = all failing rules."""
    specs = resolve_rules(config)
    _check_language_codes(specs)
    columns = set(frame.collect_schema().names())
    rules, skipped = [], {}
    for rule in map(compile_rule, specs):
        missing = [column for column in rule.columns if column not in columns]
        if missing and rule.optional:
            skipped[rule.name] = f"column {', '.join(missing)} absent (written by {producer_of(missing[0])})"
        elif missing:
            raise ConfigError(
                f"stage {ctx.name!r}: rule {rule.name!r} needs column {missing[0]!r}, which no earlier stage wrote: "
                f"add {producer_of(missing[0])} before it (or disable the rule)"
            )
        else:
            rules.append(rule)
    if rules:
        reasons = pl.concat_list(
            [pl.when(rule.fails).then(pl.lit(rule.name)).otherwise(None) for rule in rules]
        ).list.drop_nulls()
    else:
        reasons = pl.lit([], dtype=pl.List(pl.String))
    table = frame.with_columns(reasons.alias("reasons")).collect()
    failing = table.filter(pl.col("reasons").list.len() > 0)
    report = {
        "rows_in": table.height,
        "kept": table.height - failing.height,
        "dropped": failing.height,
        "preset": config.preset,
        "funnel": _funnel(table.height, failing, rules),
        "skipped_rules": skipped,
        "rules": [rule.name for rule in rules],
    }
    kept = table.lazy().filter(pl.col("reasons").list.len() == 0).drop("reasons")
    dropped = drop_rows(failing.lazy(), ctx.name, pl.col("reasons").list.first())
    return StageOutput(kept=kept, dropped=dropped, report=report)


def _funnel(rows_in: int, failing: pl.DataFrame, rules) -> list[dict]:
    first_counts = dict(failing.group_by(pl.col("reasons").list.first()).len().iter_rows())
    any_counts = dict(failing.select(pl.col("reasons").explode()).group_by("reasons").len().iter_rows())
    funnel, remaining = [], rows_in
    for rule in rules:
        dropped_here = int(first_counts.get(rule.name, 0))
        remaining -= dropped_here
        funnel.append(
            {"rule": rule.name, "dropped": dropped_here, "failing": int(any_counts.get(rule.name, 0)), "remaining": remaining}
        )
    return funnel
