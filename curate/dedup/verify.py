"""Verification: the exact Jaccard of candidate pairs on their hashed shingle sets, and the rules on
top of it (preference pairs part by part, number variants)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from curate.dedup.banding import band_table_from, candidate_pairs, lsh_params
from curate.dedup.settings import MinHashSettings
from curate.dedup.signatures import estimated_jaccard, signatures_of
from curate.dedup.text import ShingleSets, _ranges, shingle_sets

def verified_jaccard(sets: ShingleSets, left: np.ndarray, right: np.ndarray, chunk: int = 500_000) -> np.ndarray:
    """Exact Jaccard of the hashed shingle sets of each (left, right) pair.

    Both sets of a pair are laid out under the pair's number and the left side's keys are looked up in
    the right side's (each set is unique, so every hit is one shared shingle). Collisions
    of the 32-bit hashes inside two short texts are vanishingly rare (~n²/2^32), so this is the Jaccard
    of the shingle sets themselves."""
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    out = np.empty(len(left), dtype=np.float64)
    sizes = sets.sizes
    for start in range(0, len(left), chunk):
        a, b = left[start : start + chunk], right[start : start + chunk]
        pair = np.arange(len(a), dtype=np.uint64)
        # (pair, hash) keys: each side is sorted already (pairs ascending, each set sorted), so the
        # intersection is a binary search of one side's keys in the other's.
        left_keys = (np.repeat(pair, sizes[a]) << np.uint64(32)) | sets.values[_ranges(sets.offsets[a], sizes[a])]
        right_keys = (np.repeat(pair, sizes[b]) << np.uint64(32)) | sets.values[_ranges(sets.offsets[b], sizes[b])]
        found = np.searchsorted(right_keys, left_keys)
        hit = found < len(right_keys)
        hit[hit] = right_keys[found[hit]] == left_keys[hit]
        intersection = np.bincount((left_keys[hit] >> np.uint64(32)).astype(np.int64), minlength=len(a))
        union = sizes[a] + sizes[b] - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + len(a)] = np.where(union > 0, intersection / np.maximum(union, 1), 0.0)
    return out


def part_jaccard(sets: ShingleSets, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Exact Jaccard of one part of each pair; two empty parts (two empty answers) are equal."""
    out = verified_jaccard(sets, left, right)
    sizes = sets.sizes
    out[(sizes[left] == 0) & (sizes[right] == 0)] = 1.0
    return out


@dataclass
class NodeFeatures:
    """What a near-duplicate decision needs of every node (saved index rows first, then this run's)."""

    signatures: np.ndarray
    sets: ShingleSets | None  # whole key texts; None when candidates are judged by estimate
    part_sets: list[ShingleSets]  # prompt, chosen, rejected of preference pairs (empty for other rows)
    multipart: np.ndarray  # bool: compared part by part
    number_code: np.ndarray  # uint64: hash of the text with numbers masked, punctuation removed
    digits_code: np.ndarray  # uint64: hash of the text's numbers

    def estimated(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return estimated_jaccard(self.signatures, a, b)

    def similarity(self, a: np.ndarray, b: np.ndarray, verify: bool, merge_number_variants: bool) -> np.ndarray:
        """Similarity of each (a, b) pair, compared with the threshold: the Jaccard of the whole key
        text (exact, or the signature estimate without `verify`); for two preference pairs the
        lowest of that and each part's exact Jaccard, so pairs sharing a prompt but not their answers
        stay apart; 0 for a preference pair against an SFT row, and for two rows that differ only in
        their numbers (unless `merge_number_variants`)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        out = verified_jaccard(self.sets, a, b) if verify else estimated_jaccard(self.signatures, a, b)
        both = self.multipart[a] & self.multipart[b]
        if both.any():
            for sets in self.part_sets:
                out[both] = np.minimum(out[both], part_jaccard(sets, a[both], b[both]))
        out[self.multipart[a] != self.multipart[b]] = 0.0
        if not merge_number_variants:
            number_only = (self.number_code[a] == self.number_code[b]) & (self.digits_code[a] != self.digits_code[b])
            out[number_only] = 0.0
        return out




def similar_pairs(
    texts: pl.Series, threshold: float, settings: MinHashSettings = MinHashSettings(), max_bucket_pairs: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Positions `(left < right)` of already simplified texts whose shingle sets have an exact Jaccard
    of at least `threshold`: the dedup stage's signatures, LSH banding (recall-weighted, aimed 0.1 under
    the threshold) and verification, without its clustering. For callers that want every chain kept
    together (connected components), such as the split's prompt groups."""
    sets = shingle_sets(texts, settings)
    signatures = signatures_of(sets, settings)
    bands, rows = lsh_params(round(max(0.05, threshold - 0.1), 6), settings.num_perm, 0.2, 0.8)
    left, right = candidate_pairs(band_table_from(signatures, sets.sizes > 0, bands, rows), max_bucket_pairs)
    similar = verified_jaccard(sets, left, right) >= threshold
    return left[similar], right[similar]


