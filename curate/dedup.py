"""Exact and MinHash near-deduplication of canonical records, vectorized over the whole frame.

The flow (datatrove's four MinHash steps, in one process, on columns instead of per-record objects):

1. **Key text.** Each row becomes one normalized string built from its *parts*: an SFT row has one
   part, its whole conversation (`key: conversation`) or all but its final answer (`key: prompt`); a
   preference row has three, prompt, chosen and rejected (`preference_key: pair`, the default whatever
   `key` says), or only its prompt (`preference_key: prompt`, which must be asked for). Message and
   field boundaries are marked (control characters), so text moved from one message or field to the
   next is another key. Normalization, and what each step merges:
   - Unicode NFC (done at ingest for every message): composed and decomposed accents (é / e + ◌́) —
     the same text; it cannot merge distinct items.
   - whitespace (always): runs of spaces, tabs and newlines become one space, ends are stripped — merges
     copies re-wrapped or re-indented; distinct only for whitespace-sensitive content (Python
     indentation), which chat data practically never differs in alone.
   - `lowercase` (default **on**): merges copies that differ only in letter case (a shouted or
     re-typed copy). It merges distinct items only if their entire content differs in case alone
     (case-sensitive code or identifiers); set `lowercase: false` for such data.
   - `strip_punctuation` (default **off**): punctuation and symbols to spaces — merges "17+25" with
     "17-25" and "Hello, World!" with "hello world".
   - `normalize_digits` (default **off**): every digit to `0` — merges every item of an arithmetic eval
     and every person record that differs in dates or ids. datatrove folds both for web documents;
     for conversational and eval data they merge distinct items, so they are opt-in.
   Near duplicates are found on the same normalized text (no folding of its own), so their verified
   Jaccard is measured on what the rows actually say.
2. **Exact duplicates** share the sha256 of that key; all but one (the keep policy decides) are dropped.
3. **Shingles** are built columnar in Polars (texts exploded to tokens, each n-gram the token joined to
   the next n-1 by `shift`; no Python loop over rows), hashed in bulk (xxh32 by default, sha1 —
   datasketch's default hash — on request) and reduced to sorted unique sets (CSR arrays).
4. **MinHash signatures** are computed in numpy over all sets at once: per block of sets (sized to
   stay in cache) and permutation, one multiply-add and one `np.minimum.reduceat`, blocks on threads.
   The permutations (same `RandomState` draws), the MurmurHash3 pre-mix and the uint32 arithmetic
   are exactly datasketch 2.x's default `affine32` scheme, so a signature equals
   `datasketch.MinHash(num_perm, seed, hashfunc=...)` updated with the same shingles (tests prove it
   for both hashes). Signatures are `uint32`: 4 bytes × `num_perm` per record.
5. **Candidates** come from LSH banding: each band's rows are folded into a 64-bit band hash and
   candidates are the rows sharing a band hash — one sort of the (node, band hash) column (the
   columnar group_by), never a Python dict of buckets. Bands/rows default to datasketch's optimum
   (`MinHashLSH._optimal_param`, reimplemented in numpy and tested equal) for a candidate threshold
   0.1 under the dedup threshold, weighted towards recall, because every candidate is verified.
6. **Verification and clustering.** Candidate pairs get their exact Jaccard on the (hashed) shingle
   sets (a vectorized binary search of one sorted set in the other, all pairs at once). Two preference
   pairs score the lowest of that and each part's own Jaccard (prompt, chosen, rejected), so pairs
   that share a long prompt but not their answers are not near duplicates (on the whole text the
   shared transcript dominates); a preference pair and an SFT row are never near duplicates. Two rows
   whose texts differ only in their numbers (punctuation aside: "What is 17+25? 42" / "What is
   18-25? -7", person records with other dates and ids) score 0 unless `merge_number_variants`: such
   rows are distinct items however long the text they share, and `normalize_digits: true` is the
   switch that merges them on purpose. Pairs under the threshold are discarded. Connected components
   of the verified edges are clusters, but a chain A~B~C must not put A and C together when they are
   not similar: every member must itself pass the threshold against the cluster's kept representative,
   otherwise it is split off and clustered again among the remaining rows (repeat until stable).

Why character 5-grams by default: support messages are short ("How do I reset my password?" is six
words). Word 5-grams give that question two shingles and word 3-grams four, so "How *can* I reset my
password?" scores a Jaccard of 0.0 and 0.33 against it, and the estimate moves in steps of a quarter:
near-duplicates of short messages (a typo, a changed word, another order number) never reach any
sensible threshold. Character 5-grams give one shingle per character (22 here) and score the pair
0.55; a one-word edit costs only the shingles that overlap it, so the Jaccard degrades smoothly with
the size of the edit on short messages and long conversations alike, and inflections and typos still
share most shingles. Word n-grams remain available (`shingle: word`), e.g. for long documents or to
match a ground truth defined on words (bench/dedup.py uses word 3-grams).

The index of a run (signatures, band hashes, hashed shingle sets, exact-key hashes, Parquet) can be
saved and given to a later run, which then deduplicates its new rows against it without recomputing
the old signatures, and can write an extended index.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the .chash / .nchash expression namespaces)
from pydantic import Field, model_validator

from curate.errors import ConfigError, RunStateError
from curate.stage import Seed, StageConfig
from safety.redact import redact

INDEX_FORMAT = "curate-minhash-index"
INDEX_VERSION = 2  # 2: number_hash, digits_hash and per-part shingle sets
KEY_HASH_CHARS = 32

HashName = Literal["xxh32", "sha1"]
ShingleKind = Literal["char", "word"]
KeyName = Literal["conversation", "prompt"]
PreferenceKeyName = Literal["pair", "prompt"]

# datasketch 2.x `affine32` constants: MurmurHash3 fmix32 pre-mix, then a*h+b mod 2^32 with a odd.
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_MAX_HASH32 = np.uint32(0xFFFFFFFF)
# 64-bit fold for band hashes (FNV-1a prime, then MurmurHash3 fmix64 to spread the bits).
_FNV64 = np.uint64(0x100000001B3)
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(33), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33))


# --------------------------------------------------------------------------------------------------
# Settings shared by the stage, the CLI, the index and the benchmark


@dataclass(frozen=True)
class MinHashSettings:
    """Everything that determines a key text and a signature; two indexes can be compared only if
    these match. Defaults: see the module docstring (normalization that cannot merge distinct items)."""

    num_perm: int = 128
    seed: int = 1  # datasketch's default seed
    hash: HashName = "xxh32"
    shingle: ShingleKind = "char"
    ngram: int = 5
    key: KeyName = "conversation"
    preference_key: PreferenceKeyName = "pair"
    lowercase: bool = True
    strip_punctuation: bool = False
    normalize_digits: bool = False
    include_system: bool = False

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# --------------------------------------------------------------------------------------------------
# Key text and shingles (Polars expressions)

# Boundaries inside a key text, so that moving text from one message or field to the next never gives
# the same key (prompt "A B" + chosen "C" is not prompt "A" + chosen "B C"). Control characters no
# normalization touches; any inside the content itself become spaces.
MESSAGE_SEPARATOR = "\x1e"
FIELD_SEPARATOR = "\x1f"
PART_NAMES = ("prompt", "chosen", "rejected")


def _contents(messages: pl.Expr, include_system: bool = False) -> pl.Expr:
    if not include_system:
        messages = messages.list.filter(pl.element().struct.field("role") != "system")
    # A tool call is what an assistant turn says when its content is empty: two conversations that differ
    # only in a call's function or arguments are different conversations.
    calls = (
        pl.element().struct.field("tool_calls")
        .list.eval(pl.element().struct.field("function").struct.field("name") + pl.lit("(") + pl.element().struct.field("function").struct.field("arguments") + pl.lit(")"))
        .list.join(" ")
    )
    content = pl.concat_str([pl.element().struct.field("content"), calls], separator=" ", ignore_nulls=True).str.strip_chars(" ")
    return messages.list.eval(content.str.replace_all(r"[\x1e\x1f]", " ")).list.join(MESSAGE_SEPARATOR)


def key_parts(
    key: KeyName = "conversation", include_system: bool = False, preference_key: PreferenceKeyName = "pair"
) -> list[pl.Expr]:
    """The raw (not yet simplified) texts a row is compared on, one expression per part; a part a row
    does not have is null.

    SFT rows have one part: every message's content (`key: conversation`) or all but the final
    assistant answer (`key: prompt`). Preference rows have three, prompt, chosen and rejected
    (`preference_key: pair`, the default whatever `key` says: a preference pair is a duplicate only
    when its answers are too), or only the prompt (`preference_key: prompt`, asked for explicitly).
    System messages are left out unless `include_system`: a shared system prompt is boilerplate that
    would make unrelated conversations look alike."""

    def _c(messages: pl.Expr) -> pl.Expr:
        return _contents(messages, include_system)

    if key == "conversation":
        sft = _c(pl.col("messages"))
    elif key == "prompt":
        sft = _c(pl.col("messages").list.slice(0, pl.col("messages").list.len() - 1))
    else:  # pragma: no cover - guarded by the config model
        raise ConfigError(f"dedup key must be 'conversation' or 'prompt', not {key!r}")
    if preference_key == "pair":
        preference = [_c(pl.col(name)) for name in PART_NAMES]
    elif preference_key == "prompt":
        preference = [_c(pl.col("prompt")), None, None]
    else:  # pragma: no cover - guarded by the config model
        raise ConfigError(f"dedup preference_key must be 'pair' or 'prompt', not {preference_key!r}")
    is_sft = pl.col("kind") == "sft"
    nothing = pl.lit(None, pl.String)
    first = pl.when(is_sft).then(sft).otherwise(preference[0]).fill_null("")
    rest = [pl.when(is_sft).then(nothing).otherwise(part if part is not None else nothing) for part in preference[1:]]
    return [first, *rest]


def join_parts(parts: list[pl.Expr]) -> pl.Expr:
    """One key text from the parts (missing parts skipped), fields marked by FIELD_SEPARATOR."""
    return pl.concat_str(parts, separator=f" {FIELD_SEPARATOR} ", ignore_nulls=True)


def key_text(
    key: KeyName = "conversation", include_system: bool = False, preference_key: PreferenceKeyName = "pair"
) -> pl.Expr:
    """The raw (not yet simplified) text a row is deduplicated on: its parts joined (see `key_parts`)."""
    return join_parts(key_parts(key, include_system, preference_key))


def simplify_text(
    text: pl.Expr, *, lowercase: bool = True, strip_punctuation: bool = False, normalize_digits: bool = False
) -> pl.Expr:
    """Normalize text for duplicate detection. Always: whitespace runs collapse to one space (ends
    stripped), and message/field separators stand alone as words. The text is NFC already (ingest
    normalizes every message). Switches: lowercase (default on), punctuation and symbols to spaces
    and every digit to `0` (both default off: they merge distinct items, see the module docstring)."""
    if lowercase:
        text = text.str.to_lowercase()
    if strip_punctuation:
        text = text.str.replace_all(r"[\p{P}\p{S}]+", " ")
    if normalize_digits:
        text = text.str.replace_all(r"\p{Nd}", "0")
    # Same as replacing `\s+` by one space, but a lone space (most of them) is not a match, which
    # makes this several times faster.
    text = text.str.replace_all(r"\s{2,}|[^\S ]", " ").str.strip_chars()
    return text.str.replace_all(r" ?([\x1e\x1f]) ?", " ${1} ")


def number_masked(text: pl.Expr) -> pl.Expr:
    """A text with every number replaced by `0` and punctuation and symbols removed: two texts with
    equal masks but different `numbers_in` differ only in their numbers (17+25 / 18-25 included)."""
    masked = text.str.replace_all(r"\p{Nd}+", "0").str.replace_all(r"[\p{P}\p{S}]+", " ")
    return masked.str.replace_all(r"\s+", " ").str.strip_chars()


def numbers_in(text: pl.Expr) -> pl.Expr:
    """The digit runs of a text, in order."""
    return text.str.extract_all(r"\p{Nd}+").list.join(" ")


def number_variant(masked: pl.Series, numbers: pl.Series, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Whether each (left, right) pair of texts differs only in its numbers (see `number_masked`)."""
    same_mask = (masked.gather(left) == masked.gather(right)).to_numpy()
    return same_mask & (numbers.gather(left) != numbers.gather(right)).to_numpy()


def simplified_parts(settings: MinHashSettings) -> list[pl.Expr]:
    options = dict(
        lowercase=settings.lowercase,
        strip_punctuation=settings.strip_punctuation,
        normalize_digits=settings.normalize_digits,
    )
    return [simplify_text(part, **options) for part in key_parts(settings.key, settings.include_system, settings.preference_key)]


def dedup_text(settings: MinHashSettings) -> pl.Expr:
    """The simplified key text exact keys and shingles are computed from."""
    return join_parts(simplified_parts(settings))


def shingle_rows(texts: pl.Series, kind: ShingleKind = "char", ngram: int = 5, node_offset: int = 0) -> pl.LazyFrame:
    """Exploded `(node, shingle)`: the n-gram shingles of already simplified texts, node = position in
    `texts` (+ `node_offset`). Words are split on single spaces, characters are code points; a
    non-empty text shorter than one n-gram is a single shingle of itself; an empty text has none.

    Columnar all the way: tokens are exploded, each n-gram is the token concatenated with the next
    n-1 (plain `shift`), kept where the last of them still belongs to the same text."""
    if ngram < 1:
        raise ConfigError(f"dedup ngram must be at least 1, not {ngram}")
    separator = " " if kind == "word" else ""
    frame = pl.LazyFrame({"text": texts.cast(pl.String)}).with_row_index("node", offset=node_offset)
    tokens = (
        frame.filter(pl.col("text").str.len_bytes() > 0)
        .select("node", pl.col("text").str.split(separator).alias("token"))
        .explode("token")
    )
    grams = tokens.select(
        "node",
        pl.concat_str([pl.col("token").shift(-offset) for offset in range(ngram)], separator=separator).alias("shingle"),
        (pl.col("node").shift(-(ngram - 1)) == pl.col("node")).alias("whole"),
    ).filter(pl.col("whole"))
    token_count = (
        pl.col("text").str.count_matches(" ", literal=True) + 1 if kind == "word" else pl.col("text").str.len_chars()
    )
    short = frame.filter((pl.col("text").str.len_bytes() > 0) & (token_count < ngram)).select(
        "node", pl.col("text").alias("shingle")
    )
    return pl.concat([grams.select("node", "shingle"), short])


def shingle_lists(texts: list[str] | pl.Series, kind: ShingleKind = "char", ngram: int = 5) -> list[list[str]]:
    """The distinct shingles of each text (any order), e.g. to feed `datasketch.MinHash` in tests."""
    texts = pl.Series(texts, dtype=pl.String)
    grouped = (
        shingle_rows(texts, kind, ngram)
        .group_by("node")
        .agg(pl.col("shingle").unique())
        .collect()
    )
    lookup = dict(zip(grouped["node"].to_list(), grouped["shingle"].to_list()))
    return [lookup.get(node, []) for node in range(len(texts))]


def hash_shingles(shingle: pl.Expr, hash: HashName = "xxh32") -> pl.Expr:
    """32-bit hash of each shingle's UTF-8 bytes, as datasketch's hashfunc would compute it.

    `sha1` = datasketch.hashfunc.sha1_hash32 (little-endian first 4 digest bytes), the default of
    `datasketch.MinHash`; `xxh32` = `xxhash.xxh32_intdigest` (seed 0), ~20x faster here."""
    if hash == "xxh32":
        return shingle.nchash.xxhash32()
    if hash == "sha1":
        # struct.unpack("<I") of the first four digest bytes (polars-hash gives the digest as hex).
        first_bytes = shingle.nchash.sha1().str.slice(0, 8).str.decode("hex")
        return first_bytes.bin.reinterpret(dtype=pl.UInt32, endianness="little")
    raise ConfigError(f"dedup hash must be 'xxh32' or 'sha1', not {hash!r}")


def python_hashfunc(hash: HashName):
    """The plain-Python hash function datasketch should be given to reproduce `hash_shingles`."""
    if hash == "sha1":
        from datasketch.hashfunc import sha1_hash32

        return sha1_hash32
    import xxhash

    return xxhash.xxh32_intdigest


@dataclass
class ShingleSets:
    """Hashed shingle sets of many texts in CSR form: set i is `values[offsets[i]:offsets[i+1]]`,
    sorted and unique (uint32)."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, column: pl.Series) -> "ShingleSets":
        """From a List[UInt32] column of sorted unique hashes (the index's `shingles`)."""
        counts = column.list.len().fill_null(0).to_numpy().astype(np.int64)
        values = column.explode(empty_as_null=False).drop_nulls().cast(pl.UInt32).to_numpy()
        return cls(values=np.ascontiguousarray(values, dtype=np.uint32), offsets=np.concatenate([[0], np.cumsum(counts)]))

    def to_lists(self, nodes: np.ndarray | None = None) -> pl.Series:
        import pyarrow as pa

        if nodes is not None:
            subset = self.take(nodes)
            return subset.to_lists()
        array = pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32)), pa.array(self.values, pa.uint32()))
        return pl.Series("shingles", array, dtype=pl.List(pl.UInt32))

    def take(self, nodes: np.ndarray) -> "ShingleSets":
        starts, sizes = self.offsets[nodes], self.sizes[nodes]
        return ShingleSets(values=self.values[_ranges(starts, sizes)], offsets=np.concatenate([[0], np.cumsum(sizes)]))

    @staticmethod
    def concat(parts: list["ShingleSets"]) -> "ShingleSets":
        values = np.concatenate([part.values for part in parts]) if parts else np.empty(0, np.uint32)
        sizes = np.concatenate([part.sizes for part in parts]) if parts else np.empty(0, np.int64)
        return ShingleSets(values=values.astype(np.uint32), offsets=np.concatenate([[0], np.cumsum(sizes)]))


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(start, start + size)` for every pair, without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    ends = np.cumsum(sizes)
    shift = np.repeat(starts - (ends - sizes), sizes)
    return np.arange(total, dtype=np.int64) + shift


def shingle_sets(texts: pl.Series | list[str], settings: MinHashSettings, chunk_tokens: int = 8_000_000) -> ShingleSets:
    """Hash every text's shingles and reduce them to sorted unique sets, in chunks of texts of bounded
    total length (memory stays flat on large inputs)."""
    texts = pl.Series(texts, dtype=pl.String)
    lengths = texts.str.len_chars().fill_null(0).to_numpy().astype(np.int64) + 1
    bounds = [0]
    running = np.cumsum(lengths)
    while bounds[-1] < len(texts):
        base = running[bounds[-1] - 1] if bounds[-1] else 0
        bounds.append(max(bounds[-1] + 1, int(np.searchsorted(running, base + chunk_tokens, side="right"))))
    bounds[-1] = min(bounds[-1], len(texts))
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        keyed = (
            shingle_rows(texts.slice(start, stop - start), settings.shingle, settings.ngram)
            .select(
                (pl.col("node").cast(pl.UInt64) * (1 << 32) + hash_shingles(pl.col("shingle"), settings.hash)).alias("key")
            )
            .collect()["key"]
            .sort()
            .to_numpy()
        )
        unique = keyed[np.r_[True, keyed[1:] != keyed[:-1]]] if len(keyed) else keyed
        nodes = (unique >> np.uint64(32)).astype(np.int64)
        counts = np.bincount(nodes, minlength=stop - start)
        parts.append(ShingleSets(values=(unique & np.uint64(0xFFFFFFFF)).astype(np.uint32), offsets=np.concatenate([[0], np.cumsum(counts)])))
    return ShingleSets.concat(parts)


def signatures_of(sets: ShingleSets, settings: MinHashSettings) -> np.ndarray:
    return minhash_signatures(sets.values, sets.sizes, settings.num_perm, settings.seed)


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


# --------------------------------------------------------------------------------------------------
# MinHash signatures (numpy)


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


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5):
    """(bands, rows) minimizing the weighted false positive and false negative areas under the LSH
    S-curve, over every bands × rows ≤ num_perm: datasketch's `MinHashLSH._optimal_param`, with the
    integrals done on a fine grid in numpy instead of scipy.integrate.quad (whose import alone costs
    seconds). A test checks both agree."""
    params = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    bands, rows = params[:, :1], params[:, 1:]
    below = np.linspace(0.0, threshold, 2001)[None, :]
    above = np.linspace(threshold, 1.0, 2001)[None, :]
    false_positive = np.trapezoid(1 - (1 - below**rows) ** bands, below, axis=1)
    false_negative = np.trapezoid((1 - above**rows) ** bands, above, axis=1)
    best = int(np.argmin(false_positive * false_positive_weight + false_negative * false_negative_weight))
    return int(params[best, 0]), int(params[best, 1])


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 `(n, bands)`: each band's `rows` values folded into one 64-bit hash (FNV-style fold,
    then fmix64). Equal bands always share a hash; distinct ones collide with probability ~2^-64, and
    every candidate is checked afterwards anyway."""
    if bands * rows > signatures.shape[1]:
        raise ConfigError(f"dedup bands × rows = {bands * rows} exceeds num_perm = {signatures.shape[1]}")
    columns = np.ascontiguousarray(signatures[:, : bands * rows].T)  # one contiguous row per slot
    out = np.empty((signatures.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        folded = np.full(signatures.shape[0], np.uint64(0xCBF29CE484222325), dtype=np.uint64)
        for column in range(band * rows, (band + 1) * rows):
            folded ^= columns[column]
            folded *= _FNV64
        out[:, band] = fmix64(folded ^ np.uint64(band))
    return out


def estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """Fraction of equal signature slots per pair (datasketch's `MinHash.jaccard`)."""
    slots = signatures.T  # (num_perm, n); contiguous for signatures from `minhash_signatures`
    out = np.empty(len(left), dtype=np.float64)
    for start in range(0, len(left), chunk):
        stop = start + chunk
        out[start:stop] = (slots[:, left[start:stop]] == slots[:, right[start:stop]]).mean(axis=0)
    return out


# --------------------------------------------------------------------------------------------------
# Candidates, verification, clustering


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for integer arrays via one sort (numpy 2's hash-based unique is far slower here)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def candidate_pairs(
    bands_long: pl.DataFrame, max_bucket_pairs: int = 64, new_from: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Unique node pairs (left < right) sharing a `(band, band_hash)` bucket.

    `bands_long` has `node`, `band`, `band_hash`; a bucket is a `(band, band_hash)` group. A bucket of up to `max_bucket_pairs` members yields all its pairs; a larger one (a big template family) yields only the star from its
    first member, which keeps the pair count linear and still connects the component. Pairs whose
    nodes are both below `new_from` (both from a saved index, already deduplicated) are skipped."""
    # One sort by (band_hash, node) makes every bucket a contiguous run, members ascending: the same
    # buckets as a group_by on (band, band_hash) (the band number is mixed into its hash), measured
    # 6-8x faster than a Polars group_by with list aggregation at 100k records.
    ordered = bands_long.select("band_hash", "node").sort("band_hash", "node")
    band_hash = ordered["band_hash"].to_numpy()
    nodes = ordered["node"].to_numpy().astype(np.int64)
    if len(nodes) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.r_[True, band_hash[1:] != band_hash[:-1]]
    bucket = np.cumsum(starts) - 1
    bucket_sizes = np.bincount(bucket)
    bucket_newest = np.maximum.reduceat(nodes, np.flatnonzero(starts))
    useful = (bucket_sizes > 1) & (bucket_newest >= new_from)  # skip singletons and index-only buckets
    shared = useful[bucket]
    nodes, bucket = nodes[shared], bucket[shared]
    size_of = bucket_sizes[bucket]
    lefts, rights = [], []
    small = size_of <= max_bucket_pairs
    small_nodes, small_bucket = nodes[small], bucket[small]
    largest = int(size_of[small].max()) if small.any() else 0
    for distance in range(1, largest):  # every member with each later member of its bucket
        same = small_bucket[distance:] == small_bucket[:-distance]
        lefts.append(small_nodes[:-distance][same])
        rights.append(small_nodes[distance:][same])
    big_nodes, big_bucket = nodes[~small], bucket[~small]
    if len(big_nodes):
        first = np.r_[True, big_bucket[1:] != big_bucket[:-1]]
        head = big_nodes[first][np.cumsum(first) - 1]
        lefts.append(head[~first])
        rights.append(big_nodes[~first])
    if not lefts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    left, right = np.minimum(left, right), np.maximum(left, right)
    keep = right >= new_from
    keys = sorted_unique((left[keep].astype(np.uint64) << np.uint64(32)) | right[keep].astype(np.uint64))
    return (keys >> np.uint64(32)).astype(np.int64), (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


def connected_components(node_count: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Component label (its smallest node) of every node, by vectorized union-find: hook each edge's
    larger root under the smaller, then pointer-jump until every node points at its root; repeat
    until no edge spans two roots. (scipy.sparse.csgraph does the same, but importing it costs more
    than running this on a dedup graph.)"""
    parent = np.arange(node_count, dtype=np.int64)
    while True:
        root_left, root_right = parent[left], parent[right]
        low, high = np.minimum(root_left, root_right), np.maximum(root_left, root_right)
        spanning = low != high
        if not spanning.any():
            return parent
        np.minimum.at(parent, high[spanning], low[spanning])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


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


@dataclass
class Clustering:
    """Outcome for the nodes that were assigned to another node's cluster."""

    member: np.ndarray  # nodes removed as near duplicates
    representative: np.ndarray  # the node each was verified against (always kept)
    jaccard: np.ndarray  # the similarity that admitted it (verified or estimated, see `verify`)
    chain_splits: int = 0
    rounds: int = 0


def greedy_clusters(
    node_count: int,
    left: np.ndarray,
    right: np.ndarray,
    priority: np.ndarray,
    similarity,
    threshold: float,
    protected: np.ndarray,
) -> Clustering:
    """Cluster the nodes joined by `left`–`right` edges (already above threshold) with a chain guard.

    Each round: connected components of the edges among unresolved nodes; the component's best node
    (lowest `priority`) is its representative; every other member whose `similarity(member, rep)` is at
    least `threshold` joins it. Members that fail (the far end of a chain) stay unresolved and are
    clustered again among themselves next round. `protected` nodes (from a saved index) are never
    removed: they can only be representatives. Every round resolves at least each representative, so
    this ends."""
    active = np.zeros(node_count, dtype=bool)
    active[left] = True
    active[right] = True
    members, reps, scores = [], [], []
    splits = 0
    rounds = 0
    while True:
        keep_edge = active[left] & active[right] & ~(protected[left] & protected[right])
        edge_left, edge_right = left[keep_edge], right[keep_edge]
        if len(edge_left) == 0:
            break
        rounds += 1
        labels = connected_components(node_count, edge_left, edge_right)
        nodes = sorted_unique(np.concatenate([edge_left, edge_right]))
        node_labels = labels[nodes]
        order = np.lexsort((priority[nodes], node_labels))
        nodes, node_labels = nodes[order], node_labels[order]
        first = np.r_[True, node_labels[1:] != node_labels[:-1]]
        # Each node's representative: the first node of its label's run.
        group_start = np.flatnonzero(first)
        group_index = np.cumsum(first) - 1
        rep = nodes[group_start][group_index]
        candidates = (nodes != rep) & ~protected[nodes]
        member_nodes, member_reps = nodes[candidates], rep[candidates]
        sims = similarity(member_nodes, member_reps)
        passed = sims >= threshold
        members.append(member_nodes[passed])
        reps.append(member_reps[passed])
        scores.append(sims[passed])
        splits += int((~passed).sum())
        active[nodes[first]] = False  # representatives are final
        active[member_nodes[passed]] = False
    if members:
        member = np.concatenate(members)
        representative = np.concatenate(reps)
        jaccard = np.concatenate(scores)
    else:
        member = representative = np.empty(0, dtype=np.int64)
        jaccard = np.empty(0, dtype=np.float64)
    return Clustering(member=member, representative=representative, jaccard=jaccard, chain_splits=splits, rounds=rounds)


# --------------------------------------------------------------------------------------------------
# The persisted index


@dataclass
class MinHashIndex:
    """Rows already kept by earlier runs: id, dup_cluster, key_hash, signature, shingles; plus the
    settings they were computed with and their band hashes."""

    settings: MinHashSettings
    records: pl.DataFrame  # id, dup_cluster, key_hash, signature (Array[UInt32]), shingles (List[UInt32])
    bands: int
    rows: int
    band_table: pl.DataFrame  # node, band, band_hash

    @property
    def signatures(self) -> np.ndarray:
        column = self.records["signature"]
        if len(column) == 0:
            return np.empty((0, self.settings.num_perm), dtype=np.uint32)
        return column.to_numpy().astype(np.uint32).reshape(len(column), self.settings.num_perm)

    def save(self, target: Path) -> None:
        from curate.atomic import atomic_dir

        with atomic_dir(target) as tmp:
            self.records.write_parquet(tmp / "records.parquet", compression="zstd", statistics=True)
            self.band_table.write_parquet(tmp / "bands.parquet", compression="zstd", statistics=True)
            meta = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "settings": self.settings.as_dict(),
                "bands": self.bands,
                "rows": self.rows,
                "records": self.records.height,
            }
            (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @staticmethod
    def files(path: Path) -> list[Path]:
        return [path / "index.json", path / "records.parquet", path / "bands.parquet"]

    @classmethod
    def load(cls, path: Path, expected: MinHashSettings) -> "MinHashIndex":
        meta_path = path / "index.json"
        if not meta_path.is_file():
            raise RunStateError(f"{path}: not a dedup index (no index.json); save one with a dedup stage first")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunStateError(f"{meta_path}: unreadable dedup index metadata ({error})") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise RunStateError(f"{meta_path}: not a {INDEX_FORMAT} version {INDEX_VERSION} file")
        stored = meta.get("settings", {})
        for name, value in expected.as_dict().items():
            if stored.get(name) != value:
                raise ConfigError(
                    f"{meta_path}: index was built with {name}={stored.get(name)!r} but this stage uses "
                    f"{name}={value!r}; signatures are only comparable with identical settings"
                )
        try:
            records = pl.read_parquet(path / "records.parquet", glob=False)
            band_table = pl.read_parquet(path / "bands.parquet", glob=False)
        except (OSError, pl.exceptions.PolarsError) as error:
            raise RunStateError(f"{path}: unreadable dedup index ({error})") from None
        return cls(
            settings=expected, records=records, bands=int(meta["bands"]), rows=int(meta["rows"]), band_table=band_table
        )


def empty_index_records(num_perm: int) -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "id": pl.String,
            "dup_cluster": pl.String,
            "key_hash": pl.String,
            "number_hash": pl.String,
            "digits_hash": pl.String,
            "signature": pl.Array(pl.UInt32, num_perm),
            "shingles": pl.List(pl.UInt32),
            **{f"shingles_{name}": pl.List(pl.UInt32) for name in PART_NAMES},
        }
    )


def band_table_from(signatures: np.ndarray, has_shingles: np.ndarray, bands: int, rows: int, offset: int = 0) -> pl.DataFrame:
    """Long `(node, band, band_hash)` for nodes with at least one shingle (empty texts never match)."""
    nodes = np.flatnonzero(has_shingles)
    subset = signatures if len(nodes) == len(signatures) else signatures[nodes]
    hashes = band_hashes(subset, bands, rows) if len(nodes) else np.empty((0, bands), np.uint64)
    return pl.DataFrame(
        {
            "node": np.repeat(nodes + offset, bands).astype(np.uint32),
            "band": np.tile(np.arange(bands, dtype=np.uint16), len(nodes)),
            "band_hash": hashes.ravel(),
        }
    )


def key_hash(text: pl.Expr) -> pl.Expr:
    """Stable hash of a simplified key text (sha256, 128 bits as hex, like record ids)."""
    return text.chash.sha2_256().str.slice(0, KEY_HASH_CHARS)


def hash_code(hashes: pl.Series) -> np.ndarray:
    """The first 64 bits of hex key hashes as integers, to compare many pairs at once in numpy."""
    return hashes.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy()


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




# --------------------------------------------------------------------------------------------------
# The whole deduplication of a frame (what the `dedup` stage and `curate dedup` run)

class RedisIndexConfig(StageConfig):
    """A shared index in Redis (datasketch `MinHashLSH` with Redis storage), for several machines."""

    host: str = "127.0.0.1"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0, le=1_000_000)
    # `redis://[user:password@]host:port/db` (or rediss://) instead of host/port/db, for a server that
    # needs a password. The stage fingerprint hashes it; every output shows it redacted.
    url: str | None = Field(None, pattern=r"^rediss?://")
    basename: str = Field("curate-dedup", min_length=1)

    def connection_kwargs(self) -> dict:
        """Keyword arguments of `redis.Redis` (datasketch's Redis storage takes the same)."""
        if self.url is None:
            return {"host": self.host, "port": self.port, "db": self.db}
        from redis.connection import parse_url

        params = parse_url(self.url)
        if params.pop("connection_class", None) is not None:  # rediss://: `redis.Redis` takes ssl=True
            params["ssl"] = True
        return params

    def display(self) -> str:
        """Where the index lives, without credentials (for messages)."""
        return redact(self.url) if self.url else f"{self.host}:{self.port}"


class DedupConfig(StageConfig):
    """Config of the `dedup` stage (exact and near dedup in one pass; switch either off)."""

    exact: bool = True
    near: bool = True
    key: KeyName = Field(
        "conversation", description="SFT rows: the whole conversation, or `prompt` (all but the final answer)."
    )
    preference_key: PreferenceKeyName = Field(
        "pair",
        description="Preference rows: `pair` = prompt + chosen + rejected, each part similar for a near duplicate; "
        "`prompt` = pairs sharing a prompt are duplicates whatever their answers.",
    )
    lowercase: bool = Field(True, description="Fold letter case (merges copies that differ only in case).")
    strip_punctuation: bool = Field(False, description="Punctuation and symbols to spaces (merges 17+25 with 17-25).")
    normalize_digits: bool = Field(False, description="Every digit to 0 (merges items that differ only in numbers).")
    merge_number_variants: bool = Field(
        False, description="Let rows that differ only in their numbers be near duplicates (off: distinct items)."
    )
    include_system: bool = False
    shingle: ShingleKind = "char"
    ngram: int = Field(5, ge=1, le=64)
    num_perm: int = Field(128, ge=2, le=1024)
    seed: Seed = 1
    hash: HashName = "xxh32"
    threshold: float = Field(0.7, gt=0.0, le=1.0)
    # Banding: explicit, or datasketch's optimum (with these weights) for `candidate_threshold`, which
    # defaults to threshold - 0.1. Candidates are aimed below the threshold and recall is weighted up,
    # because every candidate is verified: a false candidate costs a little sorting, a missed pair is
    # lost for good. At 0.7 / 128 perms this gives 23 bands × 5 rows: a pair at Jaccard 0.7 becomes a
    # candidate with probability 0.985 (datasketch's own 0.7 optimum, 14 × 9: 0.44).
    candidate_threshold: float | None = Field(None, gt=0.0, le=1.0)
    bands: int | None = Field(None, ge=1, le=1024)  # bands × rows ≤ num_perm ≤ 1024
    rows: int | None = Field(None, ge=1, le=1024)
    false_positive_weight: float = Field(0.2, ge=0.0, le=1.0)
    false_negative_weight: float = Field(0.8, ge=0.0, le=1.0)
    verify: bool = True
    # Candidates whose signature estimate is this far under the threshold are not verified (treated as
    # not similar): with 128 permutations the estimate's standard error is at most 0.044, so a pair at
    # the threshold is skipped with probability ~1e-4, while template-sharing support conversations
    # (many candidates at Jaccard 0.3-0.5) skip most of the verification work. null: verify all.
    skip_verify_margin: float | None = Field(0.15, ge=0.0, le=1.0)
    max_bucket_pairs: int = Field(64, ge=2, le=1_000_000)
    keep: Literal["longest_response", "highest_score", "earliest_source"] = "longest_response"
    score_column: str | None = None
    # A saved index (a previous dedup stage's `index/` folder): new rows are deduplicated against it.
    index_path: str | None = None
    save_index: bool = True
    extend_index: bool = True  # the saved index holds the old index's rows plus this run's kept rows
    examples: int = Field(5, ge=0, le=1000)  # largest clusters listed in the report
    # Also dedup against (and add this run's kept rows to) a shared Redis index. Its answers depend on
    # what other runs stored there, so a cached result of this stage is only as fresh as its run.
    redis: RedisIndexConfig | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if not (self.exact or self.near):
            raise ValueError("at least one of exact and near must be true")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if self.false_positive_weight + self.false_negative_weight <= 0:
            raise ValueError("false_positive_weight + false_negative_weight must be > 0")
        if self.keep == "highest_score" and not self.score_column:
            raise ValueError("keep: highest_score needs score_column")
        return self

    def settings(self) -> MinHashSettings:
        return MinHashSettings(
            num_perm=self.num_perm,
            seed=self.seed,
            hash=self.hash,
            shingle=self.shingle,
            ngram=self.ngram,
            key=self.key,
            preference_key=self.preference_key,
            lowercase=self.lowercase,
            strip_punctuation=self.strip_punctuation,
            normalize_digits=self.normalize_digits,
            include_system=self.include_system,
        )

    def band_params(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        return lsh_params(
            self.effective_candidate_threshold(), self.num_perm, self.false_positive_weight, self.false_negative_weight
        )

    def effective_candidate_threshold(self) -> float:
        if self.candidate_threshold is not None:
            return self.candidate_threshold
        return round(max(0.05, self.threshold - 0.1), 6)


@dataclass
class DedupOutcome:
    decisions: pl.DataFrame  # __row, dup_cluster, reason, duplicate_of, jaccard_estimated, jaccard_verified
    report: dict
    index: MinHashIndex | None
    # Verified near-duplicate edges between rows of this frame (row_left < row_right, similarity), before
    # clustering: what LSH + verification found, for benchmarks and debugging.
    edges: pl.DataFrame | None = None


def response_length() -> pl.Expr:
    """Characters of the answer: assistant turns of an SFT row, the chosen answer of a preference row."""
    assistant = (
        pl.col("messages")
        .list.eval(
            pl.when(pl.element().struct.field("role") == "assistant")
            .then(pl.element().struct.field("content").str.len_chars())
            .otherwise(0)
        )
        .list.sum()
    )
    chosen = pl.col("chosen").list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    return pl.when(pl.col("kind") == "sft").then(assistant).otherwise(chosen).fill_null(0)


def keep_priority(frame: pl.DataFrame, config: DedupConfig) -> np.ndarray:
    """Rank of every row under the keep policy (0 = kept first); ties go to the earliest input row."""
    if config.keep == "longest_response":
        keys, descending = [response_length(), pl.col("__row")], [True, False]
    elif config.keep == "highest_score":
        if config.score_column not in frame.columns:
            raise ConfigError(
                f"dedup keep: highest_score: score column {config.score_column!r} is not in the input "
                f"(columns: {', '.join(c for c in frame.columns if not c.startswith('__'))})"
            )
        keys, descending = [pl.col(config.score_column), pl.col("__row")], [True, False]
    else:
        keys, descending = [pl.col("__row")], [False]
    order = frame.select(pl.arg_sort_by(keys, descending=descending, nulls_last=True)).to_series().to_numpy()
    priority = np.empty(frame.height, dtype=np.int64)
    priority[order] = np.arange(frame.height)
    return priority


def _size_histogram(sizes: pl.Series) -> dict[str, int]:
    counts = sizes.value_counts().sort(sizes.name)
    return {str(size): int(count) for size, count in counts.iter_rows()}


def dedup_against_redis(
    config: DedupConfig,
    settings: MinHashSettings,
    band_params: tuple[int, int],
    survivors: np.ndarray,
    signatures: np.ndarray,
    has_shingles: np.ndarray,
    ids: np.ndarray,
    keys: pl.Series,
    reason: np.ndarray,
    duplicate_of: np.ndarray,
    cluster: np.ndarray,
    jaccard_estimated: np.ndarray,
) -> dict:
    """Drop rows this run kept that duplicate a row in the shared Redis index, then add the rest.

    datasketch's `MinHashLSH` with Redis storage holds the band buckets (same bands/rows as here);
    beside it three Redis hashes hold each indexed id's signature, `dup_cluster` and exact key, so a
    hit is confirmed by its estimated Jaccard (the shingle sets are not shared; `jaccard_verified`
    stays null) and exact keys match directly. datasketch's API is per record, so this path is a
    Python loop over the rows that survived the local dedup: the price of a shared index. Without the
    shingle sets, the per-part check of preference pairs and the number-variant rule do not apply here:
    a hit is judged on the whole-text estimate."""
    try:
        import redis
        from datasketch import LeanMinHash, MinHashLSH
    except ImportError as error:  # pragma: no cover - redis is an optional dependency
        raise ConfigError(f"dedup redis: the `redis` Python package is needed ({error})") from None
    from curate.errors import ExternalServiceError

    options = config.redis
    basename = options.basename
    connection = options.connection_kwargs()
    client = redis.Redis(**connection)
    meta_key = f"{basename}:settings"
    wanted = json.dumps({**settings.as_dict(), "bands": band_params[0], "rows": band_params[1]}, sort_keys=True)
    try:
        stored = client.get(meta_key)
        if stored is None:
            client.set(meta_key, wanted)
        elif stored.decode() != wanted:
            raise ConfigError(
                f"dedup redis {options.display()} {basename!r}: index was built with settings "
                f"{stored.decode()} but this stage uses {wanted}"
            )
        lsh = MinHashLSH(
            threshold=config.threshold,
            num_perm=settings.num_perm,
            params=band_params,
            storage_config={
                "type": "redis",
                "basename": basename.encode(),
                "redis": connection,
            },
            prepickle=False,  # keys stay our own bytes; prepickling would unpickle whatever the Redis holds
        )
        kept = survivors[reason[survivors] == None]  # noqa: E711
        node_of_row = {int(row): node for node, row in enumerate(survivors.tolist())}
        exact_hits = client.hmget(f"{basename}:exact", [keys[int(row)] for row in kept]) if len(kept) else []
        added = []
        exact_found = near_found = 0
        with lsh.insertion_session() as session:
            for row, exact_hit in zip(kept.tolist(), exact_hits):
                node = node_of_row[row]
                if exact_hit is not None:
                    hit_id = exact_hit.decode()
                    reason[row], duplicate_of[row] = "exact_duplicate", hit_id
                    cluster[row] = (client.hget(f"{basename}:cluster", hit_id) or exact_hit).decode()
                    jaccard_estimated[row] = 1.0
                    exact_found += 1
                    continue
                if not has_shingles[node]:
                    added.append(row)
                    continue
                signature = np.ascontiguousarray(signatures[node])
                sketch = LeanMinHash(seed=settings.seed, hashvalues=signature, scheme="affine32")
                hits = sorted(key.decode() for key in lsh.query(sketch))
                best_id, best = None, -1.0
                if hits:
                    stored_signatures = client.hmget(f"{basename}:signature", hits)
                    for hit_id, raw in zip(hits, stored_signatures):
                        if raw is None:
                            continue
                        estimate = float((np.frombuffer(raw, dtype=np.uint32) == signature).mean())
                        if estimate > best:
                            best_id, best = hit_id, estimate
                if best_id is not None and best >= config.threshold:
                    reason[row], duplicate_of[row] = "near_duplicate", best_id
                    cluster[row] = (client.hget(f"{basename}:cluster", best_id) or best_id.encode()).decode()
                    jaccard_estimated[row] = best
                    near_found += 1
                    continue
                session.insert(str(ids[row]).encode(), sketch, check_duplication=False)
                added.append(row)
        if added:
            pipe = client.pipeline(transaction=True)
            for row in added:
                row_id = str(ids[row])
                node = node_of_row[row]
                pipe.hset(f"{basename}:signature", row_id, np.ascontiguousarray(signatures[node]).tobytes())
                pipe.hset(f"{basename}:cluster", row_id, str(cluster[row]))
                pipe.hsetnx(f"{basename}:exact", keys[row], row_id)
            pipe.execute()
        size = client.hlen(f"{basename}:signature")
    except redis.exceptions.RedisError as error:
        raise ExternalServiceError(
            f"dedup redis {options.display()}: {type(error).__name__}: {redact(str(error))}"
        ) from None
    return {
        "basename": basename,
        "exact_duplicates": exact_found,
        "near_duplicates": near_found,
        "added": len(added),
        "size": int(size),
    }


def deduplicate(
    frame: pl.DataFrame, config: DedupConfig, index: MinHashIndex | None = None, progress=lambda message: None
) -> DedupOutcome:
    """Decide, for every row of a canonical frame, whether it is kept and which cluster it belongs to.

    `frame` must carry a `__row` column 0..n-1. Rows matching an `index` row are always the ones removed
    (the index holds rows earlier runs kept)."""
    settings = config.settings()
    bands, rows = config.band_params()
    n = frame.height
    part_columns = [f"__part_{name}" for name in PART_NAMES]
    texts = frame.select(
        key_text(settings.key, settings.include_system, settings.preference_key).alias("raw"),
        *[part.alias(column) for part, column in zip(simplified_parts(settings), part_columns)],
    ).with_columns(join_parts([pl.col(column) for column in part_columns]).alias("text"))
    hashes = texts.select(
        key_hash(pl.col("text")).alias("key_hash"),
        key_hash(number_masked(pl.col("text"))).alias("number_hash"),
        key_hash(numbers_in(pl.col("text"))).alias("digits_hash"),
    )
    keys, number_keys, digit_keys = hashes["key_hash"], hashes["number_hash"], hashes["digits_hash"]
    # Rows compared part by part (preference pairs): the second part is present.
    multipart = texts[part_columns[1]].is_not_null().to_numpy()
    priority = keep_priority(frame, config)
    ids = frame["id"].to_numpy()
    progress("dedup: keys ready")

    reason = np.full(n, None, dtype=object)
    duplicate_of = np.full(n, None, dtype=object)
    cluster = ids.astype(object).copy()
    jaccard_estimated = np.full(n, np.nan)
    jaccard_verified = np.full(n, np.nan)
    exact_rep = np.arange(n)  # each row's exact-duplicate representative (itself when unique)

    index_records = index.records if index is not None else empty_index_records(settings.num_perm)
    old_count = index_records.height

    # ---- exact duplicates
    exact_dropped = 0
    anchored_exact = 0
    if config.exact:
        progress("dedup: exact keys")
        table = pl.DataFrame({"row": np.arange(n), "key_hash": keys, "priority": priority})
        table = table.with_columns(pl.col("row").sort_by("priority").first().over("key_hash").alias("rep"))
        exact_rep = table["rep"].to_numpy().copy()
        is_dup = exact_rep != np.arange(n)
        reason[is_dup] = "exact_duplicate"
        duplicate_of[is_dup] = ids[exact_rep[is_dup]]
        jaccard_estimated[is_dup] = 1.0
        jaccard_verified[is_dup] = 1.0
        exact_dropped = int(is_dup.sum())
        if old_count:
            old_keys = index_records.select("key_hash", "id", "dup_cluster").unique("key_hash", keep="first")
            matched = table.select("row", "key_hash").join(old_keys, on="key_hash", how="inner").sort("row")
            if matched.height:
                rows_matched = matched["row"].to_numpy()
                reason[rows_matched] = "exact_duplicate"
                duplicate_of[rows_matched] = matched["id"].to_numpy()
                cluster[rows_matched] = matched["dup_cluster"].to_numpy()
                jaccard_estimated[rows_matched] = 1.0
                jaccard_verified[rows_matched] = 1.0
                anchored_exact = int((exact_rep[rows_matched] == rows_matched).sum())
                exact_dropped += anchored_exact
                exact_rep[rows_matched] = rows_matched  # their own decision is final

    # ---- near duplicates among the surviving rows (and against the index)
    survivors = np.flatnonzero(reason == None)  # noqa: E711  (object array of None)
    lsh_report = {
        "bands": bands,
        "rows": rows,
        "num_perm": settings.num_perm,
        "threshold": config.threshold,
        "candidate_threshold": config.effective_candidate_threshold() if config.bands is None else None,
    }
    new_signatures = np.empty((0, settings.num_perm), dtype=np.uint32)
    near_dropped = 0
    edges = None
    new_sets = ShingleSets(values=np.empty(0, np.uint32), offsets=np.zeros(1, np.int64))
    new_part_sets = [new_sets] * len(PART_NAMES)
    if config.near or config.save_index:
        progress(f"dedup: MinHash signatures of {len(survivors)} rows")
        new_sets = shingle_sets(texts["text"].gather(survivors), settings)
        new_signatures = signatures_of(new_sets, settings)
        # Only preference pairs are compared part by part; other rows get empty part sets.
        if multipart[survivors].any():
            survivor_parts = texts.select(
                pl.when(pl.lit(pl.Series(multipart, dtype=pl.Boolean)))
                .then(pl.col(column))
                .otherwise(pl.lit(""))
                .gather(survivors)
                for column in part_columns
            )
            new_part_sets = [shingle_sets(survivor_parts[column], settings) for column in part_columns]
        else:
            no_sets = ShingleSets(values=np.empty(0, np.uint32), offsets=np.zeros(len(survivors) + 1, np.int64))
            new_part_sets = [no_sets] * len(PART_NAMES)
    has_shingles_new = new_sets.sizes > 0
    if config.near and len(survivors):
        old_signatures = index.signatures if index is not None else new_signatures[:0]
        all_signatures = np.concatenate([old_signatures, new_signatures]) if old_count else new_signatures
        old_sets = ShingleSets.from_lists(index_records["shingles"]) if old_count else new_sets.take(np.empty(0, np.int64))
        if index is not None and (index.bands, index.rows) == (bands, rows):
            old_bands = index.band_table.select(
                pl.col("node").cast(pl.UInt32), pl.col("band").cast(pl.UInt16), pl.col("band_hash").cast(pl.UInt64)
            )
        else:
            old_bands = band_table_from(old_signatures, old_sets.sizes > 0, bands, rows)
        new_bands = band_table_from(new_signatures, has_shingles_new, bands, rows, offset=old_count)
        progress("dedup: LSH candidates")
        left, right = candidate_pairs(pl.concat([old_bands, new_bands]), config.max_bucket_pairs, new_from=old_count)
        node_count = old_count + len(survivors)
        nodes = NodeFeatures(
            signatures=all_signatures,
            sets=ShingleSets.concat([old_sets, new_sets]) if config.verify else None,
            part_sets=[
                ShingleSets.concat([ShingleSets.from_lists(index_records[f"shingles_{name}"]), new_part])
                for name, new_part in zip(PART_NAMES, new_part_sets)
            ],
            multipart=np.concatenate([index_records["shingles_chosen"].is_not_null().to_numpy(), multipart[survivors]]),
            digits_code=np.concatenate([hash_code(index_records["digits_hash"]), hash_code(digit_keys.gather(survivors))]),
            number_code=np.concatenate(
                [hash_code(index_records["number_hash"]), hash_code(number_keys.gather(survivors))]
            ),
        )

        def compute_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return nodes.similarity(a, b, config.verify, config.merge_number_variants)

        progress(f"dedup: verifying {len(left)} candidate pairs")
        if config.verify and config.skip_verify_margin is not None:
            estimate = estimated_jaccard(all_signatures, left, right)
            worth = estimate >= config.threshold - config.skip_verify_margin
            pair_similarity = np.zeros(len(left), dtype=np.float64)
            pair_similarity[worth] = compute_similarity(left[worth], right[worth])
            lsh_report["skipped_by_estimate"] = int((~worth).sum())
        else:
            pair_similarity = compute_similarity(left, right)
        known_keys = (left.astype(np.uint64) << np.uint64(32)) | right.astype(np.uint64)  # sorted, unique

        def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            """Member-to-representative similarity, reusing the candidate pairs' values."""
            low, high = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)
            keys = (low << np.uint64(32)) | high
            position = np.minimum(np.searchsorted(known_keys, keys), max(len(known_keys) - 1, 0))
            known = (known_keys[position] == keys) if len(known_keys) else np.zeros(len(keys), dtype=bool)
            out = np.empty(len(keys), dtype=np.float64)
            out[known] = pair_similarity[position[known]]
            if (~known).any():
                out[~known] = compute_similarity(a[~known], b[~known])
            return out

        edge = pair_similarity >= config.threshold
        node_priority = np.concatenate([np.arange(old_count) - old_count, priority[survivors]])
        protected = np.zeros(node_count, dtype=bool)
        protected[:old_count] = True
        new_pair = (left[edge] >= old_count) & (right[edge] >= old_count)
        edge_rows = np.sort(
            np.stack([survivors[left[edge][new_pair] - old_count], survivors[right[edge][new_pair] - old_count]]), axis=0
        )
        edges = pl.DataFrame(
            {"row_left": edge_rows[0], "row_right": edge_rows[1], "similarity": pair_similarity[edge][new_pair]}
        )
        clustering = greedy_clusters(
            node_count, left[edge], right[edge], node_priority, similarity, config.threshold, protected
        )
        lsh_report.update(
            candidate_pairs=int(len(left)),
            verified_pairs=int(edge.sum()),
            chain_splits=clustering.chain_splits,
            clustering_rounds=clustering.rounds,
            verify=config.verify,
        )
        # Map nodes back to rows (new nodes) or index rows (old nodes).
        member_rows = survivors[clustering.member - old_count]
        rep_nodes = clustering.representative
        rep_is_old = rep_nodes < old_count
        rep_ids = np.empty(len(rep_nodes), dtype=object)
        rep_clusters = np.empty(len(rep_nodes), dtype=object)
        if rep_is_old.any():
            old_ids = index_records["id"].to_numpy()
            old_clusters = index_records["dup_cluster"].to_numpy()
            rep_ids[rep_is_old] = old_ids[rep_nodes[rep_is_old]]
            rep_clusters[rep_is_old] = old_clusters[rep_nodes[rep_is_old]]
        new_rep_rows = survivors[rep_nodes[~rep_is_old] - old_count]
        rep_ids[~rep_is_old] = ids[new_rep_rows]
        rep_clusters[~rep_is_old] = ids[new_rep_rows]
        reason[member_rows] = "near_duplicate"
        duplicate_of[member_rows] = rep_ids
        cluster[member_rows] = rep_clusters
        jaccard_estimated[member_rows] = estimated_jaccard(all_signatures, clustering.member, rep_nodes)
        if config.verify:
            jaccard_verified[member_rows] = clustering.jaccard
        near_dropped = len(member_rows)

    redis_report = None
    if config.redis is not None:
        progress("dedup: shared Redis index")
        redis_report = dedup_against_redis(
            config, settings, (bands, rows), survivors, new_signatures, has_shingles_new, ids, keys,
            reason, duplicate_of, cluster, jaccard_estimated,
        )
        exact_dropped += redis_report["exact_duplicates"]
        near_dropped += redis_report["near_duplicates"]

    # Exact duplicates follow their representative's final cluster.
    exact_members = np.flatnonzero(exact_rep != np.arange(n))
    cluster[exact_members] = cluster[exact_rep[exact_members]]

    decisions = pl.DataFrame(
        {
            "__row": frame["__row"],
            "dup_cluster": pl.Series(cluster.tolist(), dtype=pl.String),
            "reason": pl.Series(reason.tolist(), dtype=pl.String),
            "duplicate_of": pl.Series(duplicate_of.tolist(), dtype=pl.String),
            "jaccard_estimated": pl.Series(jaccard_estimated).fill_nan(None),
            "jaccard_verified": pl.Series(jaccard_verified).fill_nan(None),
        }
    )

    progress("dedup: clusters ready")
    # ---- report
    sizes = decisions.group_by("dup_cluster").agg(
        pl.len().alias("size"), pl.col("reason").is_null().any().alias("has_kept")
    )
    # A cluster anchored in the saved index has no kept row here: count its index row as a member.
    sizes = sizes.with_columns((pl.col("size") + (~pl.col("has_kept")).cast(pl.UInt32)).alias("size"))
    multi = sizes.filter(pl.col("size") > 1).sort(["size", "dup_cluster"], descending=[True, False])
    examples = []
    raw = texts["raw"]
    for cluster_id, size, has_kept in multi.head(config.examples).iter_rows():
        rows_in_cluster = decisions.filter(pl.col("dup_cluster") == cluster_id)
        kept_rows = rows_in_cluster.filter(pl.col("reason").is_null())["__row"]
        example_row = int(kept_rows[0] if len(kept_rows) else rows_in_cluster["__row"][0])
        examples.append(
            {
                "dup_cluster": cluster_id,
                "size": int(size),
                "in_saved_index": not has_kept,
                "example": raw[example_row].replace(FIELD_SEPARATOR, "\n").replace(MESSAGE_SEPARATOR, "\n")[:200],
            }
        )
    report = {
        "rows_in": n,
        "kept": int((reason == None).sum()),  # noqa: E711
        "exact_duplicates": exact_dropped,
        "near_duplicates": near_dropped,
        "clusters": int(multi.height),
        "cluster_size_histogram": _size_histogram(multi["size"]),
        # One-line forms of the above for the summary tables of `curate run` / `curate stats`.
        "cluster_sizes": " ".join(f"{size}×{count}" for size, count in _size_histogram(multi["size"]).items())
        or "none",
        "largest_cluster": (f"{examples[0]['size']} rows: {' '.join(examples[0]['example'].split())[:80]}" if examples else "none"),
        "largest_clusters": examples,
        "settings": settings.as_dict(),
        "lsh": lsh_report,
        "keep": config.keep,
    }
    if redis_report is not None:
        report["redis"] = redis_report

    # ---- index of everything kept so far
    new_index = None
    if config.save_index:
        kept_new = np.flatnonzero(reason[survivors] == None)  # noqa: E711
        kept_rows = survivors[kept_new]
        kept_multipart = pl.Series(multipart[kept_rows])
        new_records = pl.DataFrame(
            {
                "id": frame["id"].gather(kept_rows),
                "dup_cluster": pl.Series(cluster[kept_rows].tolist(), dtype=pl.String),
                "key_hash": keys.gather(kept_rows),
                "number_hash": number_keys.gather(kept_rows),
                "digits_hash": digit_keys.gather(kept_rows),
                "signature": pl.Series(
                    np.ascontiguousarray(new_signatures[kept_new]), dtype=pl.Array(pl.UInt32, settings.num_perm)
                ),
                "shingles": new_sets.to_lists(kept_new),
                **{
                    f"shingles_{name}": pl.select(
                        pl.when(pl.lit(kept_multipart)).then(pl.lit(part.to_lists(kept_new)))
                    ).to_series()
                    for name, part in zip(PART_NAMES, new_part_sets)
                },
            }
        )
        base = index_records if (config.extend_index and index is not None) else empty_index_records(settings.num_perm)
        records = pl.concat([base, new_records])
        signatures = (
            records["signature"].to_numpy().astype(np.uint32).reshape(records.height, settings.num_perm)
            if records.height
            else np.empty((0, settings.num_perm), dtype=np.uint32)
        )
        has = records["shingles"].list.len().to_numpy() > 0
        new_index = MinHashIndex(
            settings=settings,
            records=records,
            bands=bands,
            rows=rows,
            band_table=band_table_from(signatures, has, bands, rows),
        )
        report["index"] = {
            "rows_before": old_count,
            "rows_after": records.height,
            "signature_bytes_per_record": settings.num_perm * 4,
        }
    return DedupOutcome(decisions=decisions, report=report, index=new_index, edges=edges)


__all__ = [
    "DedupConfig",
    "RedisIndexConfig",
    "dedup_against_redis",
    "DedupOutcome",
    "deduplicate",
    "keep_priority",
    "response_length",
    "Clustering",
    "MinHashIndex",
    "MinHashSettings",
    "band_hashes",
    "band_table_from",
    "candidate_pairs",
    "dedup_text",
    "estimated_jaccard",
    "connected_components",
    "greedy_clusters",
    "hash_shingles",
    "key_hash",
    "key_text",
    "lsh_params",
    "minhash_signatures",
    "permutations",
    "python_hashfunc",
    "ShingleSets",
    "shingle_lists",
    "shingle_rows",
    "shingle_sets",
    "signatures_of",
    "similar_pairs",
    "simplify_text",
    "number_masked",
    "numbers_in",
    "number_variant",
    "verified_jaccard",
]
