"""Mixing sources to target ratios or weights, with deterministic up- and down-sampling.

Rows are grouped by source: a configured name → glob patterns mapping over `source.file` (first match
wins), or else the source file itself. Each record kind (sft, preference) is mixed on its own, since
they end up in separate datasets. Per group a target row count is computed (weights: count × weight;
ratios: the largest total the ratios allow without upsampling, or `total_rows`), then:

- downsampling keeps the `target` rows of the group with the smallest sha256(seed, id, file, row);
  the rest are dropped with reason `mix_downsampled`;
- upsampling repeats every row `target // count` times and one more time for the `target % count`
  rows first in that hash order; copies carry `mix_copy` = 1, 2, ... (originals 0).

Everything is Polars expressions; the only Python loop is over groups, to compute their targets.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import polars as pl
from pydantic import Field, model_validator

from curate.errors import ConfigError
from curate.split import hash_fraction
from curate.stage import NonNegativeFloat, Seed, StageConfig, drop_rows

DROP_REASON = "mix_downsampled"
_GROUP = "__mix_group"


class MixConfig(StageConfig):
    sources: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Group name → glob patterns over source.file (e.g. replay: ['replay/*']); first match wins. "
        "Rows matching none are grouped by their file.",
    )
    ratios: dict[str, NonNegativeFloat] | None = Field(None, description="Target share of each group in the output.")
    weights: dict[str, NonNegativeFloat] | None = Field(None, description="Multiplier of each group's row count.")
    total_rows: int | None = Field(
        None, ge=1, description="With ratios: rows per record kind; default is the most reachable without upsampling."
    )
    allow_upsample: bool = Field(True, description="If false, a target above a group's size is an error.")
    seed: Seed | None = Field(None, description="Overrides the pipeline seed for sampling.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.ratios is None) == (self.weights is None):
            raise ValueError("give exactly one of ratios or weights")
        if self.ratios is not None and sum(self.ratios.values()) <= 0:
            raise ValueError("ratios must not all be 0")
        return self


def group_expression(config: MixConfig, files: list[str]) -> pl.Expr:
    """The group of each row: a name from `sources` (patterns matched per distinct file, not per row)."""
    mapping = {}
    for file in files:
        for name, patterns in config.sources.items():
            if any(fnmatch.fnmatch(file, pattern) for pattern in patterns):
                mapping[file] = name
                break
    file = pl.col("source").struct.field("file")
    return file.replace_strict(mapping, default=file, return_dtype=pl.String) if mapping else file


def largest_remainder(shares: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing to `total`, proportional to `shares` (ties to the smaller name)."""
    weight = sum(shares.values())
    exact = {name: total * share / weight for name, share in shares.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = total - sum(counts.values())
    for name in sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))[:left]:
        counts[name] += 1
    return counts


def group_targets(config: MixConfig, available: dict[str, int]) -> dict[str, int]:
    """Target rows per group of one record kind."""
    if config.weights is not None:
        unknown = sorted(set(available) - set(config.weights))
        if unknown:
            raise ConfigError(f"mix: groups {unknown} have no weight (groups found: {sorted(available)})")
        return {name: round(count * config.weights[name]) for name, count in available.items()}
    unknown = sorted(set(available) - set(config.ratios))
    if unknown:
        raise ConfigError(f"mix: groups {unknown} have no ratio (groups found: {sorted(available)}); give 0 to drop")
    shares = {name: config.ratios[name] for name in available if config.ratios[name] > 0}
    if not shares:
        return {name: 0 for name in available}
    weight = sum(shares.values())
    if config.total_rows is not None:
        total = config.total_rows
    else:
        total = math.floor(min(available[name] * weight / share for name, share in shares.items()) + 1e-9)
    targets = largest_remainder(shares, total)
    return {name: targets.get(name, 0) for name in available}


def mix_sources(frame: pl.LazyFrame, config: MixConfig, seed: int, stage: str):
    """Returns (kept, dropped, report): kept holds originals and upsampled copies (`mix_copy`)."""
    files = frame.select(pl.col("source").struct.field("file").unique().sort()).collect().to_series().to_list()
    rows = frame.with_columns(group_expression(config, files).alias(_GROUP))
    counts = rows.group_by("kind", _GROUP).len().sort("kind", _GROUP).collect()

    target_rows = []
    report: dict[str, Any] = {"mode": "ratios" if config.ratios is not None else "weights", "seed": seed, "kinds": {}}
    for kind in counts["kind"].unique().sort().to_list():
        available = {
            row[_GROUP]: row["len"] for row in counts.filter(pl.col("kind") == kind).iter_rows(named=True)
        }
        targets = group_targets(config, available)
        for name, target in targets.items():
            if target > available[name] and not config.allow_upsample:
                raise ConfigError(
                    f"mix: group {name!r} ({kind}) needs {target} rows but has {available[name]}; allow_upsample is off"
                )
            target_rows.append({"kind": kind, _GROUP: name, "__target": target, "__available": available[name]})
        total = sum(targets.values())
        report["kinds"][kind] = {
            name: {
                "available": available[name],
                "target": targets[name],
                "kept_original": min(targets[name], available[name]),
                "upsampled_copies": max(0, targets[name] - available[name]),
                "downsampled_away": max(0, available[name] - targets[name]),
                "share": round(targets[name] / total, 6) if total else 0.0,
            }
            for name in sorted(targets)
        }
    target_frame = pl.DataFrame(
        target_rows, schema={"kind": pl.String, _GROUP: pl.String, "__target": pl.Int64, "__available": pl.Int64}
    )
    ranked = (
        rows.join(target_frame.lazy(), on=["kind", _GROUP], how="left", maintain_order="left")
        .with_columns(
            hash_fraction(
                pl.lit(str(seed)),
                pl.col("id"),
                pl.col("source").struct.field("file"),
                pl.col("source").struct.field("row"),
            ).alias("__u")
        )
        .with_columns(
            # 1-based position in hash order within the group; id/file/row break the (improbable) ties.
            pl.struct("__u", "id", pl.col("source").struct.field("file").alias("f"), pl.col("source").struct.field("row").alias("r"))
            .rank("ordinal")
            .over("kind", _GROUP)
            .alias("__rank")
        )
        .with_columns(
            (
                pl.col("__target") // pl.col("__available")
                + (pl.col("__rank") <= pl.col("__target") % pl.col("__available")).cast(pl.Int64)
            ).alias("__copies")
        )
    )
    helper = [_GROUP, "__target", "__available", "__u", "__rank", "__copies"]
    kept = (
        ranked.filter(pl.col("__copies") > 0)
        .with_columns(pl.int_ranges(0, pl.col("__copies")).alias("mix_copy"))
        .explode("mix_copy")
        .with_columns(pl.col("mix_copy").cast(pl.Int64))
        .drop(helper)
    )
    dropped = drop_rows(
        ranked.filter(pl.col("__copies") == 0).with_columns(pl.col(_GROUP).alias("mix_group")).drop(helper),
        stage,
        DROP_REASON,
    )
    return kept, dropped, report
