"""Reference helpers the dedup tests and benches compare the library with (not library code)."""

from __future__ import annotations

import polars as pl

from curate.dedup.settings import HashName, ShingleKind
from curate.dedup.text import shingle_rows


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


def python_hashfunc(hash: HashName):
    """The plain-Python hash function datasketch should be given to reproduce `hash_shingles`."""
    if hash == "sha1":
        from datasketch.hashfunc import sha1_hash32

        return sha1_hash32
    import xxhash

    return xxhash.xxh32_intdigest

