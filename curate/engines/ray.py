"""The Ray engine: runs the same stages on a Ray cluster through Ray Data (optional extra `curate[ray]`).

What runs where (docs/scale.md, "Ray engine"):

- a row-local stage (`spec.kind == "row"`) runs on the cluster: `read_parquet(input)` → batches of at
  most `batch_rows` rows → `map_batches` over Arrow batches, each a `pl.from_arrow` → `spec.transform` →
  the kept and dropped rows written by the worker as Parquet parts in a temp folder of the stage dir
  (one pass gives both outputs). Execution is ordered (`preserve_order`), so the driver receives the
  part names in input order and concatenates them into the stage's single `data.parquet` and
  `dropped.parquet`, atomically: the same rows in the same order as the local engine.
- a global stage with a distributed form (`spec.distributed`) runs it on the cluster, and its kept and
  dropped datasets are written the same way;
- any other global stage (split, mix, label) runs `spec.run` on the driver over the written Parquet,
  exactly as the local engine does.

Every report says which path ran (`executed_on: "ray" | "driver"`). The run dir must sit on a
filesystem every node of the cluster shares (workers write the parts, the driver reads them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import ray
import ray.data

from curate.atomic import atomic_path
from curate.engines.local import DEFAULT_BATCH_ROWS, LocalEngine, ParquetAppender, empty_dropped_schema
from curate.errors import ConfigError, CurateError, ExternalServiceError, RunStateError
from curate.stage import StageContext, StageSpec
from safety.redact import redact

PARTS_PREFIX = ".ray-parts."  # + 8 random chars + ".tmp": a name safety.ownership cleans after a kill


class RayEngine:
    """Runs stages on a Ray cluster: `address` is `auto`, `HOST:PORT` or `ray://...`; without one a local
    cluster of `num_cpus` CPUs (default: all) starts, and stops again at `close()`."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, batch_rows: int = DEFAULT_BATCH_ROWS, isolate_stages: bool | str = "auto"):
        # isolate_stages is the local engine's (a process per stage); Ray's workers are processes of their
        # own already, and the driver keeps its one process.
        if address and num_cpus is not None:
            raise ConfigError("--num-cpus sizes a local Ray cluster; a cluster at --address has its own")
        if batch_rows < 1:
            raise ConfigError(f"batch_rows must be at least 1, got {batch_rows}")
        self.batch_rows = batch_rows
        if address:
            _check_reachable(address)  # even when this process is already connected: a wrong address is an error
        self._started_here = not ray.is_initialized()
        if self._started_here:
            _connect(address, num_cpus)
        _quiet_ray_data()

    def execute(
        self, spec: StageSpec, config: Any, ctx: StageContext, input_path: Path, kept_path: Path, dropped_path: Path
    ) -> dict[str, Any]:
        if spec.kind == "row":
            report = self._row_stage(spec, config, ctx, input_path, kept_path, dropped_path)
            return {**report, "executed_on": "ray"}
        if spec.distributed is not None:
            report = self._distributed_stage(spec, config, ctx, input_path, kept_path, dropped_path)
            return {**report, "executed_on": "ray"}
        # No distributed form (split, mix, label): the whole-table step runs here, as the local engine runs it.
        report = LocalEngine().execute(spec, config, ctx, input_path, kept_path, dropped_path)
        return {**report, "executed_on": "driver"}

    def close(self) -> None:
        if self._started_here and ray.is_initialized():
            ray.shutdown()

    # -----------------------------------------------------------------------------------------------

    def _read(self, input_path: Path) -> "ray.data.Dataset":
        # partitioning=None: a run dir named like `key=value` must not turn into a column.
        dataset = ray.data.read_parquet(str(Path(input_path).resolve()), partitioning=None)
        return dataset.repartition(target_num_rows_per_block=self.batch_rows)  # streaming, order kept

    def _row_stage(self, spec, config, ctx, input_path, kept_path, dropped_path) -> dict[str, Any]:
        schema = pl.scan_parquet(input_path, glob=False).collect_schema()
        fields = _context_fields(ctx)
        with _parts_folder(ctx.stage_dir) as parts:
            transform_batch = _TransformBatch(spec.transform, config, fields, dict(schema), str(parts))
            kept_parts, dropped_parts = self._transform_batches(transform_batch, input_path, ctx)
            empty = None
            if not kept_parts or not dropped_parts:
                # A side no batch wrote still needs its columns: the stage's answer for no rows.
                empty = spec.transform(pl.DataFrame(schema=schema), config, StageContext(**fields))
            # Through the local engine's writer: the same bytes as a local run, whatever the batches.
            with atomic_path(kept_path, suffix=".parquet") as kept_tmp, atomic_path(dropped_path, suffix=".parquet") as dropped_tmp:
                _append_parts(kept_tmp, parts, kept_parts, empty.kept if empty is not None else None, dict(ctx.input_schema or schema))
                _append_parts(dropped_tmp, parts, dropped_parts, empty.dropped if empty is not None else None, empty_dropped_schema())
        if spec.summarize is None:
            return {}
        return dict(
            spec.summarize(pl.scan_parquet(kept_path, glob=False), pl.scan_parquet(dropped_path, glob=False), config, ctx)
        )

    def _transform_batches(self, transform_batch, input_path: Path, ctx: StageContext) -> tuple[list[str], list[str]]:
        """Run the transform over every batch on the cluster; the parts' names come back in input order."""
        total = pl.scan_parquet(input_path, glob=False).select(pl.len()).collect().item()
        results = self._read(input_path).map_batches(transform_batch, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        kept_parts, dropped_parts, done = [], [], 0
        with ctx.phase("transform", total=total, unit="rows") as phase:
            for written in _ordered_results(results):
                for error_class, message in zip(written["error_class"], written["error"]):
                    if error_class is not None:
                        _raise_carried(error_class, message)
                kept_parts += [name for name in written["kept_file"] if name]
                dropped_parts += [name for name in written["dropped_file"] if name]
                rows = sum(written["rows_in"])
                done += rows
                phase.advance(rows)
        if done != total:
            raise AssertionError(f"stage {ctx.name!r} on Ray read {done} of {total} input rows")
        return kept_parts, dropped_parts

    def _distributed_stage(self, spec, config, ctx, input_path, kept_path, dropped_path) -> dict[str, Any]:
        kept_ds, dropped_ds, report = spec.distributed(self._read(input_path), config, ctx)
        with _parts_folder(ctx.stage_dir) as parts:
            kept_names, kept_empty = self._write_dataset(kept_ds, parts, ctx, "writing kept rows")
            dropped_names, dropped_empty = [], None
            if dropped_ds is not None:
                dropped_names, dropped_empty = self._write_dataset(dropped_ds, parts, ctx, "writing dropped rows")
            # Appended part by part as the local engine writes (fixed row groups, one part in memory): the
            # same bytes whichever engine ran the stage.
            with atomic_path(kept_path, suffix=".parquet") as kept_tmp, atomic_path(dropped_path, suffix=".parquet") as dropped_tmp:
                _append_parts(kept_tmp, parts, kept_names, kept_empty, dict(ctx.input_schema or {}))
                _append_parts(dropped_tmp, parts, dropped_names, dropped_empty, empty_dropped_schema())
        return dict(report)

    def _write_dataset(self, dataset, parts: Path, ctx: StageContext, phase_name: str) -> tuple[list[str], pl.DataFrame | None]:
        """The dataset's rows as part files in order: (their names, or the dataset's columns for no rows)."""
        names = []
        with ctx.phase(phase_name) as phase:
            written = dataset.map_batches(_WriteBatch(str(parts)), batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            for batch in _ordered_results(written):
                names += [name for name in batch["file"] if name]
                phase.advance(sum(batch["rows"]))
        return names, None if names else pl.from_arrow(dataset.schema().base_schema.empty_table())


# ---------------------------------------------------------------------------------------------------
# Connecting


def _connect(address: str | None, num_cpus: int | None) -> None:
    """`ray.init`, quiet, with failures as one-line errors that never show credentials in the address."""
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        # A local cluster's workers import the stages (and plugin modules) from the driver's path.
        path = os.pathsep.join(entry for entry in sys.path if entry)
        options.update(num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        options.update(address=address)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"at {redact(address)}" if address else "(local)"
        first_line = redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        hint = "; start one with `ray start --head`" if address == "auto" else ""
        raise ExternalServiceError(f"cannot connect to the Ray cluster {where}: {first_line}{hint}") from None


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes (ray.init retries an unreachable GCS for a long time)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rsplit("@", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {redact(address)!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ExternalServiceError(
            f"Ray cluster at {redact(address)} is not reachable ({reason}); is `ray start --head` running there?"
        ) from None


def _quiet_ray_data() -> None:
    """Ordered execution (outputs keep the input's row order) and no Ray Data chatter on our console."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------
# Worker side: callables Ray ships to the workers (plain classes: picklable, no driver state).


def _context_fields(ctx: StageContext) -> dict[str, Any]:
    """What a worker needs of the stage context: its plain fields, not the driver's callbacks (the live
    display cannot travel) nor its private state (a per-run cache, a lock)."""
    skip = {"progress", "phase_progress"}
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.init and f.name not in skip and not f.name.startswith("_")}


_WORKER_CONTEXTS: dict[str, StageContext] = {}


def _context_on_worker(token: str, fields: dict[str, Any]) -> StageContext:
    """One context per stage run in each worker process, so what a transform caches in it (an eval set, a
    tokenizer) is built once per worker, not once per batch."""
    ctx = _WORKER_CONTEXTS.get(token)
    if ctx is None:
        _WORKER_CONTEXTS.clear()  # stages run one after another: the previous stage's cache can go
        ctx = _WORKER_CONTEXTS[token] = StageContext(**fields)
    return ctx


def _write_part(frame: pl.DataFrame | None, parts: str, side: str) -> str | None:
    if frame is None or frame.height == 0:
        return None
    name = f"{uuid.uuid4().hex}.{side}.parquet"
    frame.write_parquet(Path(parts) / name, compression="zstd")
    return name


class _TransformBatch:
    """One batch: Arrow → Polars (the input's exact dtypes) → the stage's transform → two Parquet parts."""

    def __init__(self, transform, config, ctx_fields: dict, schema: dict, parts: str):
        self.transform, self.config, self.ctx_fields, self.schema, self.parts = transform, config, ctx_fields, schema, parts
        self.token = uuid.uuid4().hex  # this stage run

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = pl.from_arrow(table)
        if batch.schema != self.schema:
            batch = batch.cast(self.schema)
        try:
            output = self.transform(batch, self.config, _context_on_worker(self.token, self.ctx_fields))
        except CurateError as error:
            # Carried back as data: Ray would wrap it in a traceback that loses the error itself.
            return _batch_result(None, None, batch.height, error)
        return _batch_result(_write_part(output.kept, self.parts, "kept"), _write_part(output.dropped, self.parts, "dropped"), batch.height)


def _batch_result(kept_file: str | None, dropped_file: str | None, rows_in: int, error: CurateError | None = None) -> pa.Table:
    error_class = f"{type(error).__module__}:{type(error).__qualname__}" if error is not None else None
    return pa.table(
        {
            "kept_file": pa.array([kept_file], pa.string()),
            "dropped_file": pa.array([dropped_file], pa.string()),
            "rows_in": pa.array([rows_in], pa.int64()),
            "error_class": pa.array([error_class], pa.string()),
            "error": pa.array([str(error) if error is not None else None], pa.string()),
        }
    )


def _raise_carried(error_class: str, message: str) -> None:
    """The stage's own error, raised again on the driver as the class it was (a CurateError)."""
    import importlib

    module_name, _, qualname = error_class.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        cls = CurateError
    raise (cls if isinstance(cls, type) and issubclass(cls, CurateError) else CurateError)(message)


class _WriteBatch:
    """One batch of a distributed stage's output, written as a Parquet part."""

    def __init__(self, parts: str):
        self.parts = parts

    def __call__(self, table: pa.Table) -> pa.Table:
        name = _write_part(pl.from_arrow(table), self.parts, "rows")
        return pa.table({"file": pa.array([name], pa.string()), "rows": pa.array([table.num_rows], pa.int64())})


# ---------------------------------------------------------------------------------------------------
# Driver side


def _ordered_results(dataset) -> Iterator[dict[str, list]]:
    """The small per-batch results, in input order (ordered execution)."""
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        yield batch.to_pydict()


@contextmanager
def _parts_folder(stage_dir: Path) -> Iterator[Path]:
    """A temp folder in the stage dir for the workers' parts, removed afterwards (success or not)."""
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=PARTS_PREFIX, suffix=".tmp", dir=stage_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _visible(parts: Path, names: list[str]) -> list[Path]:
    paths = [parts / name for name in names]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing is not None:
        raise RunStateError(
            f"{missing}: a part a Ray worker wrote is not visible to the driver; the run directory must be "
            "on a filesystem every node of the cluster shares"
        )
    return paths


def _append_parts(target: Path, parts: Path, names: list[str], empty: pl.DataFrame | None, fallback_schema: dict) -> None:
    """The parts, in order, into one file as the local engine writes a row stage's output (fixed row
    groups); with no parts, the stage's columns for no rows (or the fallback, as the local engine)."""
    appender = ParquetAppender(target)
    for path in _visible(parts, names):
        appender.append(pl.read_parquet(path))  # one batch in memory at a time
    if not names and empty is not None:
        appender.append(empty)
    appender.close(fallback_schema=fallback_schema)


