"""`curate label pull`: fetch submitted responses, aggregate them, apply them to the rows.

Answers are read over REST (`GET /api/v1/datasets/{id}/records?include=responses`, from the server's
database, so the search index plays no part) because the SDK turns ranking answers into plain lists and
loses ties. Only `submitted` responses count; drafts and discarded responses are ignored.

Applying the aggregate to the rows that were pushed (`apply_labels`):
- fewer than `min_responses` annotators → `insufficient`: keep (unchanged), hold back (dropped with
  reason `label_held_back`, to label later) or drop (reason `label_insufficient_responses`);
- majority discard → dropped with reason `annotator_discard`;
- SFT row with a correction → the final assistant message is replaced, the original kept in
  `label_original_response`, the old id in `label_source_id`, the id recomputed from the new content;
  with `corrections_as_pairs` a new preference row (prompt = the conversation before the reply,
  chosen = correction, rejected = original) is added (`label_origin` = "correction");
- preference row: the Borda winner becomes `chosen` (swapped when annotators preferred the original
  rejected one; `label_swapped`); a tie is resolved by `preference_tie` (keep the original order, hold
  back, drop).
"""

from __future__ import annotations

import json

import polars as pl

from curate.label import schema
from curate.label.aggregate import ANSWER_SCHEMA, RANKING_SCHEMA, aggregate_answers, agreement
from curate.label.client import Connection, RestApi, check_server
from curate.records import message_struct, with_record_id
from curate.stage import drop_rows

PAGE = 1000


def fetch_answers(api: RestApi, dataset: dict) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Submitted answers of one dataset as long tables (answers, rankings) plus dataset facts."""
    questions = api.call("GET", f"/api/v1/datasets/{dataset['id']}/questions", "listing questions")["items"]
    question_types = {item["name"]: item["settings"]["type"] for item in questions}
    try:
        usernames = api.usernames()
    except Exception:  # noqa: BLE001 - a non-owner key cannot list users; ids then stand in
        usernames = {}
    answers: list[tuple] = []
    rankings: list[tuple] = []
    records_seen = 0
    offset = 0
    while True:
        page = api.call(
            "GET",
            f"/api/v1/datasets/{dataset['id']}/records",
            f"reading records of {dataset['name']!r}",
            params={"include": "responses", "offset": offset, "limit": PAGE},
        )
        items = page["items"]
        for record in items:
            records_seen += 1
            key = record.get("external_id") or record["id"]
            for response in record.get("responses") or []:
                if response.get("status") != "submitted":
                    continue
                user = usernames.get(response["user_id"], response["user_id"])
                for question, answer in (response.get("values") or {}).items():
                    value = answer.get("value") if isinstance(answer, dict) else None
                    if value is None:
                        continue
                    if question_types.get(question) == "ranking":
                        for item in value:
                            rankings.append((key, user, item["value"], item.get("rank")))
                        value = json.dumps(value, sort_keys=True)
                    answers.append((key, user, question, str(value)))
        offset += len(items)
        if len(items) < PAGE:
            break
    answers_frame = pl.DataFrame(answers, schema=ANSWER_SCHEMA, orient="row")
    rankings_frame = pl.DataFrame(rankings, schema=RANKING_SCHEMA, orient="row")
    preference_kind = "ranking" if question_types.get("preference") == "ranking" else "label"
    facts = {"dataset_id": dataset["id"], "records": records_seen, "preference_question": preference_kind}
    return answers_frame, rankings_frame, facts


def pull_labels(frame: pl.DataFrame, connection: Connection, dataset: str, workspace: str, max_retries: int = 5):
    """Fetch and aggregate answers for the kinds present in `frame`.

    Returns (aggregates: one row per record id, report: per dataset records/answers/annotators/agreement)."""
    check_server(connection)
    api = RestApi(connection, max_retries)
    parts = []
    report: dict = {}
    for kind in ("sft", "preference"):
        if frame.filter(pl.col("kind") == kind).height == 0:
            continue
        name = schema.dataset_name(dataset, kind)
        found = api.find_dataset(name, workspace)
        if found is None:
            report[name] = {"found": False}
            continue
        answers, rankings, facts = fetch_answers(api, found)
        aggregated = aggregate_answers(answers, rankings, facts["preference_question"])
        parts.append(aggregated)
        alphas = agreement(answers, rankings, facts["preference_question"])
        if kind == "sft":
            alphas.pop("preference", None)
            facts.pop("preference_question")
        report[name] = {
            "found": True,
            **facts,
            "answers": answers.height,
            "annotators": answers["user"].n_unique(),
            "records_with_responses": aggregated.height,
            "agreement_krippendorff_alpha": alphas,
        }
    if parts:
        aggregates = pl.concat(parts, how="diagonal_relaxed")
    else:
        aggregates = aggregate_answers(
            pl.DataFrame(schema=ANSWER_SCHEMA), pl.DataFrame(schema=RANKING_SCHEMA), "ranking"
        )
    return aggregates, report


LABEL_COLUMNS = {
    "label_n_responses": pl.Int64,
    "label_quality": pl.Float64,
    "label_decision": pl.String,
    "label_discard_votes": pl.Int64,
    "label_keep_votes": pl.Int64,
    "label_correction": pl.String,
    "label_corrected_by": pl.String,
    "label_borda_a": pl.Float64,
    "label_borda_b": pl.Float64,
    "label_preference": pl.String,
}


def apply_labels(
    frame: pl.DataFrame,
    aggregates: pl.DataFrame,
    stage: str,
    min_responses: int = 1,
    insufficient: str = "keep",
    preference_tie: str = "keep",
    corrections_as_pairs: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Apply aggregated labels to the pushed rows; returns (kept, dropped, counts)."""
    original_columns = frame.columns
    if "record_id" not in aggregates.columns:
        aggregates = pl.DataFrame(schema={"record_id": pl.String})
    aggregates = aggregates.select(
        "record_id", *[pl.col(c).cast(t) if c in aggregates.columns else pl.lit(None, t).alias(c) for c, t in LABEL_COLUMNS.items()]
    )
    frame = schema.with_record_keys(frame).join(
        aggregates, left_on="label_record_id", right_on="record_id", how="left", maintain_order="left"
    )
    frame = frame.with_columns(pl.col("label_n_responses").fill_null(0))
    enough = pl.col("label_n_responses") >= min_responses
    is_tie = (pl.col("kind") == "preference") & (pl.col("label_preference") == "tie")
    outcome = (
        pl.when(~enough)
        .then(pl.lit("insufficient"))
        .when(pl.col("label_decision") == "discard")
        .then(pl.lit("discard"))
        .when(is_tie)
        .then(pl.lit("tie"))
        .otherwise(pl.lit("labeled"))
    )
    frame = frame.with_columns(outcome.alias("label_outcome"))
    drop_reason = (
        pl.when(pl.col("label_outcome") == "discard")
        .then(pl.lit("annotator_discard"))
        .when((pl.col("label_outcome") == "insufficient") & pl.lit(insufficient == "hold_back"))
        .then(pl.lit("label_held_back"))
        .when((pl.col("label_outcome") == "insufficient") & pl.lit(insufficient == "drop"))
        .then(pl.lit("label_insufficient_responses"))
        .when((pl.col("label_outcome") == "tie") & pl.lit(preference_tie == "hold_back"))
        .then(pl.lit("label_held_back"))
        .when((pl.col("label_outcome") == "tie") & pl.lit(preference_tie == "drop"))
        .then(pl.lit("label_preference_tie"))
    )
    frame = frame.with_columns(drop_reason.alias("__drop_reason"))
    dropped = drop_rows(frame.filter(pl.col("__drop_reason").is_not_null()).lazy(), stage, pl.col("__drop_reason"))
    dropped = dropped.drop("__drop_reason").collect()
    kept = frame.filter(pl.col("__drop_reason").is_null()).drop("__drop_reason")

    labeled = pl.col("label_outcome").is_in(["labeled", "tie"])
    # SFT corrections: replace the final assistant message, keep the original as provenance.
    corrected = (pl.col("kind") == "sft") & labeled & pl.col("label_correction").is_not_null()
    last_reply = pl.col("messages").list.last().struct.field("content")
    kept = kept.with_columns(
        corrected.alias("label_corrected"),
        pl.when(corrected).then(last_reply).alias("label_original_response"),
    )
    # Preference: the Borda winner becomes `chosen`.
    a_is_chosen = schema.a_is_chosen_expr()
    winner_is_rejected = (pl.col("kind") == "preference") & labeled & (
        ((pl.col("label_preference") == "a") & ~a_is_chosen) | ((pl.col("label_preference") == "b") & a_is_chosen)
    )
    kept = kept.with_columns(winner_is_rejected.fill_null(False).alias("label_swapped"))
    changed = pl.col("label_corrected") | pl.col("label_swapped")
    new_messages = pl.concat_list(
        pl.col("messages").list.slice(0, pl.col("messages").list.len() - 1),
        pl.concat_list(message_struct(pl.lit("assistant"), pl.col("label_correction"))),
    )
    kept = kept.with_columns(
        pl.when(changed).then(pl.col("id")).alias("label_source_id"),
        pl.when(pl.col("label_corrected")).then(new_messages).otherwise(pl.col("messages")).alias("messages"),
        pl.when(pl.col("label_swapped")).then(pl.col("rejected")).otherwise(pl.col("chosen")).alias("chosen"),
        pl.when(pl.col("label_swapped")).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected"),
        pl.lit("pushed").alias("label_origin"),
    )
    # Content changed → the content-hash id changes too (label_source_id keeps the old one).
    kept = kept.with_columns(
        pl.when(changed).then(with_record_id(kept).get_column("id")).otherwise(pl.col("id")).alias("id")
    )
    pairs = pl.DataFrame()
    if corrections_as_pairs:
        source_rows = kept.filter(pl.col("label_corrected"))
        if source_rows.height:
            pairs = source_rows.with_columns(
                pl.lit("preference").alias("kind"),
                pl.col("messages").list.slice(0, pl.col("messages").list.len() - 1).alias("prompt"),
                pl.col("messages").list.slice(-1, 1).alias("chosen"),
                pl.concat_list(message_struct(pl.lit("assistant"), pl.col("label_original_response"))).alias("rejected"),
                pl.lit(None, frame.schema["messages"]).alias("messages"),
                pl.lit("correction").alias("label_origin"),
                pl.lit(False).alias("label_corrected"),
            )
            pairs = with_record_id(pairs)
    if pairs.height:
        kept = pl.concat([kept, pairs.select(kept.columns)], how="vertical_relaxed")
    label_columns = [c for c in kept.columns if c not in original_columns]
    kept = kept.select(*original_columns, *label_columns)
    counts = {
        "rows_in": frame.height,
        "labeled": int((frame["label_outcome"] == "labeled").sum()),
        "insufficient_responses": int((frame["label_outcome"] == "insufficient").sum()),
        "insufficient_policy": insufficient,
        "annotator_discard": int((frame["label_outcome"] == "discard").sum()),
        "preference_ties": int((frame["label_outcome"] == "tie").sum()),
        "preference_tie_policy": preference_tie,
        "held_back": int((dropped["reason"] == "label_held_back").sum()) if dropped.height else 0,
        "corrected": int(kept["label_corrected"].fill_null(False).sum()),
        "swapped_preferences": int(kept["label_swapped"].fill_null(False).sum()),
        "pairs_from_corrections": pairs.height,
        "rows_out": kept.height,
        "dropped": dropped.height,
    }
    return kept, dropped, counts
