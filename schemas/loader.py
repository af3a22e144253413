"""Load the JSON Schema files shipped in this package, with `$ref`s between them resolved."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_DIR = Path(__file__).parent

SCHEMA_FILES = {
    "message": "message.schema.json",
    "source": "source.schema.json",
    "chat": "chat_record.schema.json",
    "preference": "preference_record.schema.json",
    "pipeline": "pipeline.schema.json",
    "manifest": "manifest.schema.json",
}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """Return the parsed JSON Schema called `name` (message, source, chat, preference, pipeline)."""
    try:
        file_name = SCHEMA_FILES[name]
    except KeyError:
        raise KeyError(f"unknown schema {name!r}; known: {', '.join(SCHEMA_FILES)}") from None
    return json.loads((SCHEMA_DIR / file_name).read_text(encoding="utf-8"))


def resolve_ref(ref: str) -> dict:
    """Resolve a `$ref` to a sibling schema file (the only kind of reference these schemas use)."""
    for name, file_name in SCHEMA_FILES.items():
        if ref == file_name:
            return load_schema(name)
    raise KeyError(f"unresolvable $ref {ref!r}")
