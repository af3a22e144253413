"""Near-duplicate pairs among many short texts, out of core: `verify.similar_pairs` for a Parquet file of
texts that need not fit in memory (the split's distinct prompts).

The same steps and settings as `similar_pairs` (character 5-gram shingle sets, MinHash signatures, LSH
banding for a candidate threshold 0.1 under the threshold, exact Jaccard of the candidates), run as the
dedup stage runs them out of core (`stream`): the texts are read in batches of `batch_rows`; their
shingle sets go to a raw file (`stream.DiskSets`) and their band hashes to one Parquet file per band;
candidates are found one band at a time and merged into sorted unique pairs; verification runs in
steps of about `step_values` shingle hashes, each step reading the sets it needs with plain reads.
In memory: the candidate pairs (16 B each), two 64-bit codes per text for the number-variant rule, the
sets' offsets (8 B per text) and one batch or step. Signatures are not kept: verification is exact,
so they serve the banding only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate.dedup.banding import band_hashes, candidate_pairs, lsh_params, sorted_unique
from curate.dedup.pipeline import silent_phase
from curate.dedup.settings import MinHashSettings
from curate.dedup.signatures import minhash_signatures
from curate.dedup.stream import SHINGLE_CHUNK_CHARS, DiskSets
from curate.dedup.text import ShingleSets, hash_code, key_hash, number_masked, numbers_in, shingle_sets
from curate.dedup.verify import verified_jaccard

BATCH_ROWS = 2_000  # texts sketched at once; larger batches measured no faster here, and heavier
STEP_VALUES = 4_000_000  # shingle hashes read per verification step (16 MB; the step's temporaries ~5x)
_BAND_SCHEMA = pa.schema([("node", pa.uint32()), ("band_hash", pa.uint64())])


def near_duplicate_pairs(
    texts_path: Path,
    column: str,
    threshold: float,
    work: Path,
    settings: MinHashSettings = MinHashSettings(),
    max_bucket_pairs: int = 64,
    distinct_number_variants: bool = True,
    batch_rows: int = BATCH_ROWS,
    step_values: int = STEP_VALUES,
    phase=silent_phase,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions `(left < right)`, sorted, of the already simplified texts in `column` of the Parquet file
    `texts_path` whose shingle sets have an exact Jaccard of at least `threshold`: exactly
    `similar_pairs(texts, threshold, settings, max_bucket_pairs)`. With `distinct_number_variants`, pairs
    of texts that differ only in their numbers (`text.number_masked`) are left out, as the dedup stage
    does unless `merge_number_variants`. `work` is an empty folder of the caller's; files are written
    into it and left for the caller to remove."""
    bands, rows = lsh_params(round(max(0.05, threshold - 0.1), 6), settings.num_perm, 0.2, 0.8)
    sets, number_codes = _sketch(texts_path, column, work, settings, bands, rows, batch_rows, phase)
    left, right = _candidates(work, max_bucket_pairs)
    return _verified(sets, number_codes, left, right, threshold, distinct_number_variants, step_values, phase)


def _sketch(texts_path, column, work, settings, bands, rows, batch_rows, phase) -> tuple[DiskSets, np.ndarray]:
    """One pass over the texts: shingle sets to `sets.u32`, band hashes to `bands/NNNN.parquet`; returns
    the sets and each text's `(number mask code, numbers code)`."""
    source = pq.ParquetFile(texts_path, pre_buffer=False)  # the default caches every chunk read (engines/local.py)
    sets = DiskSets(work / "sets.u32")
    (work / "bands").mkdir()
    writers = [pq.ParquetWriter(work / "bands" / f"{band:04d}.parquet", _BAND_SCHEMA) for band in range(bands)]
    codes, offset = [], 0
    try:
        with phase("prompt signatures", total=source.metadata.num_rows, unit="rows") as progress:
            for record_batch in source.iter_batches(batch_size=batch_rows, columns=[column]):
                texts = pl.Series(record_batch.column(0)).cast(pl.String)
                batch_sets = shingle_sets(texts, settings, chunk_tokens=SHINGLE_CHUNK_CHARS)
                sets.append(batch_sets)
                has = np.flatnonzero(batch_sets.sizes > 0)
                if len(has):
                    signatures = minhash_signatures(batch_sets.values, batch_sets.sizes, settings.num_perm, settings.seed)
                    hashes = band_hashes(signatures[has], bands, rows)
                    nodes = pa.array((has + offset).astype(np.uint32))
                    for band, writer in enumerate(writers):
                        writer.write_table(pa.table({"node": nodes, "band_hash": pa.array(hashes[:, band])}, schema=_BAND_SCHEMA))
                codes.append(_number_codes(texts))
                offset += len(texts)
                progress.advance(len(texts))
    finally:
        for writer in writers:
            writer.close()
        sets.close()
    return sets, np.concatenate(codes) if codes else np.empty((0, 2), np.uint64)


def _number_codes(texts: pl.Series) -> np.ndarray:
    """`(n, 2)` uint64: 64 bits of the sha256 of each text's number mask and of its numbers, so that
    `text.number_variant` can be decided on codes instead of the texts."""
    text = pl.lit(texts)
    frame = pl.select(key_hash(number_masked(text)).alias("masked"), key_hash(numbers_in(text)).alias("numbers"))
    return np.stack([hash_code(frame["masked"]), hash_code(frame["numbers"])], axis=1)


def _candidates(work: Path, max_bucket_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs one band at a time (the same buckets as one sort over every band's keys: the band
    number is mixed into its hash), merged as they come so memory holds the unique pairs only. As
    `stream.candidates_by_band`, without its survivor filter (every text takes part)."""
    merged = np.empty(0, np.uint64)
    for path in sorted((work / "bands").glob("*.parquet")):
        left, right = candidate_pairs(pl.read_parquet(path, glob=False), max_bucket_pairs)
        merged = sorted_unique(np.concatenate([merged, (left.astype(np.uint64) << np.uint64(32)) | right.astype(np.uint64)]))
    return (merged >> np.uint64(32)).astype(np.int64), (merged & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _verified(sets: DiskSets, number_codes, left, right, threshold, distinct_number_variants, step_values, phase):
    """The candidates whose exact Jaccard reaches the threshold, in steps of pairs whose two sets hold
    about `step_values` hashes together; each step's sets are read from disk (`_read_sets`)."""
    keep = np.zeros(len(left), dtype=bool)
    sizes = np.diff(sets.offsets)
    cuts = _cuts(np.cumsum(sizes[left] + sizes[right]), step_values)
    with phase("verifying prompt pairs", total=len(left), unit="pairs") as progress:
        for start, stop in zip(cuts[:-1], cuts[1:]):
            a, b = left[start:stop], right[start:stop]
            nodes = sorted_unique(np.concatenate([a, b]))
            step_sets = _read_sets(sets, nodes, step_values)
            similar = verified_jaccard(step_sets, np.searchsorted(nodes, a), np.searchsorted(nodes, b)) >= threshold
            if distinct_number_variants:
                same_mask = number_codes[a, 0] == number_codes[b, 0]
                similar &= ~(same_mask & (number_codes[a, 1] != number_codes[b, 1]))
            keep[start:stop] = similar
            progress.advance(len(a))
    return left[keep], right[keep]


def _read_sets(sets: DiskSets, nodes: np.ndarray, block_values: int) -> ShingleSets:
    """The sets of `nodes` (sorted, unique), read with plain reads of the blocks that hold them (whole
    sets, about `block_values` hashes a block). Not through a memory map: the kernel maps page-cache
    pages in large folios (up to MBs per fault here), so random reads through a map make the resident
    size approach the file's whatever the step."""
    offsets = sets.offsets
    bounds = _cuts(offsets[1:], block_values)  # node blocks of whole sets
    parts = []
    for first, last in zip(bounds[:-1], bounds[1:]):
        wanted = nodes[(nodes >= first) & (nodes < last)]
        if not len(wanted):
            continue
        count = int(offsets[last] - offsets[first])
        values = np.fromfile(sets.path, dtype=np.uint32, count=count, offset=int(offsets[first]) * 4)
        parts.append(ShingleSets(values=values, offsets=offsets[first : last + 1] - offsets[first]).take(wanted - first))
    return ShingleSets.concat(parts)


def _cuts(cumulative: np.ndarray, size: int) -> np.ndarray:
    """Boundaries `[0, ..., len]` cutting items with these cumulative sizes into runs of about `size`
    (an item larger than `size` is a run of its own; no run is empty)."""
    total = int(cumulative[-1]) if len(cumulative) else 0
    inner = np.searchsorted(cumulative, np.arange(size, total, size), side="right")
    return np.unique(np.r_[0, inner, len(cumulative)]).astype(np.int64)
