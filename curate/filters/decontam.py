"""Decontamination: word n-gram overlap between training rows and evaluation items.

Text is normalized (lower case, every non letter/digit becomes a space) and split into words; each row
and each evaluation item is turned into the hashes of its word n-grams (default n = 12; GPT-3 used 13).
The text is the user and assistant turns (prompt and chosen for preference rows) — not system prompts,
which are shared boilerplate, not evaluation content. A training row is contaminated by an evaluation
item when it contains at least `min_overlap` of the item's distinct n-grams (PaLM counted 70% of
8-grams; one shared 12-gram alone is too weak for templated support text, where stock sentences
recur in hundreds of unrelated conversations) and at least `min_matching_ngrams` of them. Texts shorter
than n words produce no n-gram and cannot match (lower `ngram` for very short evaluation items).

Evaluation files are read with the core ingest (`curate.ingest.read_canonical`, any format ingest reads)
and nothing else reads them: an item's id is the raw `id` field ingest keeps on the row (in `metadata`)
when it has one, else `file:row`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.errors import InputFileError
from curate.filters.text import TURN_SEPARATOR, assistant_text, user_text
from curate.ingest import CANONICAL_FORMAT


def scored_text() -> pl.Expr:
    """User and assistant turns of a canonical row (no system prompt), the text compared for overlap."""
    return user_text() + TURN_SEPARATOR + assistant_text()


def normalized_words(text: pl.Expr) -> pl.Expr:
    return text.str.to_lowercase().str.replace_all(r"[^\p{L}\p{N}]+", " ").str.extract_all(r"\S+")


def ngram_hashes(frame: pl.LazyFrame, key: str, text: str, n: int) -> pl.LazyFrame:
    """Distinct (key, gram) pairs: `gram` is a u64 hash of each word n-gram of `text`."""
    words = (
        frame.select(key, normalized_words(pl.col(text)).alias("word"))
        .with_columns(pl.col("word").list.len().alias("__n_words"))
        .filter(pl.col("__n_words") >= n)
        .explode("word")
        .with_columns(
            pl.col("word").hash(seed=3).alias("__h"),
            pl.int_range(pl.len()).over(key).alias("__pos"),
        )
    )
    gram = pl.struct([pl.col("__h").shift(-k).alias(f"h{k}") for k in range(n)]).hash(seed=5)
    return (
        words.with_columns(gram.alias("gram"))
        .filter(pl.col("__pos") + n <= pl.col("__n_words"))
        .select(key, "gram")
        .unique(maintain_order=True)
    )


def raw_id_expr(schema: pl.Schema, written_by_us: bool) -> pl.Expr:
    """The evaluation item's own id, from the row ingest made of it: the raw `id` field, which ingest
    keeps in `metadata` like any field the format does not use; for a Parquet file this tool wrote, its
    `id` column. Null where the item has none."""
    metadata = schema.get("metadata")
    ids = []
    if isinstance(metadata, pl.Struct) and "id" in {field.name for field in metadata.fields}:
        ids.append(pl.col("metadata").struct.field("id").cast(pl.String))
    if written_by_us:
        ids.append(pl.col("id"))
    return pl.coalesce(ids) if ids else pl.lit(None, pl.String)


def _ingested(path: Path, label: str) -> tuple[pl.DataFrame, bool]:
    """The canonical rows of one evaluation file (through ingest, the only reader of raw files), and
    whether it is a Parquet file this tool wrote (its `id` column is then the item id)."""
    from curate.ingest import IngestOptions, InputSpec, ingest_file

    batches, file_format = [], None
    for batch, report in ingest_file(path, label, InputSpec(path=str(path)), IngestOptions()):
        batches.append(batch.records)
        file_format = report.format
    return pl.concat(batches, how="diagonal_relaxed"), file_format == CANONICAL_FORMAT


def load_eval_items(paths: list[Path], labels: list[str] | None = None) -> pl.DataFrame:
    """One row per evaluation item: `eval_order` (position over all files), `eval_id`, `text`.

    `eval_id` is the raw item's `id` field where it has one, else `<label>:<row>` (label: the path as
    configured). Both come from the ingested rows; the raw file is read once, by ingest."""
    labels = labels or [str(path) for path in paths]
    frames = []
    for path, label in zip(paths, labels):
        if not path.is_file():
            raise InputFileError(f"{label}: evaluation file not found")
        records, written_by_us = _ingested(path, label)
        row_label = pl.lit(f"{label}:") + pl.col("source").struct.field("row").cast(pl.String)
        raw_id = raw_id_expr(records.schema, written_by_us)
        frames.append(records.select(pl.coalesce(raw_id, row_label).alias("eval_id"), scored_text().alias("text")))
    items = pl.concat(frames) if frames else pl.DataFrame(schema={"eval_id": pl.String, "text": pl.String})
    return items.with_row_index("eval_order").select("eval_order", "eval_id", "text")


def contamination(
    rows: pl.LazyFrame, text: str, items: pl.DataFrame, n: int, min_overlap: float, min_matching: int
) -> pl.LazyFrame:
    """Per row of `rows` (same order): `contamination_eval_id` (the eval item whose n-grams the row covers
    most, if it covers ≥ min_overlap of them and ≥ min_matching n-grams; ties: first in file order; else
    null), `contamination_overlap` (that share, 0..1, for the best item even below the threshold) and
    `contamination_ngram_matches` (n-grams shared with that item)."""
    indexed = rows.select(pl.col(text)).with_row_index("__row")
    item_grams = ngram_hashes(items.lazy(), "eval_order", "text", n)
    totals = item_grams.group_by("eval_order").agg(pl.len().alias("__total"))
    eval_grams = item_grams.group_by("gram").agg(pl.col("eval_order")).explode("eval_order")
    best = (
        ngram_hashes(indexed, "__row", text, n)
        .join(eval_grams, on="gram", how="inner")
        .group_by("__row", "eval_order")
        .agg(pl.len().alias("shared"))
        .join(totals, on="eval_order", how="left")
        .with_columns((pl.col("shared") / pl.col("__total")).alias("overlap"))
        .sort(["__row", "overlap", "eval_order"], descending=[False, True, False])
        .group_by("__row", maintain_order=True)
        .first()
        .join(items.lazy().select("eval_order", "eval_id"), on="eval_order", how="left")
    )
    matched = (pl.col("overlap") >= min_overlap) & (pl.col("shared") >= min_matching)
    return (
        indexed.select("__row")
        .join(best, on="__row", how="left", maintain_order="left")
        .select(
            pl.when(matched).then(pl.col("eval_id")).alias("contamination_eval_id"),
            pl.col("overlap").fill_null(0.0).cast(pl.Float64).alias("contamination_overlap"),
            pl.col("shared").fill_null(0).cast(pl.Int64).alias("contamination_ngram_matches"),
        )
    )
