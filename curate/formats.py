"""Raw record formats and how each maps to canonical records, as Polars expressions.

Every container (JSONL, JSON array, CSV, Parquet, a `datasets` folder) is first turned into one JSON
text per row; a format then decodes those texts with a *strict* dtype. Rows whose JSON is malformed or
whose fields have the wrong type fail that decode and are diagnosed one by one (they are rare), so the
hot path stays a single vectorized decode per chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import polars as pl

from curate.records import concat_lists, message_struct
from schemas import MESSAGES_DTYPE

MESSAGE_LIST = MESSAGES_DTYPE
SHAREGPT_TURNS = pl.List(pl.Struct({"from": pl.String, "value": pl.String}))

FORMATS = ("alpaca", "sharegpt", "openai", "prompt_response", "preference", "transcript")

# Default field names per format; `columns:` in the pipeline config renames them.
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "sharegpt": {"conversations": "conversations", "system": "system"},
    "openai": {"messages": "messages"},
    "prompt_response": {"prompt": "prompt", "response": "response", "system": "system"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    "transcript": {"text": "text", "chosen": "chosen", "rejected": "rejected"},
}


@dataclass(frozen=True)
class FieldSpec:
    """One raw field: its name in the file, the dtype it must decode to, whether it is required."""

    name: str
    dtype: pl.DataType
    required: bool = True
    # For the per-row diagnosis of rows that fail the strict decode: a description of the JSON shape.
    shape: str = "string"  # string | messages | sharegpt | string_or_messages


@dataclass(frozen=True)
class FormatPlan:
    """A format resolved for one file: its fields (with the file's column names) and variant."""

    format: str
    fields: tuple[FieldSpec, ...]
    kind: str  # sft | preference
    variant: dict[str, str] = field(default_factory=dict)  # e.g. {"chosen": "string"} for preference
    # Input fields the format does not consume, kept in the `metadata` struct column (name → dtype).
    metadata: tuple[tuple[str, pl.DataType], ...] = ()

    def struct_dtype(self) -> pl.Struct:
        return pl.Struct({spec.name: spec.dtype for spec in self.fields})


def detect_format(sample: list[dict], columns: dict[str, str] | None = None) -> str | None:
    """Guess the format from the keys of a few decoded rows; None when nothing fits."""
    keys: set[str] = set()
    for row in sample:
        if isinstance(row, dict):
            keys |= set(row)
    columns = columns or {}

    def has(*names: str) -> bool:
        return all(columns.get(name, name) in keys for name in names)

    if has("chosen", "rejected"):
        if not has("prompt"):
            # TRL's implicit-prompt form: chosen/rejected are whole conversations sharing a prefix.
            chosen = [row.get(columns.get("chosen", "chosen")) for row in sample if isinstance(row, dict)]
            return "preference" if any(_is_message_list(v) for v in chosen) else "transcript"
        return "preference"
    if has("conversations"):
        return "sharegpt"
    if has("messages"):
        return "openai"
    if has("instruction", "output"):
        return "alpaca"
    if has("prompt", "response"):
        return "prompt_response"
    if has("text"):
        return "transcript"
    return None


def _is_message_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def plan_format(fmt: str, sample: list[dict], columns: dict[str, str] | None = None) -> FormatPlan:
    """Resolve the strict field dtypes for a file. Preference fields may be strings or message lists;
    the file's first rows decide which, and rows that deviate are quarantined as wrong_type."""
    names = {**DEFAULT_COLUMNS[fmt], **(columns or {})}
    S = pl.String()
    if fmt == "alpaca":
        fields = (
            FieldSpec(names["instruction"], S),
            FieldSpec(names["input"], S, required=False),
            FieldSpec(names["output"], S),
            FieldSpec(names["system"], S, required=False),
        )
        return FormatPlan(fmt, fields, "sft")
    if fmt == "sharegpt":
        fields = (
            FieldSpec(names["conversations"], SHAREGPT_TURNS, shape="sharegpt"),
            FieldSpec(names["system"], S, required=False),
        )
        return FormatPlan(fmt, fields, "sft")
    if fmt == "openai":
        return FormatPlan(fmt, (FieldSpec(names["messages"], MESSAGE_LIST, shape="messages"),), "sft")
    if fmt == "prompt_response":
        fields = (
            FieldSpec(names["prompt"], S),
            FieldSpec(names["response"], S),
            FieldSpec(names["system"], S, required=False),
        )
        return FormatPlan(fmt, fields, "sft")
    if fmt == "preference":
        variant = {}
        fields = []
        sample_keys = {key for row in sample if isinstance(row, dict) for key in row}
        # No prompt field at all: the implicit-prompt form (the prompt is chosen/rejected's shared prefix).
        implicit = names["prompt"] not in sample_keys
        for role_key in ("chosen", "rejected") if implicit else ("prompt", "chosen", "rejected"):
            column = names[role_key]
            values = [row.get(column) for row in sample if isinstance(row, dict) and row.get(column) is not None]
            as_messages = bool(values) and sum(_is_message_list(v) for v in values) * 2 > len(values)
            variant[role_key] = "messages" if as_messages else "string"
            fields.append(
                FieldSpec(column, MESSAGE_LIST if as_messages else S, shape="messages" if as_messages else "string")
            )
        fields.append(FieldSpec(names["system"], S, required=False))
        if implicit:
            variant["prompt"] = "implicit"
        return FormatPlan(fmt, tuple(fields), "preference", variant)
    if fmt == "transcript":
        sample_keys = {key for row in sample if isinstance(row, dict) for key in row}
        if names["chosen"] in sample_keys and names["rejected"] in sample_keys:
            fields = (FieldSpec(names["chosen"], S), FieldSpec(names["rejected"], S))
            return FormatPlan(fmt, fields, "preference", {"transcript": "pair"})
        return FormatPlan(fmt, (FieldSpec(names["text"], S),), "sft", {"transcript": "single"})
    raise ValueError(f"unknown format {fmt!r}")


# ---------------------------------------------------------------------------------------------------
# Vectorized pre-check for scalars where text is expected: Polars coerces 42 → "42" when decoding into
# a String field, so such rows are found by a regex over the raw text and then confirmed one by one.


def scalar_for_string_pattern(plan: FormatPlan) -> str | None:
    keys = []
    for spec in plan.fields:
        if spec.shape == "string":
            keys.append(spec.name)
        elif spec.shape == "messages":
            keys += ["role", "content"]
        elif spec.shape == "sharegpt":
            keys += ["from", "value"]
    if not keys:
        return None
    alternatives = "|".join(re.escape(json.dumps(key)) for key in sorted(set(keys)))
    # A key spelled with escapes ("cont\\u0065nt") is the same key to the decoder: check those rows too.
    escaped_key = r'"(?:[^"\\]|\\.)*\\u[0-9a-fA-F]{4}(?:[^"\\]|\\.)*"'
    return rf'(?:{alternatives}|{escaped_key})\s*:\s*(?:-?[0-9]|true|false|\[|\{{)'


def diagnose_row(raw: str, plan: FormatPlan) -> tuple[str, str, str] | None:
    """Explain why one raw row cannot be a record of this format: (reason, field, detail), or None.

    Only rows that failed the vectorized decode (or matched the scalar pre-check) come here."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        return "malformed_json", "", f"{error.msg} at line {error.lineno} column {error.colno}"
    except RecursionError:
        return "malformed_json", "", "nested too deeply"
    if not isinstance(value, dict):
        return "wrong_type", "", f"expected a JSON object, got {type(value).__name__}"
    for spec in plan.fields:
        if spec.name not in value or value[spec.name] is None:
            if spec.required:
                return "missing_field", spec.name, "required field is missing or null"
            continue
        problem = _shape_problem(value[spec.name], spec.shape)
        if problem:
            return "wrong_type", spec.name, problem
    return None


def _shape_problem(value, shape: str) -> str | None:
    if shape == "string":
        return None if isinstance(value, str) else f"expected a string, got {_json_type(value)}"
    if shape in ("messages", "sharegpt"):
        role_key, text_key = ("role", "content") if shape == "messages" else ("from", "value")
        if not isinstance(value, list):
            return f"expected a list of messages, got {_json_type(value)}"
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                return f"message {index} is {_json_type(item)}, expected an object"
            for key in (role_key, text_key):
                if key == "content" and item.get(key) is None and item.get("tool_calls"):
                    continue  # an assistant turn that only calls tools
                if key not in item or item[key] is None:
                    return f"message {index} has no {key!r}"
                if not isinstance(item[key], str):
                    return f"message {index} {key!r} is {_json_type(item[key])}, expected a string"
        return None
    raise ValueError(shape)


def text_of_parts(parts: list) -> str | None:
    """OpenAI content given as a list of parts → its text parts joined by newlines; None when a part
    is not text (an image cannot become canonical text)."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return "\n".join(texts)


def coerce_message_shapes(messages) -> bool:
    """Bring the OpenAI spellings a strict decode cannot read into the canonical shape, in place:
    content as a list of text parts → text; a tool call's `arguments` given as an object → JSON
    text; `content: null` on a turn that calls tools → "". Returns whether anything changed.

    Runs only on rows the vectorized decode rejected (see ingest), so the common path stays columnar."""
    changed = False
    if not isinstance(messages, list):
        return False
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            text = text_of_parts(content)
            if text is not None:
                message["content"], changed = text, True
        elif content is None and message.get("tool_calls"):
            message["content"], changed = "", True
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and not isinstance(function.get("arguments"), str) and "arguments" in function:
                function["arguments"], changed = json.dumps(function["arguments"], ensure_ascii=False), True
    return changed


def coerce_row_text(raw: str, plan: FormatPlan) -> str | None:
    """The row's JSON text with its message fields coerced (see coerce_message_shapes), or None when
    nothing needed (or could get) coercing."""
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    changed = False
    for spec in plan.fields:
        if spec.shape == "messages":
            changed |= coerce_message_shapes(value.get(spec.name))
    return json.dumps(value, ensure_ascii=False) if changed else None


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------------------------------
# Mapping decoded fields to canonical messages (all Polars expressions over the decoded struct `__rec`).


def _field(plan_field: FieldSpec) -> pl.Expr:
    return pl.col("__rec").struct.field(plan_field.name)


def _message(role: str, content: pl.Expr) -> pl.Expr:
    return pl.concat_list(message_struct(pl.lit(role), content))


def _sharegpt_turn() -> pl.Expr:
    """One ShareGPT turn as a canonical message. `function_call` turns hold the call as JSON text
    ({"name": ..., "arguments": ...}) and become an assistant turn with `tool_calls`; `observation`
    turns are tool results (the role alias maps them)."""
    speaker = pl.element().struct.field("from")
    value = pl.element().struct.field("value")
    is_call = speaker.str.strip_chars().str.to_lowercase() == "function_call"
    call = pl.struct(
        pl.lit(None, dtype=pl.String).alias("id"),
        pl.lit("function").alias("type"),
        pl.struct(
            value.str.json_path_match("$.name").alias("name"),
            value.str.json_path_match("$.arguments").fill_null("{}").alias("arguments"),
        ).alias("function"),
    )
    return pl.struct(
        pl.when(is_call).then(pl.lit("assistant")).otherwise(speaker).alias("role"),
        pl.when(is_call).then(pl.lit("")).otherwise(value).alias("content"),
        pl.when(is_call).then(pl.concat_list(call)).otherwise(pl.lit(None, dtype=MESSAGE_LIST.inner.to_schema()["tool_calls"])).alias("tool_calls"),
        pl.lit(None, dtype=pl.String).alias("tool_call_id"),
    )


def _optional_system(system: pl.Expr) -> pl.Expr:
    """A one-element system message list when `system` is non-blank, else an empty list."""
    return (
        pl.when(system.str.strip_chars().str.len_chars() > 0)
        .then(_message("system", system))
        .otherwise(pl.lit([], dtype=MESSAGE_LIST))
    )


def _string_or_messages(spec: FieldSpec, role: str) -> pl.Expr:
    return _field(spec) if spec.shape == "messages" else _message(role, _field(spec))


def _transcript_messages(text: pl.Expr) -> pl.Expr:
    """'\\n\\nHuman: … \\n\\nAssistant: …' → messages. Text before the first marker, or a turn with an
    unrecognised speaker, yields a message with a null role (later quarantined as unknown_role)."""
    marked = text.str.replace_all(r"(?:^|\n\n)(Human|Assistant|System):", "\x1e$1\x1f")
    turns = marked.str.split("\x1e").list.eval(pl.element().filter(pl.element().str.strip_chars() != ""))
    return turns.list.eval(
        message_struct(
            pl.when(pl.element().str.contains("\x1f"))
            .then(pl.element().str.split_exact("\x1f", 1).struct.field("field_0"))
            .otherwise(pl.lit(None, dtype=pl.String)),
            pl.when(pl.element().str.contains("\x1f"))
            .then(pl.element().str.split_exact("\x1f", 1).struct.field("field_1"))
            .otherwise(pl.element()),
        )
    )


def canonical_columns_from(plan: FormatPlan) -> dict[str, list[pl.Expr]]:
    """Per canonical content column (before normalization), the message lists that make it, in order:
    ingest joins them with `records.concat_lists` (Polars' `concat_list` goes row by row on structs)."""
    by_name = {spec.name: spec for spec in plan.fields}
    names = list(by_name)
    empty = [pl.lit(None, dtype=MESSAGE_LIST)]
    if plan.format == "alpaca":
        instruction, input_, output, system = (by_name[n] for n in names)
        user_text = (
            pl.when(_field(input_).str.strip_chars().str.len_chars() > 0)
            .then(_field(instruction) + pl.lit("\n\n") + _field(input_))
            .otherwise(_field(instruction))
        )
        messages = [_optional_system(_field(system)), _message("user", user_text), _message("assistant", _field(output))]
        return {"messages": messages, "prompt": empty, "chosen": empty, "rejected": empty}
    if plan.format == "sharegpt":
        turns, system = (by_name[n] for n in names)
        messages = [_optional_system(_field(system)), _field(turns).list.eval(_sharegpt_turn())]
        return {"messages": messages, "prompt": empty, "chosen": empty, "rejected": empty}
    if plan.format == "openai":
        return {"messages": [_field(by_name[names[0]])], "prompt": empty, "chosen": empty, "rejected": empty}
    if plan.format == "prompt_response":
        prompt, response, system = (by_name[n] for n in names)
        messages = [_optional_system(_field(system)), _message("user", _field(prompt)), _message("assistant", _field(response))]
        return {"messages": messages, "prompt": empty, "chosen": empty, "rejected": empty}
    if plan.format == "preference" and plan.variant.get("prompt") == "implicit":
        chosen, rejected, system = (by_name[n] for n in names)
        return {
            "messages": empty,
            "prompt": [_optional_system(_field(system))],  # the shared prefix is added by split_shared_prefix
            "chosen": [_string_or_messages(chosen, "assistant")],
            "rejected": [_string_or_messages(rejected, "assistant")],
        }
    if plan.format == "preference":
        prompt, chosen, rejected, system = (by_name[n] for n in names)
        return {
            "messages": empty,
            "prompt": [_optional_system(_field(system)), _string_or_messages(prompt, "user")],
            "chosen": [_string_or_messages(chosen, "assistant")],
            "rejected": [_string_or_messages(rejected, "assistant")],
        }
    if plan.format == "transcript" and plan.kind == "sft":
        return {"messages": [_transcript_messages(_field(by_name[names[0]]))], "prompt": empty, "chosen": empty, "rejected": empty}
    if plan.format == "transcript":
        # HH-RLHF pairs: both transcripts share the dialogue up to the final assistant turn.
        chosen_turns = _transcript_messages(_field(by_name[names[0]]))
        rejected_turns = _transcript_messages(_field(by_name[names[1]]))
        return {
            "messages": empty,
            "prompt": [chosen_turns.list.slice(0, chosen_turns.list.len() - 1)],
            "chosen": [chosen_turns.list.slice(-1, 1)],
            "rejected": [rejected_turns.list.slice(-1, 1)],
            "__rejected_prompt": [rejected_turns.list.slice(0, rejected_turns.list.len() - 1)],
        }
    raise ValueError(plan.format)


# ---------------------------------------------------------------------------------------------------
# Preference pairs given as whole conversations (TRL's implicit prompt, UltraFeedback-binarized): the
# messages chosen and rejected share form the prompt, as TRL's `extract_prompt` does.


def shared_prefix_length(chosen: pl.Series, rejected: pl.Series) -> pl.Series:
    """Per row, how many leading messages chosen and rejected share; each side keeps at least its last
    message (identical replies stay a pair, for the checks and dedup to judge). One vectorized
    comparison per message position."""
    frame = pl.DataFrame({"c": chosen, "r": rejected}).with_columns(
        (pl.min_horizontal(pl.col("c").list.len(), pl.col("r").list.len()) - 1).clip(0).fill_null(0).alias("limit")
    )
    shared = pl.Series("shared", [0] * frame.height, dtype=pl.Int64)
    still = pl.Series([True] * frame.height)
    for position in range(int(frame["limit"].max() or 0)):
        same = frame.select(
            (pl.col("c").list.get(position, null_on_oob=True).struct.json_encode()
             == pl.col("r").list.get(position, null_on_oob=True).struct.json_encode()).fill_null(False)
            & (pl.col("limit") > position)
        ).to_series()  # fmt: skip
        still = still & same
        if not still.any():
            break
        shared = shared + still.cast(pl.Int64)
    return shared


def split_shared_prefix(frame: pl.DataFrame, plan: FormatPlan) -> pl.DataFrame:
    """Move the prefix chosen and rejected share into `prompt`. For an explicit prompt (UltraFeedback
    writes the prompt text and repeats it as chosen[0]), the shared prefix is the prompt whenever there
    is one: it holds the whole conversation before the replies."""
    if plan.format != "preference" or "messages" not in (plan.variant.get("chosen"), plan.variant.get("rejected")):
        return frame
    shared = shared_prefix_length(frame["chosen"], frame["rejected"])
    frame = frame.with_columns(shared.alias("__shared"))
    implicit = plan.variant.get("prompt") == "implicit"
    # The optional `system` field comes first, unless the shared prefix opens with its own system turn.
    system = pl.col("prompt") if implicit else _optional_system(_field(plan.fields[-1]))  # `system` is the last field
    parts = frame.select(pl.col("chosen").list.slice(0, pl.col("__shared")).alias("prefix"), system.alias("system"))
    prefix = pl.lit(parts["prefix"])
    prefix_has_system = prefix.list.first().struct.field("role").str.to_lowercase().is_in(["system", "developer"]).fill_null(False)
    new_prompt = pl.when(prefix_has_system).then(prefix).otherwise(pl.lit(concat_lists([parts["system"], parts["prefix"]])))
    moved = pl.col("__shared") > 0
    return frame.with_columns(
        pl.when(moved | pl.lit(implicit)).then(new_prompt).otherwise(pl.col("prompt")).alias("prompt"),
        pl.col("chosen").list.slice(pl.col("__shared")).alias("chosen"),
        pl.col("rejected").list.slice(pl.col("__shared")).alias("rejected"),
    ).drop("__shared")


# ---------------------------------------------------------------------------------------------------
# Fields the format does not consume (`score`, `lang`, ids) travel on in one `metadata` struct column.


def metadata_fields(sample: list[dict], plan: FormatPlan, keep: list[str] | None) -> tuple[tuple[str, pl.DataType], ...]:
    """The unconsumed fields of a file (all, or those in `keep`), typed as the first rows have them; a
    field whose sample values do not share a type is kept as text."""
    consumed = {spec.name for spec in plan.fields}
    names = sorted({key for row in sample if isinstance(row, dict) for key in row} - consumed)
    if keep is not None:
        names = [name for name in names if name in keep]
    if not names:
        return ()
    try:
        schema = pl.DataFrame([{name: row.get(name) for name in names} for row in sample], infer_schema_length=None).schema
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        schema = {name: pl.String() for name in names}
    return tuple((name, pl.String() if schema[name] == pl.Null else schema[name]) for name in names)


def metadata_column(raw: pl.Series, fields: tuple[tuple[str, pl.DataType], ...]) -> pl.Series:
    """The `metadata` struct for raw JSON rows: typed as planned, or (a chunk where some row deviates)
    every field as text, so a stray type never costs a row its metadata."""
    try:
        return raw.str.json_decode(pl.Struct(dict(fields))).alias("metadata")
    except (pl.exceptions.PolarsError, OverflowError, ValueError):
        pass
    frame = pl.DataFrame({"raw": raw})
    as_text = [pl.col("raw").str.json_path_match(f"$[{json.dumps(name)}]").alias(name) for name, _ in fields]
    return frame.select(pl.struct(as_text).alias("metadata")).to_series()
