"""What annotators see and answer: the Argilla dataset settings for each record kind, and the mapping
between our rows and Argilla records (record ids, A/B placement of preference responses, metadata).

SFT rows → dataset `<name>-sft`:
  field `conversation` (chat), questions `quality` (rating 1–5), `decision` (keep | discard),
  `corrected_response` (optional text: a better final assistant reply).
Preference rows → dataset `<name>-pref`:
  fields `prompt` (chat), `response_a`, `response_b` (text); questions `preference` (by default a label
  "Which answer is better?" with the choices A / B / Tie; or a ranking of the two responses),
  `quality` (optional rating 1–5 of the better response), `decision` (optional keep | discard).

Guidelines (what annotators read first) come from a Markdown file of the user's, else a short default.
Metadata (filterable in the UI) is only the columns asked for; by default `source_file`, `source_row`
and `lang` — where a row came from, to trace it back, and its language, to route it to annotators who
read it. Scores are not pushed unless asked: shown to annotators they anchor their judgement.

Which of chosen/rejected is shown as A is decided by the row id (last hex digit even → chosen is A), so
annotators see no position pattern, and pull recomputes the placement from the id alone.

Record ids: our row `id` (exact duplicates share it). If a frame still holds several rows with one id
(no exact dedup before labeling), those rows get `<id>-<8 hex of sha256(source.file, source.row)>`,
so every row is its own record and a re-push still maps each row to the same record.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl

from curate.errors import ConfigError
from schemas import CANONICAL_SCHEMA

RATING_VALUES = [1, 2, 3, 4, 5]
DECISION_LABELS = ["keep", "discard"]
# Stored values stay response_a / response_b / tie (what aggregation counts); annotators see A / B / Tie.
PREFERENCE_LABELS = {"response_a": "A", "response_b": "B", "tie": "Tie (equally good or equally bad)"}
PREFERENCE_QUESTIONS = ("label", "ranking")
DEFAULT_METADATA_COLUMNS = ("source_file", "source_row", "lang")
SFT_GUIDELINES = (
    "Rate the assistant's replies in this conversation (1 = harmful or useless, 5 = exemplary). "
    "Choose discard for conversations that should not be trained on. "
    "If the final assistant reply can be fixed, write the corrected reply."
)
PREFERENCE_GUIDELINES = (
    "Read the prompt and both answers, then say which answer is better: A, B, or Tie when neither is better. "
    "Optionally rate the better answer (1 = harmful or useless, 5 = exemplary)."
)
RESPONSE_SLOTS = ["response_a", "response_b"]
QUESTIONS_BY_KIND = {"sft": ("quality", "decision", "corrected_response"), "preference": ("preference", "quality", "decision")}


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
_SOURCE_METADATA = {"source_file": ("file", pl.String()), "source_row": ("row", pl.Int64())}


def metadata_name(column: str) -> str:
    name = _METADATA_NAME.sub("_", column.lower()).strip("_") or "score"
    return name[:200]


def _metadata_kind(dtype: pl.DataType) -> str | None:
    if dtype.is_float() or dtype.is_decimal():
        return "float"
    if dtype.is_integer():
        return "integer"
    if dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dtype, pl.Enum):
        return "terms"
    return None


def metadata_columns(schema: pl.Schema, wanted: list[str] | None) -> dict[str, tuple[pl.Expr, str]]:
    """The metadata pushed with each record: {name: (expression, "float" | "integer" | "terms")}.

    A name is `source_file` / `source_row`, a column of the frame, or a field of the `metadata` struct
    (input columns ingest kept). `wanted` None: DEFAULT_METADATA_COLUMNS, those the frame has; a name
    asked for explicitly that is missing or not a scalar is a one-line ConfigError."""
    explicit = wanted is not None
    extra = schema.get("metadata")
    extra_fields = {item.name: item.dtype for item in extra.fields} if isinstance(extra, pl.Struct) else {}
    result: dict[str, tuple[pl.Expr, str]] = {}
    for name in (wanted if explicit else DEFAULT_METADATA_COLUMNS):
        if name in _SOURCE_METADATA:
            field, dtype = _SOURCE_METADATA[name]
            expr = pl.col("source").struct.field(field)
        elif name in schema:
            expr, dtype = pl.col(name), schema[name]
        elif name in extra_fields:
            expr, dtype = pl.col("metadata").struct.field(name), extra_fields[name]
        elif explicit:
            raise ConfigError(f"label push: metadata column {name!r} is not in the input (nor a field of its metadata)")
        else:
            continue
        kind = _metadata_kind(dtype)
        if kind is None:
            if explicit:
                raise ConfigError(f"label push: metadata column {name!r} is {dtype}, not a number, flag or text")
            continue
        result[name] = (expr, kind)
    return result


def metadata_properties(columns: dict[str, tuple[pl.Expr, str]]):
    import argilla as rg

    kinds = {"float": rg.FloatMetadataProperty, "integer": rg.IntegerMetadataProperty, "terms": rg.TermsMetadataProperty}
    return [kinds[kind](name=metadata_name(column), title=column) for column, (_, kind) in columns.items()]


def read_guidelines(path: Path) -> str:
    """The Markdown text of a guidelines file; missing, unreadable or empty is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: guidelines file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: guidelines file is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the guidelines file ({error.strerror or type(error).__name__})") from None
    if not text.strip():
        raise ConfigError(f"{path}: guidelines file is empty")
    return text


def question_specs(kind: str, preference_question: str = "label") -> list[dict]:
    """The questions of a dataset as data (name, type, title, choices, required): what annotators are
    asked, checkable without a server; `settings` turns them into the SDK's objects."""
    if kind == "sft":
        return [
            {"name": "quality", "type": "rating", "title": "Quality of the assistant's replies", "values": RATING_VALUES},
            {"name": "decision", "type": "label", "title": "Keep for training?", "labels": DECISION_LABELS},
            {"name": "corrected_response", "type": "text", "required": False,
             "title": "Corrected final assistant reply (leave empty if it is fine)"},
        ]  # fmt: skip
    if preference_question == "ranking":
        preference = {"name": "preference", "type": "ranking", "title": "Rank the responses (1 = better)",
                      "values": {"response_a": "Response A", "response_b": "Response B"}}  # fmt: skip
    else:
        preference = {"name": "preference", "type": "label", "title": "Which answer is better?",
                      "description": "A, B, or Tie when neither is better", "labels": PREFERENCE_LABELS}  # fmt: skip
    return [
        preference,
        {"name": "quality", "type": "rating", "title": "Quality of the better answer (optional)", "values": RATING_VALUES,
         "required": False},
        {"name": "decision", "type": "label", "title": "Keep for training?", "labels": DECISION_LABELS, "required": False},
    ]  # fmt: skip


def _sdk_question(spec: dict):
    import argilla as rg

    common = {"name": spec["name"], "title": spec["title"], "required": spec.get("required", True)}
    if spec.get("description"):
        common["description"] = spec["description"]
    if spec["type"] == "rating":
        return rg.RatingQuestion(values=spec["values"], **common)
    if spec["type"] == "label":
        return rg.LabelQuestion(labels=spec["labels"], **common)
    if spec["type"] == "ranking":
        return rg.RankingQuestion(values=spec["values"], **common)
    return rg.TextQuestion(use_markdown=True, **common)


def settings(kind: str, columns: dict, min_submitted: int, preference_question: str = "label", guidelines: str | None = None):
    """Argilla dataset settings for one record kind (see the module docstring)."""
    import argilla as rg

    if kind == "sft":
        fields = [rg.ChatField(name="conversation", title="Conversation", use_markdown=True)]
    else:
        fields = [
            rg.ChatField(name="prompt", title="Prompt", use_markdown=True),
            rg.TextField(name="response_a", title="Response A", use_markdown=True),
            rg.TextField(name="response_b", title="Response B", use_markdown=True),
        ]
    return rg.Settings(
        guidelines=guidelines or (SFT_GUIDELINES if kind == "sft" else PREFERENCE_GUIDELINES),
        fields=fields,
        questions=[_sdk_question(spec) for spec in question_specs(kind, preference_question)],
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


def record_payloads(
    frame: pl.DataFrame, kind: str, columns: dict[str, tuple[pl.Expr, str]], suggestions: dict[str, str]
) -> list[dict]:
    """Plain-dict payloads (id, fields, metadata, suggestions) for the rows of one kind; `columns` from
    :func:`metadata_columns`.

    This builds one request body per record for the SDK, which is per-row work by nature; it is not a
    curation hot path (labeling sets are sized for people)."""
    if kind == "preference":
        frame = frame.with_columns(a_is_chosen_expr().alias("__a_is_chosen"))
    meta_keys = {column: f"__meta_{index}" for index, column in enumerate(columns)}
    frame = frame.with_columns([expr.alias(meta_keys[column]) for column, (expr, _) in columns.items()])
    payloads = []
    for row in frame.iter_rows(named=True):
        metadata = {
            metadata_name(column): _clean_metadata_value(row[meta_keys[column]], column_kind)
            for column, (_, column_kind) in columns.items()
        }
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
