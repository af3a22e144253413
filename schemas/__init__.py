"""Canonical record and config schemas: the JSON Schema files here are the one source of truth.

Polars dtypes are derived from them in :mod:`schemas.dtypes`; validation helpers live in
:mod:`schemas.validation`.
"""

from schemas.dtypes import (
    CANONICAL_SCHEMA,
    MESSAGE_DTYPE,
    MESSAGES_DTYPE,
    QUARANTINE_SCHEMA,
    SOURCE_DTYPE,
    canonical_columns,
)
from schemas.loader import SCHEMA_DIR, load_schema

__all__ = [
    "CANONICAL_SCHEMA",
    "MESSAGE_DTYPE",
    "MESSAGES_DTYPE",
    "QUARANTINE_SCHEMA",
    "SCHEMA_DIR",
    "SOURCE_DTYPE",
    "canonical_columns",
    "load_schema",
]
