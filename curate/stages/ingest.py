"""The `ingest` stage: raw input files into canonical records (`ingest/data.parquet`) and the raw rows
that could not become records (`quarantine.parquet`). A source stage: the runner starts every run with
it; its config is the pipeline's `ingest:` block. Files are read in bounded chunks (`chunk_rows`), each
chunk's records and quarantine go to part files, and the parts are streamed into the two outputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from curate.atomic import disk_full_as_error, write_parquet
from curate.errors import InputFileError
from curate.ingest import FileReport, IngestOptions, InputSpec, ingest_file
from curate.stage import StageContext, register_source_stage
from schemas import CANONICAL_SCHEMA, QUARANTINE_SCHEMA

# Part files live only until the outputs are written (zstd): lz4 writes in half the time for ~2x the bytes.
PART_COMPRESSION = "lz4"


def stored_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@register_source_stage("ingest", config=IngestOptions, version="1")
def ingest_stage(
    files: list[tuple[Path, str, InputSpec]],
    config: IngestOptions,
    ctx: StageContext,
    records_path: Path,
    quarantine_path: Path,
    expected_sha256: list[str],
) -> list[FileReport]:
    """Read raw files (JSONL, JSON, CSV, Parquet; plain, .gz, .zst) into canonical records; quarantine the rest."""
    sizes = [stored_size(path) for path, _, _ in files]
    reports: list[FileReport] = []
    with (
        ctx.phase("reading inputs", total=sum(sizes), unit="bytes") as reading,
        tempfile.TemporaryDirectory(prefix=".ingest-parts-", dir=ctx.stage_dir) as parts_dir,
        disk_full_as_error(ctx.stage_dir),
    ):
        parts = Path(parts_dir)
        record_parts, quarantine_parts = [], []
        for file_index, (path, display, spec) in enumerate(files):
            read_before = reading.done
            last_report = None
            for chunk_index, (batch, report) in enumerate(ingest_file(path, display, spec, config)):
                last_report = report
                if batch.records.height:
                    record_parts.append(parts / f"records-{file_index:05d}-{chunk_index:06d}.parquet")
                    batch.records.write_parquet(record_parts[-1], compression=PART_COMPRESSION)
                if batch.quarantine.height:
                    quarantine_parts.append(parts / f"quarantine-{file_index:05d}-{chunk_index:06d}.parquet")
                    batch.quarantine.write_parquet(quarantine_parts[-1], compression=PART_COMPRESSION)
                ctx.progress(f"{display}: {report.rows:,} rows")
                reading.advance(min(report.bytes_read, sizes[file_index]) - (reading.done - read_before))
            reading.advance(sizes[file_index] - (reading.done - read_before))  # typed sources count at the end
            if last_report.sha256 != expected_sha256[file_index]:
                # The fingerprint and the rows just read must describe the same bytes.
                raise InputFileError(f"{display}: changed while being read; rerun")
            reports.append(last_report)
        records = (
            # diagonal: parts from canonical Parquet inputs may carry score columns the others lack.
            pl.concat([pl.scan_parquet(part, glob=False) for part in record_parts], how="diagonal_relaxed")
            if record_parts
            else pl.LazyFrame(schema=CANONICAL_SCHEMA)
        )
        quarantine = pl.scan_parquet(quarantine_parts, glob=False) if quarantine_parts else pl.LazyFrame(schema=QUARANTINE_SCHEMA)
        ctx.progress("writing records")
        write_parquet(records, records_path)
        write_parquet(quarantine, quarantine_path)
    return reports
