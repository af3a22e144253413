"""The `filter` stage: apply thresholds (curate/filters/thresholds.py) to the scores `tag` wrote.

Each dropped row carries `stage`, `reason` (the first failing rule, in config order) and `reasons`
(every failing rule). The report holds the funnel: for every rule, the rows it dropped as first reason
and the rows failing it at all, plus the rules skipped because their score column is absent.
"""

from __future__ import annotations

import polars as pl

from curate.filters.thresholds import FilterConfig, rules_from_config
from curate.stage import StageContext, StageOutput, drop_rows, register_stage


@register_stage("filter", config=FilterConfig, version="1")
def filter_stage(frame: pl.LazyFrame, config: FilterConfig, ctx: StageContext) -> StageOutput:
    """Drop rows failing a threshold; reason = first failing rule, reasons = all failing rules."""
    columns = set(frame.collect_schema().names())
    rules, skipped = [], {}
    for rule in rules_from_config(config):
        missing = [column for column in rule.columns if column not in columns]
        if missing:
            skipped[rule.name] = f"column {', '.join(missing)} absent (not computed by an earlier stage)"
        else:
            rules.append(rule)
    if rules:
        reasons = pl.concat_list(
            [pl.when(rule.fails.fill_null(False)).then(pl.lit(rule.name)).otherwise(None) for rule in rules]
        ).list.drop_nulls()
    else:
        reasons = pl.lit([], dtype=pl.List(pl.String))
    table = frame.with_columns(reasons.alias("reasons")).collect()
    failing = table.filter(pl.col("reasons").list.len() > 0)
    first_counts = dict(failing.group_by(pl.col("reasons").list.first()).len().iter_rows())
    any_counts = dict(failing.select(pl.col("reasons").explode()).group_by("reasons").len().iter_rows())
    funnel, remaining = [], table.height
    for rule in rules:
        dropped_here = int(first_counts.get(rule.name, 0))
        remaining -= dropped_here
        funnel.append(
            {"rule": rule.name, "dropped": dropped_here, "failing": int(any_counts.get(rule.name, 0)), "remaining": remaining}
        )
    report = {
        "rows_in": table.height,
        "kept": table.height - failing.height,
        "dropped": failing.height,
        "funnel": funnel,
        "skipped_rules": skipped,
        "rules": [rule.name for rule in rules],
    }
    kept = table.lazy().filter(pl.col("reasons").list.len() == 0).drop("reasons")
    dropped = drop_rows(failing.lazy(), ctx.name, pl.col("reasons").list.first())
    return StageOutput(kept=kept, dropped=dropped, report=report)
