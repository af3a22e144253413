"""What annotators see and answer: the Argilla dataset settings for each record kind, and the mapping
between our rows and Argilla records (record ids, A/B placement of preference responses, metadata).

SFT rows → dataset `<name>-sft`:
  field `conversation` (chat), questions `quality` (rating 1–5), `decision` (keep | discard),
  `corrected_response` (optional text: a better final assistant reply).
Preference rows → dataset `<name>-pref`:
  fields `prompt` (chat), `response_a`, `response_b` (text); questions `preference` (ranking of the two
  responses, or a label `response_a | response_b | tie`), `quality` (rating 1–5 of the better response),
  `decision` (optional keep | discard).

Which of chosen/rejected is shown as A is decided by the row id (last hex digit even → chosen is A), so
annotators see no position pattern, and pull recomputes the placement from the id alone.

Record ids: our row `id` (exact duplicates share it). If a frame still holds several rows with one id
(no exact dedup before labeling), those rows get `<id>-<8 hex of sha256(source.file, source.row)>`,
so every row is its own record and a re-push still maps each row to the same record.
"""

from __future__ import annotations

import math
import re

import polars as pl

from curate.errors import ConfigError
from schemas import CANONICAL_SCHEMA

RATING_VALUES = [1, 2, 3, 4, 5]
DECISION_LABELS = ["keep", "discard"]
PREFERENCE_LABELS = ["response_a", "response_b", "tie"]
RESPONSE_SLOTS = ["response_a", "response_b"]
QUESTIONS_BY_KIND = {
    "sft": {"quality": "rating", "decision": "label", "corrected_response": "text"},
    "preference": {"preference": "ranking", "quality": "rating", "decision": "label"},
}


# A dataset name becomes a file name (push state: `<state-dir>/<name>-sft.pushed.tsv`) and a server name:
# letters, digits, `_`, `-` and inner dots only, so it can never be a path (`../../x`) or a hidden file.
DATASET_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$"


def check_dataset_name(name: str) -> str:
    """`name` if it is a safe dataset base name, else a one-line ConfigError saying what is allowed."""
    if not isinstance(name, str) or not re.fullmatch(DATASET_NAME_PATTERN, name):
        raise ConfigError(
            f"dataset name {name!r}: use 1-100 letters, digits, '_', '-' or '.' (not first); "
            "it becomes a file name and must not be a path"
        )
    return name


def dataset_name(base: str, kind: str) -> str:
    return f"{check_dataset_name(base)}-{'sft' if kind == 'sft' else 'pref'}"


def record_key_expr() -> pl.Expr:
    """Argilla record id for each row (see the module docstring)."""
    source_hash = (
        pl.concat_str(
            pl.col("source").struct.field("file").fill_null(""),
            pl.col("source").struct.field("row").cast(pl.String).fill_null(""),
            separator="\x1f",
        )
        .chash.sha2_256()
        .str.slice(0, 8)
    )
    duplicated = pl.len().over("id") > 1
    return pl.when(duplicated).then(pl.col("id") + pl.lit("-") + source_hash).otherwise(pl.col("id"))


def with_record_keys(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(record_key_expr().alias("label_record_id"))


def a_is_chosen_expr() -> pl.Expr:
    """True when the chosen response is shown as response A (last hex digit of the id is even)."""
    return pl.col("id").str.slice(-1).str.to_integer(base=16, strict=False).fill_null(0) % 2 == 0


_METADATA_NAME = re.compile(r"[^a-z0-9_-]+")


def metadata_name(column: str) -> str:
    name = _METADATA_NAME.sub("_", column.lower()).strip("_") or "score"
    return name[:200]


def metadata_columns(schema: pl.Schema, wanted: list[str] | None) -> dict[str, str]:
    """Score columns that become Argilla metadata: {column: "float" | "integer" | "terms"}.

    By default every non-canonical column of a scalar type (scores, flags, language codes);
    `wanted` restricts them to a list."""
    result: dict[str, str] = {}
    for column, dtype in schema.items():
        if column in CANONICAL_SCHEMA or column.startswith("label_"):
            continue
        if wanted is not None and column not in wanted:
            continue
        if dtype.is_float() or dtype.is_decimal():
            result[column] = "float"
        elif dtype.is_integer():
            result[column] = "integer"
        elif dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dtype, pl.Enum):
            result[column] = "terms"
    return result


def metadata_properties(columns: dict[str, str]):
    import argilla as rg

    properties = [
        rg.TermsMetadataProperty(name="source_file", title="Source file"),
        rg.IntegerMetadataProperty(name="source_row", title="Source row"),
    ]
    for column, kind in columns.items():
        name = metadata_name(column)
        if kind == "float":
            properties.append(rg.FloatMetadataProperty(name=name, title=column))
        elif kind == "integer":
            properties.append(rg.IntegerMetadataProperty(name=name, title=column))
        else:
            properties.append(rg.TermsMetadataProperty(name=name, title=column))
    return properties


def sft_settings(columns: dict[str, str], min_submitted: int):
    import argilla as rg

    return rg.Settings(
        guidelines=(
            "Rate the assistant's replies in this support conversation (1 = harmful or useless, "
            "5 = exemplary). Choose discard for conversations that should not be trained on. "
            "If the final assistant reply can be fixed, write the corrected reply."
        ),
        fields=[rg.ChatField(name="conversation", title="Conversation", use_markdown=True)],
        questions=[
            rg.RatingQuestion(name="quality", title="Quality of the assistant's replies", values=RATING_VALUES),
            rg.LabelQuestion(name="decision", title="Keep for training?", labels=DECISION_LABELS),
            rg.TextQuestion(
                name="corrected_response",
                title="Corrected final assistant reply (leave empty if it is fine)",
                required=False,
                use_markdown=True,
            ),
        ],
        metadata=metadata_properties(columns),
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
        allow_extra_metadata=True,
    )


def preference_settings(columns: dict[str, str], min_submitted: int, question: str):
    import argilla as rg

    if question == "ranking":
        preference = rg.RankingQuestion(
            name="preference",
            title="Rank the responses (1 = better)",
            values={"response_a": "Response A", "response_b": "Response B"},
        )
    else:
        preference = rg.LabelQuestion(name="preference", title="Which response is better?", labels=PREFERENCE_LABELS)
    return rg.Settings(
        guidelines="Compare the two responses to the prompt and pick the better one; rate the better response.",
        fields=[
            rg.ChatField(name="prompt", title="Prompt", use_markdown=True),
            rg.TextField(name="response_a", title="Response A", use_markdown=True),
            rg.TextField(name="response_b", title="Response B", use_markdown=True),
        ],
        questions=[
            preference,
            rg.RatingQuestion(name="quality", title="Quality of the better response", values=RATING_VALUES),
            rg.LabelQuestion(name="decision", title="Keep for training?", labels=DECISION_LABELS, required=False),
        ],
        metadata=metadata_properties(columns),
        distribution=rg.TaskDistribution(min_submitted=min_submitted),
        allow_extra_metadata=True,
    )


def _clean_metadata_value(value, kind: str):
    if value is None:
        return None
    if kind == "float":
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if kind == "integer":
        return int(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def record_payloads(frame: pl.DataFrame, kind: str, columns: dict[str, str], suggestions: dict[str, str]) -> list[dict]:
    """Plain-dict payloads (id, fields, metadata, suggestions) for the rows of one kind.

    This builds one request body per record for the SDK, which is per-row work by nature; it is not a
    curation hot path (labeling sets are sized for people)."""
    if kind == "preference":
        frame = frame.with_columns(a_is_chosen_expr().alias("__a_is_chosen"))
    payloads = []
    for row in frame.iter_rows(named=True):
        source = row.get("source") or {}
        metadata = {"source_file": source.get("file"), "source_row": source.get("row")}
        for column, column_kind in columns.items():
            metadata[metadata_name(column)] = _clean_metadata_value(row.get(column), column_kind)
        metadata = {key: value for key, value in metadata.items() if value is not None}
        if kind == "sft":
            fields = {"conversation": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}
        else:
            chosen = row["chosen"][0]["content"]
            rejected = row["rejected"][0]["content"]
            a, b = (chosen, rejected) if row["__a_is_chosen"] else (rejected, chosen)
            fields = {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
                "response_a": a,
                "response_b": b,
            }
        suggested = []
        for question, column in sorted(suggestions.items()):
            value = _suggestion_value(question, row.get(column))
            if value is not None:
                suggested.append({"question_name": question, "value": value})
        payloads.append({"id": row["label_record_id"], "fields": fields, "metadata": metadata, "suggestions": suggested})
    return payloads


def _suggestion_value(question: str, value):
    if value is None:
        return None
    if question == "quality":
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(min(5, max(1, round(float(value)))))
    if question == "decision":
        if isinstance(value, bool):
            return "keep" if value else "discard"
        return str(value) if str(value) in DECISION_LABELS else None
    return None


SUGGESTABLE_QUESTIONS = ("quality", "decision")
