"""Key text, normalization and shingles: what a row is compared on, as Polars expressions, and its
hashed shingle sets (CSR arrays)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the .chash / .nchash expression namespaces)

from curate.dedup.settings import HashName, KeyName, MinHashSettings, PreferenceKeyName, ShingleKind
from curate.errors import ConfigError

KEY_HASH_CHARS = 32

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



def key_hash(text: pl.Expr) -> pl.Expr:
    """Stable hash of a simplified key text (sha256, 128 bits as hex, like record ids)."""
    return text.chash.sha2_256().str.slice(0, KEY_HASH_CHARS)


def hash_code(hashes: pl.Series) -> np.ndarray:
    """The first 64 bits of hex key hashes as integers, to compare many pairs at once in numpy."""
    return hashes.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64).to_numpy()



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


