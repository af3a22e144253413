"""The local engine: runs a stage on this machine through Polars' streaming engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from curate.atomic import atomic_path
from curate.stage import StageContext, StageSpec
from schemas import CANONICAL_SCHEMA


def empty_dropped_schema() -> dict:
    return {**CANONICAL_SCHEMA, "stage": pl.String(), "reason": pl.String()}


class LocalEngine:
    name = "local"

    def execute(
        self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path
    ) -> dict[str, Any]:
        output = spec.run(pl.scan_parquet(input_path, glob=False), config, ctx)
        dropped = output.dropped if output.dropped is not None else pl.LazyFrame(schema=empty_dropped_schema())
        with atomic_path(kept_path, suffix=".parquet") as kept_tmp, atomic_path(dropped_path, suffix=".parquet") as dropped_tmp:
            # One execution for both sinks: the shared upstream plan is computed once, streaming.
            pl.collect_all(
                [
                    output.kept.sink_parquet(kept_tmp, lazy=True, compression="zstd"),
                    dropped.sink_parquet(dropped_tmp, lazy=True, compression="zstd"),
                ],
                engine="streaming",
            )
        return dict(output.report)

    def close(self) -> None:
        pass
