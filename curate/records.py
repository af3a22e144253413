"""Normalization and identity of canonical records, as Polars expressions.

Ingest uses these on every row; tests and library users can build canonical frames from plain Python
dicts with :func:`canonical_frame`, which goes through the very same expressions.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import polars_hash as plh
import pyarrow as pa

from schemas import CANONICAL_SCHEMA, MESSAGE_DTYPE, MESSAGES_DTYPE, SOURCE_DTYPE

# The role spellings of the common raw formats (ShareGPT's human/gpt, bots' "bot"); anything else is
# an unknown role and quarantined rather than guessed.
ROLE_ALIASES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "system": "system",
    # OpenAI's newer name for the system turn.
    "developer": "system",
    # Tool results: OpenAI `tool` (and the older `function`), ShareGPT/LLaMA-Factory `observation`,
    # Llama 3's `ipython`.
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}

_HORIZONTAL_SPACE = r"[\t\f\v \u00a0\u2000-\u200a\u202f\u205f\u3000]"

ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern, ids stay readable


def normalize_text(text: pl.Expr) -> pl.Expr:
    """NFC, unified newlines, no zero-width spaces or BOMs, no trailing whitespace on any line, no
    whitespace before the first character or after the last.

    Only changes that cannot change meaning: indentation (past the first line), tabs, runs of spaces and
    blank lines inside the text are kept, because code, tables and poems carry meaning in them (dedup
    collapses whitespace in its own key, so whitespace variants are still exact duplicates there)."""
    return (
        text.str.normalize("NFC")
        .str.replace_all(r"\r\n?", "\n")
        .str.replace_all(r"[\u200b\ufeff]", "")
        .str.replace_all(_HORIZONTAL_SPACE + r"+\n", "\n")
        .str.replace_all(r"^\s+|\s+$", "")
    )


def normalize_role(role: pl.Expr) -> pl.Expr:
    """Map role spellings to user/assistant/system; anything else becomes null (an unknown role)."""
    return role.str.strip_chars().str.to_lowercase().replace_strict(ROLE_ALIASES, default=None, return_dtype=pl.String)


TOOL_FIELDS = tuple(name for name in MESSAGE_DTYPE.to_schema() if name not in ("role", "content"))


def message_struct(role: pl.Expr, content: pl.Expr) -> pl.Expr:
    """A canonical message from a role and a content expression (the tool fields null)."""
    return pl.struct(
        role.alias("role"),
        content.alias("content"),
        *[pl.lit(None, dtype=MESSAGE_DTYPE.to_schema()[name]).alias(name) for name in TOOL_FIELDS],
    )


def with_message_fields(messages: pl.Expr) -> pl.Expr:
    """A list of {role, content} structs (older files, hand-built frames) as canonical messages."""
    return messages.list.eval(message_struct(pl.element().struct.field("role"), pl.element().struct.field("content")))


def _call_content(content: pl.Expr, tool_calls: pl.Expr) -> pl.Expr:
    """A turn that only calls tools has content "" (OpenAI writes null): templates expect a string."""
    return pl.when(content.is_null() & (tool_calls.list.len().fill_null(0) > 0)).then(pl.lit("")).otherwise(content)


def normalize_messages(messages: pl.Expr) -> pl.Expr:
    """Normalize role and content of every message in a list-of-struct column (tool fields kept)."""
    return messages.list.eval(
        pl.struct(
            normalize_role(pl.element().struct.field("role")).alias("role"),
            _call_content(normalize_text(pl.element().struct.field("content")), pl.element().struct.field("tool_calls")).alias("content"),
            *[pl.element().struct.field(name) for name in TOOL_FIELDS],
        )
    )


# Text that normalize_text would change: anything but printable ASCII, tabs and newlines (non-ASCII
# needs NFC, CR/zero-width/NBSP need looking at), whitespace before a newline, and whitespace at the
# start or the end. Most text matches none of it.
_NEEDS_NORMALIZING = r"[^\x20-\x7e\n\t]|[ \t]\n|^\s|\s$"


def normalize_messages_series(messages: pl.Series) -> pl.Series:
    """`normalize_messages` for a materialized column, about 8x faster on typical data: the messages are
    flattened once and only the contents that need it go through NFC and the regex passes (gather,
    normalize, scatter back), then put back into their lists by offsets. Gives exactly what
    `normalize_messages` gives (tested)."""
    if messages.null_count() == len(messages):
        return messages  # a content column this batch's record kind does not use
    flat = _flat_values(messages).struct.unnest()
    content = flat["content"]
    todo = content.str.contains(_NEEDS_NORMALIZING).fill_null(False).arg_true()
    if len(todo):
        fixed = pl.select(normalize_text(pl.lit(content.gather(todo)))).to_series()
        content = content.scatter(todo, fixed)
    flat = flat.with_columns(content=content).with_columns(
        normalize_role(pl.col("role")).alias("role"), _call_content(pl.col("content"), pl.col("tool_calls")).alias("content")
    )
    values = flat.select(pl.struct("role", "content", *TOOL_FIELDS)).to_series()
    return _lists_of(values, messages.list.len().fill_null(0).to_numpy(), messages.is_null().to_numpy(), like=messages)


def concat_lists(parts: list[pl.Series]) -> pl.Series:
    """Per row, the lists of `parts` one after another: `pl.concat_list` with the same result (a null
    part makes the row null), built from offsets in a few vectorized steps. Polars concatenates lists
    of structs element by element (~10 µs a row for messages, most of ingest's format step); this
    gathers the flattened values once, in output order."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.stack([part.list.len().fill_null(0).to_numpy() for part in parts], axis=1).astype(np.int64)
    starts = np.zeros_like(lengths)  # where each part's row begins in the values of all parts together
    base = 0
    for index in range(len(parts)):
        starts[1:, index] = np.cumsum(lengths[:-1, index])
        starts[:, index] += base
        base += int(lengths[:, index].sum())
    segment_lengths = lengths.ravel()  # row-major: row 0's parts in order, then row 1's, ...
    segment_out = np.concatenate([[0], np.cumsum(segment_lengths)[:-1]])
    take = np.repeat(starts.ravel() - segment_out, segment_lengths) + np.arange(int(segment_lengths.sum()), dtype=np.int64)
    values = pl.concat([_flat_values(part) for part in parts], rechunk=True).gather(take)
    is_null = np.logical_or.reduce([part.is_null().to_numpy() for part in parts])
    return _lists_of(values, lengths.sum(axis=1), is_null, like=parts[0])


def _flat_values(lists: pl.Series) -> pl.Series:
    """The values of every list, in order; nothing for a null or empty list (unlike explode). Arrow
    carries them out and back as they are (string views, no copy)."""
    return pl.Series(lists.to_arrow(compat_level=pl.CompatLevel.newest()).flatten())


def _lists_of(values: pl.Series, lengths: np.ndarray, is_null: np.ndarray, like: pl.Series) -> pl.Series:
    """`values` cut into lists of `lengths` (null where `is_null`), named and typed as `like`."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    joined = pa.LargeListArray.from_arrays(
        offsets, values.to_arrow(compat_level=pl.CompatLevel.newest()), mask=pa.array(is_null) if is_null.any() else None
    )
    return pl.Series(like.name, joined).cast(like.dtype)


def _serialize_messages(messages: pl.Expr) -> pl.Expr:
    # Unit/record separators cannot occur in normalized text, so the serialization is unambiguous. Tool
    # fields join the key only where set, so ids of plain conversations are what they always were.
    tool_part = pl.struct(*[pl.element().struct.field(name) for name in TOOL_FIELDS]).struct.json_encode()
    has_tool = pl.any_horizontal(*[pl.element().struct.field(name).is_not_null() for name in TOOL_FIELDS])
    return messages.list.eval(
        pl.element().struct.field("role")
        + pl.lit("\x1f")
        + pl.element().struct.field("content")
        + pl.when(has_tool).then(pl.lit("\x1f") + tool_part).otherwise(pl.lit(""))
    ).list.join("\x1e")


def content_key() -> pl.Expr:
    """One string per row holding its whole normalized content (both record kinds)."""
    return (
        pl.when(pl.col("kind") == "sft")
        .then(pl.lit("sft\x1d") + _serialize_messages(pl.col("messages")))
        .otherwise(
            pl.lit("preference\x1d")
            + _serialize_messages(pl.col("prompt"))
            + pl.lit("\x1d")
            + _serialize_messages(pl.col("chosen"))
            + pl.lit("\x1d")
            + _serialize_messages(pl.col("rejected"))
        )
    )


def record_id() -> pl.Expr:
    """Stable id: sha256 of the normalized content. Exact duplicates share an id; `source` tells the
    rows apart."""
    return plh.col("__content_key").chash.sha2_256().str.slice(0, ID_HEX_CHARS)


def with_record_id(frame: pl.LazyFrame | pl.DataFrame):
    return frame.with_columns(content_key().alias("__content_key")).with_columns(record_id().alias("id")).drop(
        "__content_key"
    )


def canonical_frame(records: list[dict], source_file: str = "<memory>") -> pl.DataFrame:
    """Build a canonical frame from dicts holding `messages`, or `prompt`/`chosen`/`rejected`.

    Strings are accepted for prompt/chosen/rejected (a user / assistant message). Text and roles are
    normalized and ids computed exactly as ingest does. Extra keys are kept as extra columns."""
    rows = []
    for index, record in enumerate(records, start=1):
        row = dict(record)
        if "messages" in row:
            row["kind"] = "sft"
        else:
            row["kind"] = "preference"
            for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
                if isinstance(row.get(key), str):
                    row[key] = [{"role": role, "content": row[key]}]
        row.setdefault("source", {"file": source_file, "row": index, "format": "memory"})
        rows.append(row)
    extra = {key for row in rows for key in row} - set(CANONICAL_SCHEMA)
    frame = pl.DataFrame(
        rows,
        schema={**CANONICAL_SCHEMA, **{key: None for key in sorted(extra)}},
        infer_schema_length=None,
    )
    frame = frame.with_columns(
        normalize_messages(pl.col(column)).alias(column) for column in ("messages", "prompt", "chosen", "rejected")
    )
    frame = with_record_id(frame)
    return frame.select(*CANONICAL_SCHEMA, *sorted(extra))


__all__ = [
    "MESSAGES_DTYPE",
    "SOURCE_DTYPE",
    "canonical_frame",
    "concat_lists",
    "content_key",
    "normalize_messages",
    "normalize_messages_series",
    "normalize_role",
    "normalize_text",
    "record_id",
    "with_record_id",
]
