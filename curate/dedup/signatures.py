"""MinHash signatures in numpy, bit-for-bit datasketch 2.x's default `affine32` scheme (same
`RandomState` permutations, MurmurHash3 fmix32 pre-mix, uint32 arithmetic); tests prove it."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from curate.dedup.settings import MinHashSettings
from curate.dedup.text import ShingleSets

# datasketch 2.x `affine32` constants: MurmurHash3 fmix32 pre-mix, then a*h+b mod 2^32 with a odd.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_MAX_HASH32 = np.uint32(0xFFFFFFFF)
# MurmurHash3 fmix64 constants (band hashes are spread with them).
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33))


@lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's affine32 scheme: the same RandomState draws in the same order."""
    generator = np.random.RandomState(seed)
    a = generator.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = generator.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def fmix32(values: np.ndarray) -> np.ndarray:
    return _fmix(values, _FMIX32)


def fmix64(values: np.ndarray) -> np.ndarray:
    return _fmix(values, _FMIX64)


def _fmix(values: np.ndarray, constants) -> np.ndarray:
    """MurmurHash3's finalizer (shift-xor, multiply, twice, shift-xor) with 32- or 64-bit constants."""
    s1, m1, s2, m2, s3 = constants
    values = values ^ (values >> s1)
    values = values * m1
    values = values ^ (values >> s2)
    values = values * m2
    return values ^ (values >> s3)


def _worker_count() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def minhash_signatures(
    hashes: np.ndarray,
    counts: np.ndarray,
    num_perm: int = 128,
    seed: int = 1,
    threads: int | None = None,
    block_hashes: int = 1 << 16,
) -> np.ndarray:
    """Signatures of many sets at once: `hashes` holds every set's 32-bit shingle hashes back to back,
    `counts[i]` how many belong to set i. Returns uint32 `(len(counts), num_perm)`; an empty set gets
    datasketch's empty signature (all 2^32-1).

    The sets are cut into blocks of about `block_hashes` hashes (whole sets; a block stays in cache);
    per block and permutation one multiply-add over the block and one `np.minimum.reduceat` over its
    sets. Blocks run on threads (numpy releases the GIL); the result does not depend on the thread
    count or block size."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint32)
    counts = np.asarray(counts, dtype=np.int64)
    # Slot-major (num_perm, n) internally; returned transposed (a view), so rows are records and each
    # slot's column is contiguous for banding.
    slots = np.full((num_perm, len(counts)), _MAX_HASH32, dtype=np.uint32)
    nonempty = np.flatnonzero(counts > 0)
    if len(nonempty) == 0:
        return slots.T
    set_counts = counts[nonempty]  # empty sets hold no hashes, so dropping them keeps `hashes` aligned
    ends = np.cumsum(set_counts)
    starts = ends - set_counts
    premixed = fmix32(hashes)
    a, b = permutations(num_perm, seed)
    # Block boundaries (in sets): the first set ending at or after each multiple of block_hashes.
    cuts = np.searchsorted(ends, np.arange(block_hashes, int(ends[-1]) + block_hashes, block_hashes), side="left") + 1
    bounds = np.unique(np.r_[0, np.minimum(cuts, len(set_counts))])
    computed = slots if len(nonempty) == len(counts) else np.empty((num_perm, len(set_counts)), dtype=np.uint32)

    def run(block: int) -> None:
        first, last = int(bounds[block]), int(bounds[block + 1])
        low, high = int(starts[first]), int(ends[last - 1])
        segment = premixed[low:high]
        offsets = starts[first:last] - low
        buffer = np.empty_like(segment)
        for k in range(num_perm):
            np.multiply(segment, a[k], out=buffer)
            np.add(buffer, b[k], out=buffer)
            computed[k, first:last] = np.minimum.reduceat(buffer, offsets)

    blocks = range(len(bounds) - 1)
    threads = threads or _worker_count()
    if threads == 1 or len(blocks) == 1:
        for block in blocks:
            run(block)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, blocks))
    if computed is not slots:
        slots[:, nonempty] = computed
    return slots.T




def signatures_of(sets: ShingleSets, settings: MinHashSettings) -> np.ndarray:
    return minhash_signatures(sets.values, sets.sizes, settings.num_perm, settings.seed)

def estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray, chunk: int = 32_768) -> np.ndarray:
    """Fraction of equal signature slots per pair (datasketch's `MinHash.jaccard`). Counted per chunk of
    pairs: the two gathered slot blocks are num_perm x chunk each (16 MB at 128 slots), and the count
    needs no float copy of the comparison (a bool array's mean would make one, 8 bytes a slot)."""
    slots = signatures.T  # (num_perm, n); contiguous for signatures from `minhash_signatures`
    out = np.empty(len(left), dtype=np.float64)
    for start in range(0, len(left), chunk):
        stop = start + chunk
        equal = np.count_nonzero(slots[:, left[start:stop]] == slots[:, right[start:stop]], axis=0)
        out[start:stop] = equal / slots.shape[0]
    return out


