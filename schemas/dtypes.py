"""Polars dtypes derived from the JSON Schema files, so no module re-declares a column.

The canonical frame holds both record kinds in one table: chat/SFT rows fill `messages`, preference
rows fill `prompt`, `chosen` and `rejected`; the other columns are null. Every stage reads and writes
this frame (plus the score columns stages add).
"""

from __future__ import annotations

import polars as pl

from schemas.loader import load_schema, resolve_ref

_SCALARS = {"string": pl.String, "integer": pl.Int64, "number": pl.Float64, "boolean": pl.Boolean}


def dtype_from_json_schema(node: dict) -> pl.DataType:
    """Map a JSON Schema node to a Polars dtype (objects → Struct, arrays → List, `const` → its type)."""
    if "$ref" in node:
        return dtype_from_json_schema(resolve_ref(node["$ref"]))
    if "const" in node:
        return _SCALARS[_json_type_of(node["const"])]()
    node_type = node.get("type")
    if isinstance(node_type, list):  # ["array", "null"]: an optional field; Polars columns are nullable anyway
        (node_type,) = [kind for kind in node_type if kind != "null"]
    if node_type == "object":
        return pl.Struct({key: dtype_from_json_schema(sub) for key, sub in node["properties"].items()})
    if node_type == "array":
        return pl.List(dtype_from_json_schema(node["items"]))
    if node_type in _SCALARS:
        return _SCALARS[node_type]()
    raise TypeError(f"no Polars dtype for JSON Schema node {node!r}")


def _json_type_of(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string"


def _record_columns(schema_name: str) -> dict[str, pl.DataType]:
    schema = load_schema(schema_name)
    return {key: dtype_from_json_schema(sub) for key, sub in schema["properties"].items()}


MESSAGE_DTYPE: pl.Struct = dtype_from_json_schema(load_schema("message"))
MESSAGES_DTYPE: pl.List = pl.List(MESSAGE_DTYPE)
SOURCE_DTYPE: pl.Struct = dtype_from_json_schema(load_schema("source"))

# Column order of the canonical frame: identity first, then content, then provenance.
CANONICAL_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "kind": pl.String(),
    "messages": _record_columns("chat")["messages"],
    "prompt": _record_columns("preference")["prompt"],
    "chosen": _record_columns("preference")["chosen"],
    "rejected": _record_columns("preference")["rejected"],
    "source": _record_columns("chat")["source"],
}

# Rows ingest could not turn into records: kept with the raw text (truncated) and why.
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(),
    "row": pl.Int64(),
    "reason": pl.String(),
    "field": pl.String(),
    "detail": pl.String(),
    "raw": pl.String(),
}

# Columns every dropped-rows table carries besides the canonical ones.
DROPPED_COLUMNS: dict[str, pl.DataType] = {"stage": pl.String(), "reason": pl.String()}


def canonical_columns() -> list[str]:
    return list(CANONICAL_SCHEMA)
