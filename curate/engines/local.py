"""The local engine: runs a stage on this machine in bounded memory.

Row-local stages (`spec.kind == "row"`) stream: the input Parquet is read in batches of `batch_rows`
rows, `spec.transform` runs on each (a few batches at once on a small thread pool: Polars releases the
GIL, so both cores work), and the kept and dropped rows are appended, in input order, to incremental
Parquet writers. The writers cut row groups of a fixed size (ROW_GROUP_ROWS) whatever the batch size,
so the files are byte-identical for any `batch_rows`: the batch size is a memory knob, never part of
the result. The report is `spec.summarize` over the written files (lazy, streaming).

Global stages run their whole-table `spec.run`; its kept and dropped outputs are streamed to Parquet
by Polars, one sink after the other.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.atomic import ROW_GROUP_ROWS, atomic_path
from curate.errors import ConfigError
from curate.parallel import ordered_map
from curate.stage import BatchOutput, StageContext, StageSpec
from schemas import CANONICAL_SCHEMA

DEFAULT_BATCH_ROWS = 2_000  # tag holds ~25 KB per 1 KB chat record of a batch: ~50 MB per batch, three in flight
WORKERS = 2  # the transforms are Polars-heavy and release the GIL; more threads only add memory


def empty_dropped_schema() -> dict:
    return {**CANONICAL_SCHEMA, "stage": pl.String(), "reason": pl.String()}


class ParquetAppender:
    """Appends DataFrames to one Parquet file in row groups of exactly `row_group_rows` rows (the last
    one shorter); the schema is the first frame's, later frames are cast to it."""

    def __init__(self, path: Path, row_group_rows: int = ROW_GROUP_ROWS):
        self.path, self.row_group_rows = path, row_group_rows
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def append(self, frame: pl.DataFrame) -> None:
        table = frame.to_arrow()
        if self._schema is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd")
        elif table.schema != self._schema:
            if sorted(table.schema.names) != sorted(self._schema.names):
                # A column only some batches carry would be lost or misaligned: a bug in the stage.
                raise ValueError(
                    f"{self.path.name}: a batch's columns {sorted(table.schema.names)} differ from the first batch's "
                    f"{sorted(self._schema.names)}; a row-local stage must output the same columns for every batch"
                )
            table = table.select(self._schema.names).cast(self._schema)
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending).combine_chunks()
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self, fallback_schema: dict) -> None:
        if self._writer is None:  # nothing was ever appended: an empty file with the fallback schema
            pl.DataFrame(schema=fallback_schema).write_parquet(self.path, compression="zstd")
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()


def _row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _append_outputs(outputs: Iterator[tuple[int, BatchOutput]], phase, kept_path: Path, dropped_path: Path, fallbacks: tuple[dict, dict]) -> None:
    """(rows read, BatchOutput) pairs appended to the two outputs in fixed row groups, atomically; an
    output that never got a row is written empty with its fallback schema."""
    with ExitStack() as stack:
        kept_tmp = stack.enter_context(atomic_path(kept_path, suffix=".parquet"))
        dropped_tmp = stack.enter_context(atomic_path(dropped_path, suffix=".parquet"))
        kept, dropped = ParquetAppender(kept_tmp), ParquetAppender(dropped_tmp)
        progress = stack.enter_context(phase)
        for rows_read, output in outputs:
            kept.append(output.kept)
            if output.dropped is not None:
                dropped.append(output.dropped)
            progress.advance(rows_read)
        kept.close(fallback_schema=fallbacks[0])
        dropped.close(fallback_schema=fallbacks[1])


def read_batches(input_path: Path, batch_rows: int) -> Iterator[pl.DataFrame]:
    """The input in batches of at most `batch_rows` rows (one empty batch for an empty input, so the
    transform still declares its output columns)."""
    # pre_buffer=False: with pyarrow's default (True), iter_batches keeps every column chunk it has read
    # cached until the file is closed: ~330 MB more at the end of a 1M-row, 350 MB file (and 40% slower).
    parquet = pq.ParquetFile(input_path, pre_buffer=False)
    empty = True
    for record_batch in parquet.iter_batches(batch_size=batch_rows):
        if record_batch.num_rows == 0:
            continue
        empty = False
        yield pl.from_arrow(pa.Table.from_batches([record_batch]), rechunk=False)
    if empty:
        yield pl.from_arrow(parquet.schema_arrow.empty_table())


# `isolate_stages: auto` runs a stage in a process of its own (curate/engines/isolation.py) from this many
# input rows: below it the process start (~1 s) costs more than the memory it returns is worth (what a
# stage's allocator keeps grows with its input: ~100 MB at 100k rows, ~300-450 MB at 1M).
ISOLATE_FROM_ROWS = 100_000


class LocalEngine:
    name = "local"

    def __init__(self, batch_rows: int = DEFAULT_BATCH_ROWS, workers: int = WORKERS, isolate_stages: bool | str = "auto"):
        if isolate_stages not in (True, False, "auto"):
            raise ConfigError(f"engine.isolate_stages: expected true, false or auto, got {isolate_stages!r}")
        self.batch_rows, self.workers, self.isolate_stages = batch_rows, workers, isolate_stages

    def options(self) -> dict:
        """The options this engine was built with (JSON): what a stage's own process builds its engine from."""
        return {"batch_rows": self.batch_rows, "workers": self.workers, "isolate_stages": self.isolate_stages}

    def isolates(self, rows: int) -> bool:
        """Whether a stage with `rows` input rows runs in a process of its own (a fresh heap)."""
        return self.isolate_stages is True or (self.isolate_stages == "auto" and rows >= ISOLATE_FROM_ROWS)

    def execute(
        self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path
    ) -> dict[str, Any]:
        if spec.kind == "row":
            return self._execute_rows(spec, config, ctx, input_path, kept_path, dropped_path)
        output = spec.run(pl.scan_parquet(input_path, glob=False), config, ctx)
        dropped = output.dropped if output.dropped is not None else pl.LazyFrame(schema=empty_dropped_schema())
        if output.split_batch is not None:
            self._write_split_batches(output, dropped, ctx, input_path, kept_path, dropped_path)
            return dict(output.report)
        with ctx.phase("writing", unit="files") as writing, atomic_path(kept_path, suffix=".parquet") as kept_tmp, atomic_path(dropped_path, suffix=".parquet") as dropped_tmp:
            # One streaming sink after the other: the upstream plan is read twice (a few CPU-seconds at
            # 1M rows), but nothing of it is held between them. One execution for both sinks
            # (`collect_all`) cached the shared upstream plan's output in memory: +930 MB where the
            # separate sinks add 580 MB, at 1M rows of dedup's outputs; same bytes.
            for frame, tmp in ((output.kept, kept_tmp), (dropped, dropped_tmp)):
                frame.sink_parquet(tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS, engine="streaming")
                writing.advance(1)
        return dict(output.report)

    def _write_split_batches(self, output, dropped: pl.LazyFrame, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path) -> None:
        """A global stage's outputs written from its input, batch by batch through `output.split_batch`, in
        the row stages' fixed row groups: memory is one batch and the stage's own decisions."""

        def split_batches() -> Iterator[tuple[int, BatchOutput]]:
            offset = 0
            for batch in read_batches(input_path, self.batch_rows):
                yield batch.height, output.split_batch(batch, offset)
                offset += batch.height

        fallbacks = dict(output.kept.collect_schema()), dict(dropped.collect_schema())
        _append_outputs(split_batches(), ctx.phase("writing", total=_row_count(input_path), unit="rows"), kept_path, dropped_path, fallbacks)

    def _execute_rows(
        self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path
    ) -> dict[str, Any]:
        phase = ctx.phase("transform", total=_row_count(input_path), unit="rows")
        fallbacks = dict(ctx.input_schema or CANONICAL_SCHEMA), empty_dropped_schema()
        _append_outputs(self._transformed(spec, config, ctx, input_path), phase, kept_path, dropped_path, fallbacks)
        if spec.summarize is None:
            return {}
        return dict(spec.summarize(pl.scan_parquet(kept_path, glob=False), pl.scan_parquet(dropped_path, glob=False), config, ctx))

    def _transformed(self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path) -> Iterator[tuple[int, BatchOutput]]:
        """(batch rows, transform(batch)) in input order, with at most `workers + 1` batches in flight (a
        batch is released once transformed: only its row count is kept)."""

        def transformed(batch: pl.DataFrame) -> tuple[int, BatchOutput]:
            return batch.height, spec.transform(batch, config, ctx)

        return ordered_map(transformed, read_batches(input_path, self.batch_rows), self.workers, f"curate-{ctx.name}")

    def close(self) -> None:
        pass
