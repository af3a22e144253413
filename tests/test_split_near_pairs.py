"""The split's prompt grouping out of core: `near_duplicate_pairs` over a Parquet file of prompts, in
batches far smaller than the input, finds exactly the pairs of the in-memory `similar_pairs` with the
number-variant rule the split applies (and without it, exactly `similar_pairs`); and the split stage
leaves no work files behind."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from curate.cli import main
from curate.dedup import number_masked, number_variant, numbers_in, similar_pairs
from curate.dedup.banding import BucketGuard, band_table_from, candidate_pairs, lsh_params
from curate.dedup.near_pairs import near_duplicate_pairs
from curate.dedup.settings import MinHashSettings
from curate.dedup.signatures import signatures_of
from curate.dedup.text import shingle_sets

# Simplified prompts as the split sees them (lowercase, whitespace folded), in shapes users bring.
PROMPTS = [
    "how do i reset my password?",
    "how can i reset my password?",
    "how do i reset my password, please?",
    "my package was marked as delivered yesterday but it is not at my door. what should i do?",
    "my package was marked as delivered yesterday, but it isn't at my door. what should i do now?",
    "what is 17+25?",
    "what is 18+25?",  # a number variant of the one above: a distinct question
    "what is 17 + 25?",
    "convert 3 miles to kilometres and show the steps.",
    "convert 30 miles to kilometres and show the steps.",
    "",
    "hi",
    "hi",
    "ok",
    "can i change the email address on my account without losing my order history?",
    "can i change the e-mail address on my account without losing my order history?",
    "why was i charged twice for the same order this month?",
    "write a haiku about autumn leaves \x1e here is one: red leaves drift and fall \x1e another please",
    "write a haiku about autumn leaves \x1e here is one: red leaves drift and fall \x1e one more please",
]
# A templated prompt sent for many customers: more than 64 rows share its bands (the bucket guard's cap).
NAMES = [first + last for first in ("an", "bo", "cy", "di", "ed", "fa", "gu", "ha", "io") for last in ("ra", "mo", "ti", "sel", "vek", "lund", "dor", "qui", "zen")]
TEMPLATED = [
    f"please write a short, friendly reply to the customer {name} who asked about the late delivery of their order "
    "and offer a voucher for the next purchase" for name in NAMES
]


def _reference(texts: list[str], threshold: float, distinct_number_variants: bool) -> tuple[np.ndarray, np.ndarray]:
    """What the split computed in memory before: `similar_pairs`, then pairs differing only in numbers out."""
    series = pl.Series(texts, dtype=pl.String)
    a, b = similar_pairs(series, threshold)
    if distinct_number_variants:
        masks = pl.select(number_masked(pl.lit(series)).alias("m"), numbers_in(pl.lit(series)).alias("n"))
        distinct = ~number_variant(masks["m"], masks["n"], a, b)
        a, b = a[distinct], b[distinct]
    return a, b


def _write(tmp_path, texts):
    path = tmp_path / "prompts.parquet"
    pl.DataFrame({"prompt": texts}).write_parquet(path, row_group_size=4)
    return path


def test_the_fixture_has_pairs_number_variants_and_a_capped_bucket():
    texts = PROMPTS + TEMPLATED
    with_variants = _reference(texts, 0.7, distinct_number_variants=False)
    without = _reference(texts, 0.7, distinct_number_variants=True)
    assert len(without[0]) > 20
    assert len(with_variants[0]) > len(without[0])  # some pairs differ only in their numbers
    settings = MinHashSettings()
    sets = shingle_sets(pl.Series(texts), settings)
    bands, rows = lsh_params(0.6, settings.num_perm, 0.2, 0.8)
    guard = BucketGuard()
    candidate_pairs(band_table_from(signatures_of(sets, settings), sets.sizes > 0, bands, rows), 64, guard=guard)
    assert guard.capped_buckets > 0


def test_out_of_core_pairs_equal_the_in_memory_ones_in_small_batches(tmp_path):
    texts = PROMPTS + TEMPLATED
    # Steps of 40 hashes: every pair is a step of its own and its sets are read from several blocks.
    for threshold, distinct, step_values in ((0.7, True, 40), (0.7, False, 40), (0.5, True, 10**6), (0.5, False, 40)):
        work = tmp_path / f"work-{threshold}-{distinct}-{step_values}"
        work.mkdir()
        left, right = near_duplicate_pairs(
            _write(tmp_path, texts), "prompt", threshold, work, distinct_number_variants=distinct, batch_rows=5, step_values=step_values
        )
        expected = _reference(texts, threshold, distinct)
        np.testing.assert_array_equal(left, expected[0])
        np.testing.assert_array_equal(right, expected[1])


def test_empty_and_pairless_inputs(tmp_path):
    for number, texts in enumerate(([], ["", ""], ["alpha beta gamma", "an unrelated sentence entirely"])):
        work = tmp_path / f"work [{number}]"  # glob characters in a path are names, not patterns
        work.mkdir()
        path = tmp_path / "prompts.parquet"
        pl.DataFrame({"prompt": texts}, schema={"prompt": pl.String}).write_parquet(path)
        left, right = near_duplicate_pairs(path, "prompt", 0.7, work, batch_rows=1)
        assert len(left) == len(right) == 0


def test_split_stage_groups_near_prompts_and_leaves_no_work_files(tmp_path):
    groups = [PROMPTS[3:5], TEMPLATED[:4], PROMPTS[14:16], *([prompt] for prompt in PROMPTS[0:3])]
    records = [
        {
            "prompt": [{"role": "user", "content": question.upper()}],
            "chosen": [{"role": "assistant", "content": f"Answer {index}."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
        for index, question in enumerate(question for group in groups for question in group)
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["split", str(source), "--out", str(out), "--validation", "0.33", "--test", "0.33", "--quiet"]) == 0
    assert [path.name for path in (out / "split").iterdir() if path.name.startswith("work")] == []
    rows = pl.concat(
        pl.read_parquet(path).with_columns(pl.lit(path.name.split("-")[0]).alias("split"))
        for path in (out / "pref").glob("*.parquet")
    ).with_columns(pl.col("prompt").list.first().struct.field("content").str.to_lowercase().alias("simplified"))
    assert rows.height == len(records)
    for group in groups:  # each group's near-duplicate prompts lie in one split
        assert rows.filter(pl.col("simplified").is_in(group))["split"].n_unique() == 1, group[0]
