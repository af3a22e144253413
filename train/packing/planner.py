"""Host-side bin packing: which sample goes to which row and column.

Everything here is numpy on the host, so a training step never waits on the device to learn its
`cu_seqlens` or `max_seqlen`.

The core is an exact best-fit-decreasing (BFD) that never loops per sample in Python. Two facts make
that possible:

* Items are processed largest first, so all items of one size `s` form a consecutive run.
* When an item of size `s` goes into the fullest bin that fits (remaining capacity `c`, the smallest
  `c >= s`), that bin's new capacity `c - s` is, if still `>= s`, the new smallest fitting capacity. So
  the bin keeps taking items of size `s` until it holds `c // s` of them.

So per distinct size the work is "walk the open bins in increasing remaining capacity, each takes
`c // s` items", done on a capacity histogram with one pool (a Python list of bin ids) per capacity.
Python-level work is O(distinct sizes x touched capacities); element moves run inside list/numpy C code.
Bins with the same remaining capacity are interchangeable, so the result is a true BFD; ties are broken
last-in-first-out, which is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OVERFLOW_MODES = ("truncate", "reject")


class PackingError(ValueError):
    """A packing input users can get wrong (bad lengths, bad config)."""


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pack `sizes` (ints in 1..capacity) into bins of `capacity` with best-fit-decreasing.

    Returns `(bin_of_item, rank_of_item, num_bins)`: the bin of each item, the item's placement rank
    (0 = placed first; larger items first, ties by index) and the bin count. Bin ids are in opening order.
    """
    order, bin_sorted, num_bins = _bfd(np.asarray(sizes), capacity)
    n = order.shape[0]
    bin_of_item = np.empty(n, np.int64)
    bin_of_item[order] = bin_sorted
    rank_of_item = np.empty(n, np.int64)
    rank_of_item[order] = np.arange(n, dtype=np.int64)
    return bin_of_item, rank_of_item, num_bins


def _bfd(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """BFD core: `(order, bin_sorted, num_bins)` where `order` lists items in placement order and
    `bin_sorted[i]` is the bin of item `order[i]`."""
    n = int(sizes.shape[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    if sizes.min() < 1 or sizes.max() > capacity:
        raise PackingError(f"item sizes must be in 1..{capacity}, got {sizes.min()}..{sizes.max()}")
    # Stable sort by decreasing size; numpy uses radix sort for 16-bit keys (~10 ms for 1M items).
    key = (capacity - sizes).astype(np.uint16 if capacity < 2**16 else np.int64)
    order = np.argsort(key, kind="stable")
    counts = np.bincount(sizes, minlength=capacity + 1)

    pools: list[list[int]] = [[] for _ in range(capacity + 1)]  # bin ids by remaining capacity
    hist = np.zeros(capacity + 1, np.int64)  # len(pools[c]) mirrored for vectorized search
    bin_sorted = np.empty(n, np.int64)  # bin of the i-th item in `order`
    num_bins = 0
    pos = 0
    for s in np.flatnonzero(counts)[::-1].tolist():
        remaining = int(counts[s])
        assigned: list[int] = []
        for c in (np.flatnonzero(hist[s:]) + s).tolist():
            per_bin = c // s
            pool = pools[c]
            need = -(-remaining // per_bin)
            take = min(len(pool), need)
            taken = pool[len(pool) - take :]
            del pool[len(pool) - take :]
            hist[c] -= take
            full = taken if take < need else taken[:-1]
            if full:
                assigned += full * per_bin
                pools[c - per_bin * s] += full
                hist[c - per_bin * s] += len(full)
            remaining -= len(full) * per_bin
            if take == need:  # the last bin takes what is left
                last = taken[-1]
                assigned += [last] * remaining
                left = c - remaining * s
                pools[left].append(last)
                hist[left] += 1
                remaining = 0
                break
        if remaining:
            per_bin = capacity // s
            n_new = -(-remaining // per_bin)
            new = list(range(num_bins, num_bins + n_new))
            num_bins += n_new
            full = new[:-1]
            assigned += full * per_bin
            pools[capacity - per_bin * s] += full
            hist[capacity - per_bin * s] += len(full)
            rest = remaining - len(full) * per_bin
            assigned += [new[-1]] * rest
            pools[capacity - rest * s].append(new[-1])
            hist[capacity - rest * s] += 1
        k = int(counts[s])
        bin_sorted[pos : pos + k] = assigned
        pos += k
    return order, bin_sorted, num_bins


def first_fit_python(sizes, capacity: int) -> list[list[int]]:
    """Plain first-fit in pure Python: the baseline `bench/packing.py` measures against."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i, s in enumerate(sizes):
        for b, f in enumerate(free):
            if s <= f:
                bins[b].append(i)
                free[b] -= s
                break
        else:
            bins.append([i])
            free.append(capacity - s)
    return bins


@dataclass(frozen=True)
class PackPlan:
    """Where every (possibly truncated) sample lands in the packed rows.

    Per-segment arrays (one segment = one sample in one row), sorted by (row, column):
      row, col          destination row and first column
      sample            index of the source sample in the input `lengths`
      src_offset        first token taken from the sample (0 unless truncated from the left)
      length            tokens taken
      loss_start        first position inside the segment that may be a target; never < 1, because the
                        segment's first token would be "predicted" from the previous sample
    Per-row: `row_ptr` (CSR offsets into the segment arrays) and `row_fill` (used tokens).

    `cu_seqlens` is GLOBAL over the flattened `[num_rows * max_seq_len]` buffer, int32, for flash-attn
    varlen: one entry per segment plus one per row's padding tail (padding is its own pseudo-sequence),
    so `cu_seqlens[-1] == num_rows * max_seq_len`. `max_seqlen` is the longest of those pieces. Both are
    for the full plan; `PackPlan.rows(...)` recomputes them for the selected rows.
    """

    max_seq_len: int
    row: np.ndarray
    col: np.ndarray
    sample: np.ndarray
    src_offset: np.ndarray
    length: np.ndarray
    loss_start: np.ndarray
    row_ptr: np.ndarray
    num_samples: int
    num_truncated: int = 0
    num_rejected: int = 0
    num_empty: int = 0
    truncated_tokens: int = 0
    rejected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    empty: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_rows(self) -> int:
        return int(self.row_ptr.shape[0] - 1)

    @property
    def num_segments(self) -> int:
        return int(self.row.shape[0])

    @property
    def row_fill(self) -> np.ndarray:
        return np.add.reduceat(self.length, self.row_ptr[:-1]) if self.num_segments else np.zeros(0, np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / all tokens in `num_rows x max_seq_len` rows."""
        return self.num_tokens / max(1, self.num_rows * self.max_seq_len)

    @property
    def cu_seqlens(self) -> np.ndarray:
        return _cu_seqlens(self.length, self.row, self.row_ptr, self.max_seq_len)

    @property
    def max_seqlen(self) -> int:
        pieces = np.diff(self.cu_seqlens)
        return int(pieces.max()) if pieces.size else 0

    def rows(self, rows) -> "PackPlan":
        """The sub-plan for `rows` (indices or a slice), renumbered 0..len(rows)-1 in the given order.

        This is how a micro-batch is taken: `plan.rows(slice(i, i + batch_size))`. The truncation/reject
        counters describe the whole dataset and stay on the full plan (they are zero here).
        """
        idx = np.arange(self.num_rows)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        starts, ends = self.row_ptr[idx], self.row_ptr[idx + 1]
        counts = ends - starts
        seg = _ranges(starts, counts)
        return PackPlan(
            max_seq_len=self.max_seq_len,
            row=np.repeat(np.arange(idx.shape[0], dtype=np.int64), counts),
            col=self.col[seg],
            sample=self.sample[seg],
            src_offset=self.src_offset[seg],
            length=self.length[seg],
            loss_start=self.loss_start[seg],
            row_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            num_samples=self.num_samples,
        )

    def batches(self, rows_per_batch: int):
        """Yield consecutive micro-batch sub-plans of `rows_per_batch` rows (the last may be shorter)."""
        for start in range(0, self.num_rows, rows_per_batch):
            yield self.rows(slice(start, start + rows_per_batch))

    def target_counts(self, target_mask: np.ndarray | None, sample_offsets: np.ndarray) -> np.ndarray:
        """Host-side number of label tokens per row, equal to what `pack_batch` will label.

        `target_mask`/`sample_offsets` are the host copies of the flat buffers given to `pack_batch`
        (None = every token is a target). Use the sum over all micro-batches of an optimizer step to
        normalize the loss without a device sync.
        """
        start = np.minimum(self.loss_start, self.length)
        if target_mask is None:
            per_seg = self.length - start
        else:
            prefix = np.concatenate([[0], np.cumsum(np.asarray(target_mask, np.int64))])
            base = np.asarray(sample_offsets, np.int64)[self.sample] + self.src_offset
            per_seg = prefix[base + self.length] - prefix[base + start]
        out = np.zeros(self.num_rows, np.int64)
        np.add.at(out, self.row, per_seg)
        return out


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), vectorized."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total) - offs)


def _cu_seqlens(length: np.ndarray, row: np.ndarray, row_ptr: np.ndarray, width: int) -> np.ndarray:
    num_rows = row_ptr.shape[0] - 1
    if num_rows == 0:
        return np.zeros(1, np.int32)
    fill = np.zeros(num_rows, np.int64)
    np.add.at(fill, row, length)
    pad = width - fill
    # Interleave per row: its segments, then its padding tail (if any).
    pieces_per_row = np.diff(row_ptr) + (pad > 0)
    pieces = np.empty(int(pieces_per_row.sum()), np.int64)
    ends = np.cumsum(pieces_per_row)
    is_pad = np.zeros(pieces.shape[0], bool)
    is_pad[(ends - 1)[pad > 0]] = True
    pieces[is_pad] = pad[pad > 0]
    pieces[~is_pad] = length
    return np.concatenate([[0], np.cumsum(pieces)]).astype(np.int32)


def _clip_lengths(lengths, max_seq_len: int, overflow: str):
    if overflow not in OVERFLOW_MODES:
        raise PackingError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    if max_seq_len < 1:
        raise PackingError(f"max_seq_len must be >= 1, got {max_seq_len}")
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise PackingError(f"lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if lengths.size and lengths.min() < 0:
        raise PackingError(f"lengths must be >= 0; sample {int(np.argmin(lengths))} has {int(lengths.min())}")
    too_long = lengths > max_seq_len
    empty = np.flatnonzero(lengths == 0)
    if overflow == "reject":
        rejected = np.flatnonzero(too_long)
        keep = (lengths > 0) & ~too_long
        num_truncated, truncated_tokens = 0, 0
    else:
        rejected = np.zeros(0, np.int64)
        keep = lengths > 0
        num_truncated = int(too_long.sum())
        truncated_tokens = int((lengths[too_long] - max_seq_len).sum())
    return lengths, np.minimum(lengths, max_seq_len), keep, rejected, empty, num_truncated, truncated_tokens


def plan_packing(
    lengths,
    max_seq_len: int,
    overflow: str = "truncate",
    loss_starts=None,
) -> PackPlan:
    """Best-fit-decreasing packing of samples with `lengths` into rows of `max_seq_len` tokens.

    overflow="truncate" keeps the first `max_seq_len` tokens of a longer sample; "reject" leaves it out.
    Either way it is counted (`num_truncated`/`truncated_tokens` or `num_rejected`/`rejected`). Empty
    samples cannot be packed and are counted in `num_empty`/`empty`. `loss_starts` (optional, per sample)
    is the first token that may be a target, e.g. the end of the first prompt; it is clipped to >= 1.
    Deterministic: the same input always gives the same plan.
    """
    lengths, clipped, keep, rejected, empty, num_truncated, truncated_tokens = _clip_lengths(
        lengths, max_seq_len, overflow
    )
    kept = np.flatnonzero(keep)
    sizes = clipped[kept]
    order, bin_sorted, num_bins = _bfd(sizes, max_seq_len)
    # Segments by row, then by placement (larger first): a stable sort of the bins in placement order.
    by_row = np.argsort(bin_sorted, kind="stable")
    seg_order = order[by_row]
    row = bin_sorted[by_row]
    length = sizes[seg_order]
    sample = kept[seg_order]
    counts = np.bincount(row, minlength=num_bins).astype(np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    csum = np.cumsum(length)
    excl = csum - length  # exclusive prefix sum over all segments
    col = excl - np.repeat(excl[row_ptr[:-1]], counts) if num_bins else np.zeros(0, np.int64)
    if loss_starts is None:
        ls = np.ones(sample.shape[0], np.int64)
    else:
        ls = np.maximum(np.asarray(loss_starts, np.int64)[sample], 1)
    return PackPlan(
        max_seq_len=max_seq_len,
        row=row.astype(np.int64, copy=False),
        col=col.astype(np.int64, copy=False),
        sample=sample.astype(np.int64, copy=False),
        src_offset=np.zeros(sample.shape[0], np.int64),
        length=length.astype(np.int64, copy=False),
        loss_start=ls,
        row_ptr=row_ptr,
        num_samples=int(lengths.shape[0]),
        num_truncated=num_truncated,
        num_rejected=int(rejected.shape[0]),
        num_empty=int(empty.shape[0]),
        truncated_tokens=truncated_tokens,
        rejected=rejected,
        empty=empty,
    )
