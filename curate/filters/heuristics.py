"""Gopher / FineWeb-style text-quality scores as Polars expressions (no per-row Python).

Column names are `<role>_<score>` with role `user` or `assistant` (see curate.filters.text for what each
role's text is). Definitions, so thresholds can be reasoned about:

- `word_count`: whitespace-separated tokens.
- `mean_word_length`: non-whitespace characters / words (punctuation included, unlike Gopher).
- `symbol_word_ratio`: (`#` characters + ellipses `...`/`…`) / words (Gopher's symbol-to-word ratio).
- `non_alpha_word_ratio`: share of words without any letter (Gopher wants >= 80% words with a letter).
- `stop_word_count`: occurrences of Gopher's English stop words (the, be, to, of, and, that, have, with).
- `line_count`: non-empty lines.
- `bullet_line_ratio`: non-empty lines starting with a bullet (•, ‣, -, *, ·) / non-empty lines.
- `ellipsis_line_ratio`: non-empty lines ending with `...` or `…` / non-empty lines.
- `dup_line_fraction`: non-empty lines that repeat an earlier line / non-empty lines.
- `dup_paragraph_fraction`: paragraphs (blank-line separated) that repeat an earlier one / paragraphs.
- `line_punct_ratio`: non-empty lines ending in terminal punctuation (. ! ? " ' ) …) / lines (FineWeb).
- `short_line_ratio`: non-empty lines shorter than 30 characters / lines (FineWeb).

Repetition (assistant text only — the text the model is trained to produce), from
:func:`repetition_scores`:

- `assistant_top_{2,3,4}gram_char_frac`: characters of the most frequent word n-gram (times its count)
  over all word characters, 0 when no n-gram occurs twice (Gopher counts it even when every n-gram is
  unique, which flags every short text).
- `assistant_dup_{5..10}gram_char_frac`: characters of words covered by a *repeated* occurrence of a
  word n-gram (the first occurrence is not counted) over all word characters. Gopher walks the text
  and skips ahead after a repeat; this vectorized version counts every repeated occurrence, so it is
  slightly higher on heavily repetitive text and identical on text with one repeated passage.
"""

from __future__ import annotations

import polars as pl

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
PER_TEXT_SCORES = (
    "word_count",
    "mean_word_length",
    "symbol_word_ratio",
    "non_alpha_word_ratio",
    "stop_word_count",
    "line_count",
    "bullet_line_ratio",
    "ellipsis_line_ratio",
    "dup_line_fraction",
    "dup_paragraph_fraction",
    "line_punct_ratio",
    "short_line_ratio",
)
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
SHORT_LINE_CHARS = 30


def _ratio(numerator: pl.Expr, denominator: pl.Expr) -> pl.Expr:
    return pl.when(denominator > 0).then(numerator.cast(pl.Float64) / denominator).otherwise(0.0)


def _non_empty_lines(text: pl.Expr) -> pl.Expr:
    return text.str.split("\n").list.eval(pl.element().str.strip_chars()).list.filter(pl.element() != "")


def _repeat_fraction(items: pl.Expr) -> pl.Expr:
    """Share of list items that repeat an earlier item."""
    return _ratio(items.list.len() - items.list.n_unique(), items.list.len())


def text_scores(text: pl.Expr, prefix: str) -> list[pl.Expr]:
    words = text.str.count_matches(r"\S+")
    lines = _non_empty_lines(text)
    line_count = lines.list.len()
    paragraphs = text.str.split("\n\n").list.eval(pl.element().str.strip_chars()).list.filter(pl.element() != "")
    return [
        words.alias(f"{prefix}_word_count"),
        # Characters minus whitespace: the same count as matching every `\S`, with ~6x fewer matches.
        _ratio(text.str.len_chars() - text.str.count_matches(r"\s"), words).alias(f"{prefix}_mean_word_length"),
        _ratio(text.str.count_matches(r"#|\.\.\.|…"), words).alias(f"{prefix}_symbol_word_ratio"),
        _ratio(words - text.str.count_matches(r"\S*\p{L}\S*"), words).alias(f"{prefix}_non_alpha_word_ratio"),
        text.str.count_matches(r"(?i)\b(?:" + "|".join(STOP_WORDS) + r")\b").alias(f"{prefix}_stop_word_count"),
        line_count.alias(f"{prefix}_line_count"),
        _ratio(lines.list.eval(pl.element().str.contains(r"^[•‣\-*·]")).list.sum(), line_count).alias(
            f"{prefix}_bullet_line_ratio"
        ),
        _ratio(lines.list.eval(pl.element().str.contains(r"(?:\.\.\.|…)$")).list.sum(), line_count).alias(
            f"{prefix}_ellipsis_line_ratio"
        ),
        _repeat_fraction(lines).alias(f"{prefix}_dup_line_fraction"),
        _repeat_fraction(paragraphs).alias(f"{prefix}_dup_paragraph_fraction"),
        _ratio(lines.list.eval(pl.element().str.contains(r"[.!?\"')”’…]$")).list.sum(), line_count).alias(
            f"{prefix}_line_punct_ratio"
        ),
        _ratio(
            lines.list.eval(pl.element().str.len_chars() < SHORT_LINE_CHARS).list.sum(), line_count
        ).alias(f"{prefix}_short_line_ratio"),
    ]


def repetition_score_names(prefix: str = "assistant") -> list[str]:
    return [f"{prefix}_top_{n}gram_char_frac" for n in TOP_NGRAM_SIZES] + [
        f"{prefix}_dup_{n}gram_char_frac" for n in DUP_NGRAM_SIZES
    ]


def _ngram_columns(words: pl.LazyFrame, sizes: range) -> pl.LazyFrame:
    """Add `key{n}`/`chars{n}`/`repeats{n}` (dropping n-1's) and the `top{n}` / `dup{n}` columns for each
    n in `sizes` (consecutive, starting right after the largest key already present).

    An n-gram can only repeat in its row if its (n-1)-word prefix does, so from n = 3 on the keys of
    the other positions are nulled: the hash tables (counts, first occurrences) then only see the few
    positions that can repeat (~0.5% of the words of a ~1 KB chat answer) instead of every word.
    Counts and first occurrences of the remaining keys are unchanged: every occurrence of a repeated
    n-gram keeps its key, in order."""
    for n in sizes:
        valid = pl.col("position") + n <= pl.col("words_in_row")
        candidate = valid & pl.col(f"repeats{n - 1}") if n > 2 else valid
        key = pl.col(f"key{n}")
        words = words.with_columns(
            pl.struct(pl.col(f"key{n - 1}").alias("k"), pl.col("h").shift(-(n - 1)).alias("h"))
            .hash(seed=11)
            .alias(f"key{n}"),
            (pl.col(f"chars{n - 1}") + pl.col("chars").shift(-(n - 1))).alias(f"chars{n}"),
        ).with_columns(pl.when(candidate).then(key).alias(f"key{n}"))
        columns = []
        if n in TOP_NGRAM_SIZES:
            count = pl.when(key.is_not_null()).then(pl.len().over(f"key{n}")).otherwise(0)
            # Most frequent n-gram of the row (ties: the longer one), counted only if it repeats.
            rank = count * 1_000_000 + pl.col(f"chars{n}").fill_null(0)
            columns += [pl.when(count >= 2).then(rank).otherwise(0).alias(f"top{n}"), (count >= 2).alias(f"repeats{n}")]
        else:
            columns.append((key.is_not_null() & key.is_duplicated()).alias(f"repeats{n}"))
        if n in DUP_NGRAM_SIZES:
            is_repeat = (key.is_not_null() & ~key.is_first_distinct()).cast(pl.Int8)
            # A word is covered when a repeated n-gram starts at most n-1 words before it; repeated
            # n-grams end inside their own row, so the rolling window never leaks across rows (and a
            # subset of whole rows keeps that property).
            covered = is_repeat.rolling_max(window_size=n, min_samples=1)
            columns.append((covered * pl.col("chars")).alias(f"dup{n}"))
        words = words.with_columns(columns).drop(f"key{n - 1}", f"chars{n - 1}", f"repeats{n - 1}", strict=False)
    return words


REPETITION_CHUNK = 32768  # rows per pass: the word table is ~100 bytes per word, so memory stays bounded


def repetition_scores_chunked(texts: pl.DataFrame, text_column: str, prefix: str = "assistant") -> pl.DataFrame:
    """:func:`repetition_scores` over slices of `texts` (same result, bounded peak memory)."""
    parts = [
        repetition_scores(texts.slice(start, REPETITION_CHUNK).lazy(), text_column, prefix).collect()
        for start in range(0, max(texts.height, 1), REPETITION_CHUNK)
    ]
    return pl.concat(parts)


def repetition_scores(texts: pl.LazyFrame, text_column: str, prefix: str = "assistant") -> pl.LazyFrame:
    """Gopher-style repetition scores for every row of `texts` (same row order, same length).

    One long table of words (row, position, hash, length) is built once; the n-gram keys are hashes of
    shifted word hashes (with the row number mixed in, so one window covers (row, n-gram)). Shifts may
    cross a row boundary, but such n-grams are masked out by `position + n <= words in row`."""
    words = (
        texts.select(pl.col(text_column).str.extract_all(r"\S+").alias("word"))
        .with_row_index("row")
        .with_columns(pl.col("word").list.len().cast(pl.Int64).alias("words_in_row"))
        .filter(pl.col("words_in_row") > 0)
        .with_columns(pl.int_ranges(0, pl.col("words_in_row"), dtype=pl.Int64).alias("position"))
        .explode("word", "position")
        .with_columns(
            pl.col("word").str.to_lowercase().hash(seed=7).alias("h"),
            pl.col("word").str.len_chars().cast(pl.Int64).alias("chars"),
        )
    )
    # Keys are materialized one n at a time (key_n = hash(key_{n-1}, word n-1)), so no hash is
    # recomputed; the row number is mixed into the first key so a plain column window is per row.
    words = words.with_columns(pl.struct(pl.col("row"), pl.col("h")).hash(seed=11).alias("key1"), pl.col("chars").alias("chars1"))
    first_dup = min(DUP_NGRAM_SIZES)
    words = _ngram_columns(words, range(2, first_dup + 1))
    total = pl.col("chars").sum()
    top_exprs = []
    for n in TOP_NGRAM_SIZES:
        top = pl.col(f"top{n}").max()
        top_exprs.append(_ratio((top // 1_000_000) * (top % 1_000_000), total).alias(f"{prefix}_top_{n}gram_char_frac"))
    dup_expr = lambda n: _ratio(pl.col(f"dup{n}").sum(), total).alias(f"{prefix}_dup_{n}gram_char_frac")  # noqa: E731
    per_row = words.group_by("row").agg(*top_exprs, dup_expr(first_dup))
    # A repeated n-gram (n > 5) contains a repeated 5-gram, so only rows with one need the longer
    # n-grams: usually a small share, which saves five passes over the whole word table.
    repeating_rows = words.filter(pl.col(f"dup{first_dup}") > 0).select("row").unique()
    subset = words.join(repeating_rows, on="row", how="semi", maintain_order="left")
    longer = _ngram_columns(subset, range(first_dup + 1, max(DUP_NGRAM_SIZES) + 1))
    per_row_longer = longer.group_by("row").agg(dup_expr(n) for n in DUP_NGRAM_SIZES if n > first_dup)
    per_row = per_row.join(per_row_longer, on="row", how="left")
    all_rows = texts.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"))
    return (
        all_rows.join(per_row, on="row", how="left", maintain_order="left")
        .select("row", *repetition_score_names(prefix))
        .with_columns(pl.col(repetition_score_names(prefix)).fill_null(0.0))
        .drop("row")
    )
