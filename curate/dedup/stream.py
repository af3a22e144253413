"""The dedup stage out of core: bounded batches in, per-row sketches on disk, in memory only the ids
(one Arrow string column, ~45 B a row), integer codes and decision arrays (~100 B a row) and the
candidate pairs (8 B each while they are found, 24 B while verified).

Work files live in a fresh folder `work.*` under the stage's folder (a unique name, so nothing we did
not create is ever touched), removed when the stage ends, failed or not.

1. **Features** (row-local: key texts, key hashes, keep key) are computed per slice of `BATCH_ROWS`
   input rows (a Parquet scan reads only that slice's row groups); the input is never collected.
2. **Sketches** of each slice: hashed shingle sets (CSR values appended to a raw
   uint32 file, offsets kept in memory), MinHash signatures (appended to a raw `(n, num_perm)` uint32
   file), band keys (raw `(node, band_hash)` records, one file per band), the per-row columns that
   stay in memory (`rows.parquet`: id, keep key, key hashes as integer codes) and the key hash strings
   (`hashes.parquet`, read back only for the index). Raw files rather than Parquet for sets and
   signatures because verification reads them back *by row id*: a fresh `np.memmap` per step reads only
   the pages of the rows it needs, and dropping it releases them.
3. **Exact duplicates** from the key codes (two uint64 per row).
4. **Candidates**, one band at a time (a sort of that band's `(band_hash, row)`), each band's pairs
   merged into the sorted unique pairs so far; buckets over `max_bucket_pairs` are capped (see
   `banding.candidate_pairs`).
5. **Verification** in steps of `VERIFY_PAIRS` pairs over the memory-mapped sets and signatures.
6. **Components and keep decisions** over integer row ids (`clusters`), exactly as in memory: node =
   row id keeps the node order of the in-memory path (survivors in row order), so every decision,
   every star head and every tie is the same.
7. **Index** (`save_index`): written batch by batch from the files above.

A run that loads a saved index (`index_path`) or uses Redis holds that index in memory anyway and
takes the in-memory path (`pipeline.deduplicate_features`, features collected): not out of core.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.dedup.banding import BucketGuard, band_hashes, candidate_pairs
from curate.dedup.config import DedupConfig
from curate.dedup.index import INDEX_FORMAT, INDEX_VERSION, MinHashIndex, empty_index_records
from curate.dedup.pipeline import (
    HASH_COLUMNS,
    PART_COLUMNS,
    Decisions,
    DedupOutcome,
    NearGraph,
    RowFeatures,
    silent_phase,
    deduplicate_features,
    features_of,
    finish_clusters,
    lsh_settings_report,
    mark_exact_duplicates,
    mark_near_duplicates,
    outcome_report,
    verify_candidates,
    code_columns,
)
from curate.dedup.signatures import estimated_jaccard, minhash_signatures
from curate.dedup.text import PART_NAMES, ShingleSets, key_text, shingle_sets
from curate.dedup.verify import NodeFeatures
from curate.parallel import ordered_map

BATCH_ROWS = 1_000  # rows per slice: their texts, exploded shingles and sketches are the phase's working set
SKETCH_THREADS = max(1, min(4, os.cpu_count() or 1))  # slices sketched at once (one more waits to be written)
VERIFY_PAIRS = 2_000  # pairs per verification step: their sets (both sides) and index ranges are its working set
READ_BLOCK_ROWS = 16_384  # rows of a work file read at once by `read_rows`
GATHER_PAIRS = 50_000  # above this many pairs `DiskNodes.estimated` reads the rows it needs instead of mapping the file
BAND_RECORD = np.dtype([("node", "<u4"), ("band_hash", "<u8")])  # one row's key in one band's work file
SHINGLE_CHUNK_CHARS = 100_000  # characters shingled at once: their exploded n-grams take ~150 B each (~15 MB)
ROW_COLUMNS = ["__row", "id", "__keep"]  # + code_columns() + multipart: what stays in memory (`RowFeatures`)


class DiskSets:
    """CSR shingle sets whose values live in a raw uint32 file: appended batch by batch, read back
    through a fresh memory map (`open`), so only the pages of the rows looked at are ever resident."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._sizes: list[np.ndarray] = []

    def append(self, sets: ShingleSets) -> None:
        self._file.write(np.ascontiguousarray(sets.values, dtype=np.uint32).tobytes())
        self._sizes.append(sets.sizes.astype(np.int64))

    def close(self) -> None:
        self._file.close()
        sizes = np.concatenate(self._sizes) if self._sizes else np.empty(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def open(self) -> ShingleSets:
        total = int(self.offsets[-1])
        values = np.memmap(self.path, dtype=np.uint32, mode="r", shape=(total,)) if total else np.empty(0, np.uint32)
        return ShingleSets(values=values, offsets=self.offsets)


@dataclass
class SketchFiles:
    """What the batch pass wrote (under the work folder) and the small per-row columns it kept."""

    rows: int
    rows_path: Path  # ROW_COLUMNS, code_columns(), multipart
    hashes_path: Path  # HASH_COLUMNS (strings), in row groups of BATCH_ROWS: read back for the index only
    sets: DiskSets
    part_sets: list[DiskSets]
    signatures_path: Path
    bands_dir: Path
    num_perm: int

    def signatures(self) -> np.ndarray:
        n = self.rows
        if n == 0:
            return np.empty((0, self.num_perm), np.uint32)
        return np.memmap(self.signatures_path, dtype=np.uint32, mode="r", shape=(n, self.num_perm))


class DiskNodes:
    """`NodeFeatures` over the sketch files, mapped afresh for every call (pages released after)."""

    def __init__(self, files: SketchFiles, rows: RowFeatures, verify: bool):
        self.files, self.verify = files, verify
        self.multipart = rows.multipart
        self.number_code = rows.number_code
        self.digits_code = rows.digits_code

    def _open(self) -> NodeFeatures:
        return NodeFeatures(
            signatures=self.files.signatures(),
            sets=self.files.sets.open() if self.verify else None,
            part_sets=[part.open() for part in self.files.part_sets],
            multipart=self.multipart,
            number_code=self.number_code,
            digits_code=self.digits_code,
        )

    def estimated(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if len(a) < GATHER_PAIRS:  # verification's steps: a few thousand rows of the mapped file
            return self._open().estimated(a, b)
        # Clustering asks for every member at once. Scattered reads of a mapped file map far more than the
        # rows they touch (the kernel maps pages around each fault: the whole 512 MB signature file at 1M
        # rows), so the rows needed are read in sequential blocks into one compact array instead.
        needed = np.unique(np.concatenate([a, b]))
        compact = read_rows(self.files.signatures_path, self.files.rows, self.files.num_perm, needed)
        return estimated_jaccard(compact, np.searchsorted(needed, a), np.searchsorted(needed, b))

    def similarity(self, a, b, verify: bool, merge_number_variants: bool) -> np.ndarray:
        return self._open().similarity(a, b, verify, merge_number_variants)


def read_rows(path: Path, rows: int, width: int, wanted: np.ndarray) -> np.ndarray:
    """Rows `wanted` (sorted, unique) of a row-major uint32 file of `rows` x `width`, read in sequential
    blocks of READ_BLOCK_ROWS rows (8 MB at 128 slots): memory is the rows kept plus one block."""
    block_rows = READ_BLOCK_ROWS
    out = np.empty((len(wanted), width), dtype=np.uint32)
    for start in range(0, rows, block_rows):
        lo, hi = np.searchsorted(wanted, [start, start + block_rows])
        if lo == hi:
            continue
        count = min(rows, start + block_rows) - start
        block = np.fromfile(path, dtype=np.uint32, count=count * width, offset=start * width * 4).reshape(count, width)
        out[lo:hi] = block[wanted[lo:hi] - start]
    return out


def release_arrow_memory() -> None:
    """Hand Arrow's freed pages back to the system between phases: its pool (mimalloc) otherwise keeps
    them, and the next phase's peak adds to them. Between phases only: called per batch, the pages
    given back are faulted in again at once (system time)."""
    pa.default_memory_pool().release_unused()


# --------------------------------------------------------------------------------------------------
# The batch pass


def _batch_sets(batch: pl.DataFrame, config: DedupConfig) -> tuple[ShingleSets, list[ShingleSets]]:
    settings = config.settings()
    sets = shingle_sets(batch["text"], settings, chunk_tokens=SHINGLE_CHUNK_CHARS)
    multipart = batch[PART_COLUMNS[1]].is_not_null()
    if multipart.any():
        parts = batch.select(pl.when(multipart).then(pl.col(column)).otherwise(pl.lit("")) for column in PART_COLUMNS)
        part_sets = [shingle_sets(parts[column], settings, chunk_tokens=SHINGLE_CHUNK_CHARS) for column in PART_COLUMNS]
    else:
        empty = ShingleSets(values=np.empty(0, np.uint32), offsets=np.zeros(batch.height + 1, np.int64))
        part_sets = [empty] * len(PART_NAMES)
    return sets, part_sets


@dataclass
class _BatchSketch:
    """One slice's sketches, computed on a worker thread, written in order by the caller."""

    height: int
    sets: ShingleSets
    part_sets: list[ShingleSets]
    signatures: np.ndarray
    band_nodes: np.ndarray  # rows with a non-empty set
    band_hashes: np.ndarray | None  # (len(band_nodes), bands)
    rows_table: pa.Table
    hashes_table: pa.Table


def _sketch_slice(frame: pl.LazyFrame, offset: int, config: DedupConfig) -> _BatchSketch:
    """Features, shingle sets, signatures and band hashes of the `BATCH_ROWS` rows from `offset`: pure
    (nothing written), so two slices can be computed at once; Polars and numpy release the GIL."""
    settings = config.settings()
    bands, band_rows = config.band_params()
    rows = frame.slice(offset, BATCH_ROWS).with_row_index("__row", offset=offset)
    batch = features_of(rows, config).collect()
    batch_sets, batch_parts = _batch_sets(batch, config)
    # One thread per slice: the slices themselves are what runs in parallel.
    signatures = minhash_signatures(batch_sets.values, batch_sets.sizes, settings.num_perm, settings.seed, threads=1)
    has = np.flatnonzero(batch_sets.sizes > 0)
    hashes = band_hashes(signatures[has], bands, band_rows) if len(has) else None
    return _BatchSketch(
        height=batch.height, sets=batch_sets, part_sets=batch_parts, signatures=np.ascontiguousarray(signatures),
        band_nodes=batch["__row"].to_numpy()[has], band_hashes=hashes,
        rows_table=batch.select(*ROW_COLUMNS, *code_columns(), pl.col(PART_COLUMNS[1]).is_not_null().alias("multipart")).to_arrow(),
        hashes_table=batch.select(HASH_COLUMNS).to_arrow(),
    )


def _sketches_in_order(frame: pl.LazyFrame, total: int, config: DedupConfig):
    """Each slice's `_BatchSketch`, in input order, computed SKETCH_THREADS slices at a time (the batch
    pass was one core's work: its Python glue between Polars and numpy calls held the other idle)."""
    offsets = range(0, total, BATCH_ROWS)
    return ordered_map(lambda offset: _sketch_slice(frame, offset, config), offsets, SKETCH_THREADS, "curate-dedup-sketch")


def sketch_batches(frame: pl.LazyFrame, total: int, config: DedupConfig, work: Path, phase) -> SketchFiles:
    """One pass over the input in slices of `BATCH_ROWS` rows (a Parquet scan reads only the row groups
    of each slice): features, then sets, signatures and band hashes to disk, in input order."""
    settings = config.settings()
    bands, _ = config.band_params()
    sets = DiskSets(work / "sets.u32")
    part_sets = [DiskSets(work / f"sets_{name}.u32") for name in PART_NAMES]
    bands_dir = work / "bands"
    bands_dir.mkdir()
    # Raw `(node, band_hash)` records appended per band: a Parquet writer per band held ~1 MB of
    # buffers and encoders each, and these files are only ever read back whole, one band at a time.
    band_files = [open(bands_dir / f"{band:04d}.bin", "wb") for band in range(bands)]
    # The per-row columns go to disk as well and are read back once at the end: kept in memory batch by
    # batch, these long-lived allocations would sit between the batches' transient ones and pin their
    # pages (RSS that never goes back).
    row_writer = hash_writer = None
    with open(work / "signatures.u32", "wb") as signature_file, phase("MinHash signatures", total=total, unit="rows") as progress:
        for sketch in _sketches_in_order(frame, total, config):
            sets.append(sketch.sets)
            for disk, part in zip(part_sets, sketch.part_sets):
                disk.append(part)
            signature_file.write(sketch.signatures.tobytes())
            if sketch.band_hashes is not None:
                records = np.empty(len(sketch.band_nodes), dtype=BAND_RECORD)
                records["node"] = sketch.band_nodes
                for band, band_file in enumerate(band_files):
                    records["band_hash"] = sketch.band_hashes[:, band]
                    band_file.write(records.tobytes())
            row_writer = row_writer or pq.ParquetWriter(work / "rows.parquet", sketch.rows_table.schema)
            row_writer.write_table(sketch.rows_table.cast(row_writer.schema))
            hash_writer = hash_writer or pq.ParquetWriter(work / "hashes.parquet", sketch.hashes_table.schema)
            hash_writer.write_table(sketch.hashes_table.cast(hash_writer.schema))
            progress.advance(sketch.height)
    for writer in (*band_files, *[w for w in (row_writer, hash_writer) if w is not None]):
        writer.close()
    for disk in (sets, *part_sets):
        disk.close()
    return SketchFiles(
        rows=total, rows_path=work / "rows.parquet", hashes_path=work / "hashes.parquet", sets=sets, part_sets=part_sets,
        signatures_path=work / "signatures.u32", bands_dir=bands_dir, num_perm=settings.num_perm,
    )


# --------------------------------------------------------------------------------------------------
# Global steps over integer row ids


def candidates_by_band(files: SketchFiles, survivor: np.ndarray, config: DedupConfig, guard: BucketGuard):
    """Candidate pairs (row ids, left < right), one band at a time: the same buckets as one sort over
    all `(band, band_hash)` keys, in memory of one band. Each band's pairs are merged into the sorted
    unique pairs so far as they come: near duplicates share most bands, so the bands' pairs together
    are several times the unique pairs."""
    merged = np.empty(0, np.uint64)
    for path in sorted(files.bands_dir.glob("*.bin")):
        records = np.fromfile(path, dtype=BAND_RECORD)
        records = records[survivor[records["node"]]]
        band = pl.DataFrame({"node": records["node"], "band_hash": records["band_hash"]})
        del records
        left, right = candidate_pairs(band, config.max_bucket_pairs, guard=guard)
        del band
        keys = (left.astype(np.uint64) << np.uint64(32)) | right.astype(np.uint64)
        del left, right
        # Both runs are sorted: a stable sort (timsort) merges them in linear time.
        merged = np.sort(np.concatenate([merged, keys]), kind="stable")
        merged = merged[np.r_[True, merged[1:] != merged[:-1]]] if len(merged) else merged
    # Row ids fit 32 bits (the band records hold them so): 8 bytes a pair for both ends, not 16.
    return (merged >> np.uint64(32)).astype(np.uint32), (merged & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def find_near_out_of_core(files, rows, decided, config, phase, guard) -> tuple[int, dict]:
    n = len(rows)
    survivor = np.zeros(n, dtype=bool)
    survivor[decided.survivors()] = True
    left, right = candidates_by_band(files, survivor, config, guard)
    release_arrow_memory()
    graph = NearGraph(
        nodes=DiskNodes(files, rows, config.verify),
        priority=rows.priority,
        protected=np.zeros(n, dtype=bool),
        old_count=0,
        survivors=np.arange(n),
    )
    pairs = verify_candidates(graph, left, right, config, phase, chunk=VERIFY_PAIRS)
    with phase("clustering", total=None, unit="pairs"):
        dropped, report, _ = mark_near_duplicates(rows, decided, graph, pairs, config, empty_index_records(config.num_perm))
    report = {"candidate_pairs": int(len(left)), **report, "verify": config.verify}
    if pairs.skipped_by_estimate is not None:
        report["skipped_by_estimate"] = pairs.skipped_by_estimate
    return dropped, report


def save_index_out_of_core(files, rows, decided, config, target: Path, phase) -> dict:
    """The index of this run's kept rows, written batch by batch (same content as `build_index`)."""
    kept = np.flatnonzero(decided.reason == None)  # noqa: E711
    release_arrow_memory()
    batches = (_index_batch(files, rows, decided, kept[start : start + BATCH_ROWS], config.num_perm) for start in range(0, len(kept), BATCH_ROWS))
    return write_index(batches, config, target, phase)


def write_index(record_batches, config: DedupConfig, target: Path, phase) -> dict:
    """Write index records (`empty_index_records` columns, batch by batch, in order) and their band
    table atomically to `target`; returns the report's `index` entry."""
    from curate.atomic import atomic_dir
    from curate.dedup.banding import band_table_from

    settings = config.settings()
    bands, band_rows = config.band_params()
    records_schema = empty_index_records(settings.num_perm).to_arrow().schema
    bands_schema = pa.schema([("node", pa.uint32()), ("band", pa.uint16()), ("band_hash", pa.uint64())])
    written = 0
    with atomic_dir(target) as tmp, phase("writing the index", total=None, unit="rows") as progress:
        with pq.ParquetWriter(tmp / "records.parquet", records_schema, compression="zstd") as records_writer, pq.ParquetWriter(
            tmp / "bands.parquet", bands_schema, compression="zstd"
        ) as bands_writer:
            for records in record_batches:
                if records.height == 0:
                    continue
                signatures = records["signature"].to_numpy().astype(np.uint32).reshape(records.height, settings.num_perm)
                has = records["shingles"].list.len().to_numpy() > 0
                records_writer.write_table(records.to_arrow().cast(records_schema))
                bands_writer.write_table(band_table_from(signatures, has, bands, band_rows, offset=written).to_arrow().cast(bands_schema))
                written += records.height
                progress.advance(records.height)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "settings": settings.as_dict(),
            "bands": bands,
            "rows": band_rows,
            "records": written,
        }
        (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"rows_before": 0, "rows_after": written, "signature_bytes_per_record": settings.num_perm * 4}


def _index_batch(files, rows, decided, chunk, num_perm) -> pl.DataFrame:
    signatures = np.ascontiguousarray(files.signatures()[chunk])
    sets = files.sets.open().take(chunk)
    multipart = pl.Series(rows.multipart[chunk])
    first = int(chunk[0])  # chunk is ascending: read only the row groups it spans
    hashes = pl.scan_parquet(files.hashes_path).slice(first, int(chunk[-1]) - first + 1).collect()[chunk - first]
    return pl.DataFrame(
        {
            "id": rows.ids.gather(chunk),
            "dup_cluster": pl.Series(decided.clusters_of(chunk, rows).tolist(), dtype=pl.String),
            **{column: hashes[column] for column in HASH_COLUMNS},
            "signature": pl.Series(signatures, dtype=pl.Array(pl.UInt32, num_perm)),
            "shingles": sets.to_lists(),
            **{
                f"shingles_{name}": pl.select(pl.when(pl.lit(multipart)).then(pl.lit(part.open().take(chunk).to_lists()))).to_series()
                for name, part in zip(PART_NAMES, files.part_sets)
            },
        }
    )


# --------------------------------------------------------------------------------------------------
# The stage's entry point


def work_folder(stage_dir: Path) -> Path:
    """A fresh folder of our own under the stage's folder (a unique name: never one we did not create)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="work.", dir=stage_dir))


def example_texts_from(frame: pl.LazyFrame, config: DedupConfig):
    settings = config.settings()
    raw = key_text(settings.key, settings.include_system, settings.preference_key)

    def read(chosen: list[int]) -> list[str]:
        # One slice per example (a few rows): a scan decodes only that row's row group, where a filter
        # on the row index would decode the whole input (~1 KB a row in memory at once).
        return [frame.slice(row, 1).select(raw).collect().item() for row in chosen]

    return read


def deduplicate_out_of_core(
    frame: pl.LazyFrame,
    config: DedupConfig,
    stage_dir: Path,
    index: MinHashIndex | None = None,
    progress=lambda message: None,
    phase=silent_phase,
) -> DedupOutcome:
    """`deduplicate` over a LazyFrame (a scan of the stage's input) without collecting it: the same
    decisions and report, with a saved index (if any) written to `stage_dir / "index"` by this call."""
    work = work_folder(stage_dir)
    try:
        examples = example_texts_from(frame, config)
        total = frame.select(pl.len()).collect().item()
        if index is not None or config.redis is not None or total == 0:  # a loaded index is in memory anyway
            features = features_of(frame.with_row_index("__row"), config).collect()
            outcome = deduplicate_features(features, config, index, progress, phase, examples)
            if outcome.index is not None:
                outcome.index.save(stage_dir / "index")
                outcome.index = None
            return outcome
        progress("dedup: signatures")
        files = sketch_batches(frame, total, config, work, phase)
        release_arrow_memory()
        return _decide(files, config, stage_dir, progress, phase, examples)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _decide(files: SketchFiles, config, stage_dir: Path, progress, phase, examples) -> DedupOutcome:
    rows = RowFeatures.read(pl.read_parquet(files.rows_path))
    decided = Decisions.start(len(rows))
    exact_dropped = mark_exact_duplicates(rows, decided, empty_index_records(config.num_perm)) if config.exact else 0
    lsh_report = lsh_settings_report(config)
    guard = BucketGuard()
    near_dropped = 0
    if config.near and len(decided.survivors()):
        progress("dedup: LSH candidates and verification")
        near_dropped, near_report = find_near_out_of_core(files, rows, decided, config, phase, guard)
        lsh_report.update(near_report)
    lsh_report["bucket_guard"] = {"max_bucket_pairs": config.max_bucket_pairs, **guard.as_dict()}
    finish_clusters(rows, decided)
    decisions = decided.frame(pl.int_range(len(rows), dtype=pl.UInt32, eager=True).alias("__row"), rows.ids)
    report = outcome_report(decided, decisions, config, exact_dropped, near_dropped, lsh_report, examples)
    if config.save_index:
        report["index"] = save_index_out_of_core(files, rows, decided, config, stage_dir / "index", phase)
    return DedupOutcome(decisions=decisions, report=report, index=None)
