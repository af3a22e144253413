"""Aggregate several annotators' answers into one decision per record, and measure their agreement.

Input: the long table of submitted answers `pull.py` fetches (one row per record × annotator × question).
All aggregation is Polars group-bys; Krippendorff's alpha is numpy on a units × values count matrix.

Policies (documented in docs/labeling.md):
- quality (rating 1–5): the median of the submitted ratings (mean of the two middle ones for an even count).
- decision (keep | discard): a row is discarded only when a strict majority of its annotators chose
  discard; a tie keeps it (discarding data is the irreversible choice, so it needs a majority).
- preference (ranking of response A/B, or label A/B/tie): Borda count. In a ranking of k items an item at
  rank r earns k − r points (items sharing a rank earn the same); a label vote gives the named response
  1 point, `tie` gives both ½. The response with more points wins; equal points are a tie, which the
  pull config resolves (`preference_tie`: keep the original order, hold back or drop).
- corrected_response: the most frequent non-empty correction (after trimming whitespace); between
  equally frequent corrections, the one from the annotator whose username sorts first.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

ANSWER_SCHEMA = {
    "record_id": pl.String,
    "user": pl.String,
    "question": pl.String,
    "value": pl.String,
}
RANKING_SCHEMA = {"record_id": pl.String, "user": pl.String, "slot": pl.String, "rank": pl.Int64}


def krippendorff_alpha(units: pl.DataFrame, metric: str = "nominal") -> float | None:
    """Krippendorff's alpha from a long table with columns `unit` and `value` (one row per answer).

    `metric`: "nominal" (labels), "ordinal" (ratings) or "interval". Units with fewer than two answers
    are not pairable and are ignored. None when there is nothing to compare or no variation at all."""
    if units.height == 0:
        return None
    counts = units.group_by("unit", "value").len()
    values = sorted(counts["value"].unique().to_list())
    if metric != "nominal":
        values = sorted(values, key=float)
    index = {value: position for position, value in enumerate(values)}
    unit_ids = counts["unit"].unique().sort()
    unit_index = {unit: position for position, unit in enumerate(unit_ids.to_list())}
    matrix = np.zeros((len(unit_index), len(values)))
    rows = np.array([unit_index[u] for u in counts["unit"].to_list()], dtype=np.int64)
    cols = np.array([index[v] for v in counts["value"].to_list()], dtype=np.int64)
    matrix[rows, cols] = counts["len"].to_numpy()
    per_unit = matrix.sum(axis=1)
    pairable = per_unit >= 2
    matrix, per_unit = matrix[pairable], per_unit[pairable]
    if matrix.shape[0] == 0:
        return None
    weights = 1.0 / (per_unit - 1.0)
    coincidence = (matrix * weights[:, None]).T @ matrix - np.diag((matrix * weights[:, None]).sum(axis=0))
    marginals = coincidence.sum(axis=1)
    total = marginals.sum()
    if total <= 1:
        return None
    delta = _distance_matrix(values, marginals, metric)
    observed = (coincidence * delta).sum() / total
    expected = (np.outer(marginals, marginals) * delta).sum() / (total * (total - 1))
    if expected == 0:
        return None
    alpha = 1.0 - observed / expected
    return None if math.isnan(alpha) else round(float(alpha), 6)


def _distance_matrix(values: list, marginals: np.ndarray, metric: str) -> np.ndarray:
    size = len(values)
    if metric == "nominal":
        return 1.0 - np.eye(size)
    if metric == "interval":
        numbers = np.array([float(v) for v in values])
        return (numbers[:, None] - numbers[None, :]) ** 2
    if metric == "ordinal":
        cumulative = np.concatenate([[0.0], np.cumsum(marginals)])
        low = np.minimum.outer(np.arange(size), np.arange(size))
        high = np.maximum.outer(np.arange(size), np.arange(size))
        between = cumulative[high + 1] - cumulative[low]
        return (between - (marginals[low] + marginals[high]) / 2.0) ** 2
    raise ValueError(f"unknown metric {metric!r}")


def aggregate_answers(answers: pl.DataFrame, rankings: pl.DataFrame, preference_kind: str = "ranking") -> pl.DataFrame:
    """One row per record: label_n_responses, label_quality, label_decision, label_discard_votes,
    label_correction, label_corrected_by, label_preference ("a" | "b" | "tie"), label_borda_a/b."""
    answers = answers.with_columns(pl.col("value").str.strip_chars())
    responders = answers.group_by("record_id").agg(pl.col("user").n_unique().alias("label_n_responses"))
    quality = (
        answers.filter(pl.col("question") == "quality")
        .group_by("record_id")
        .agg(pl.col("value").cast(pl.Float64).median().alias("label_quality"))
    )
    decision = (
        answers.filter(pl.col("question") == "decision")
        .group_by("record_id")
        .agg(
            (pl.col("value") == "discard").sum().alias("label_discard_votes"),
            (pl.col("value") == "keep").sum().alias("label_keep_votes"),
        )
        .with_columns(
            pl.when(pl.col("label_discard_votes") > pl.col("label_keep_votes"))
            .then(pl.lit("discard"))
            .otherwise(pl.lit("keep"))
            .alias("label_decision")
        )
    )
    correction = (
        answers.filter((pl.col("question") == "corrected_response") & (pl.col("value") != ""))
        .group_by("record_id", "value")
        .agg(pl.len().alias("votes"), pl.col("user").min().alias("first_user"))
        .sort(["record_id", "votes", "first_user"], descending=[False, True, False])
        .group_by("record_id", maintain_order=True)
        .first()
        .select("record_id", pl.col("value").alias("label_correction"), pl.col("first_user").alias("label_corrected_by"))
    )
    borda = preference_points(answers, rankings, preference_kind)
    result = responders
    for part in (quality, decision, correction, borda):
        result = result.join(part, on="record_id", how="left")
    return result.sort("record_id")


def preference_points(answers: pl.DataFrame, rankings: pl.DataFrame, preference_kind: str) -> pl.DataFrame:
    """Borda points of response A and B per record, and the winner ("a", "b" or "tie")."""
    if preference_kind == "ranking":
        sizes = rankings.group_by("record_id", "user").agg(pl.len().alias("items"))
        points = rankings.join(sizes, on=["record_id", "user"]).with_columns(
            (pl.col("items") - pl.col("rank")).cast(pl.Float64).alias("points")
        )
    else:
        votes = answers.filter(pl.col("question") == "preference")
        points = pl.concat(
            [
                votes.select(
                    "record_id",
                    pl.lit(slot).alias("slot"),
                    pl.when(pl.col("value") == slot)
                    .then(1.0)
                    .when(pl.col("value") == "tie")
                    .then(0.5)
                    .otherwise(0.0)
                    .alias("points"),
                )
                for slot in ("response_a", "response_b")
            ]
        )
    totals = points.group_by("record_id").agg(
        pl.col("points").filter(pl.col("slot") == "response_a").sum().alias("label_borda_a"),
        pl.col("points").filter(pl.col("slot") == "response_b").sum().alias("label_borda_b"),
        pl.len().alias("__answers"),
    )
    return totals.filter(pl.col("__answers") > 0).select(
        "record_id",
        "label_borda_a",
        "label_borda_b",
        pl.when(pl.col("label_borda_a") > pl.col("label_borda_b"))
        .then(pl.lit("a"))
        .when(pl.col("label_borda_b") > pl.col("label_borda_a"))
        .then(pl.lit("b"))
        .otherwise(pl.lit("tie"))
        .alias("label_preference"),
    )


def agreement(answers: pl.DataFrame, rankings: pl.DataFrame, preference_kind: str) -> dict[str, float | None]:
    """Krippendorff's alpha per question: ordinal for quality, nominal for decision and preference
    (for rankings: each annotator's top choice, `tie` when they ranked both first)."""
    result: dict[str, float | None] = {}
    rankings = rankings.filter(pl.col("rank").is_not_null())
    by_question = {
        question: answers.filter(pl.col("question") == question).select(pl.col("record_id").alias("unit"), "value")
        for question in ("quality", "decision")
    }
    result["quality"] = krippendorff_alpha(by_question["quality"], "ordinal")
    result["decision"] = krippendorff_alpha(by_question["decision"], "nominal")
    if preference_kind == "ranking":
        top = (
            rankings.filter(pl.col("rank") == pl.col("rank").min().over("record_id", "user"))
            .group_by("record_id", "user")
            .agg(pl.col("slot").sort())
            .select(
                pl.col("record_id").alias("unit"),
                pl.when(pl.col("slot").list.len() > 1).then(pl.lit("tie")).otherwise(pl.col("slot").list.first()).alias("value"),
            )
        )
    else:
        top = answers.filter(pl.col("question") == "preference").select(pl.col("record_id").alias("unit"), "value")
    result["preference"] = krippendorff_alpha(top, "nominal")
    return result
