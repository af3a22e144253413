"""Check record files against the canonical JSON Schemas (`curate validate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import polars as pl
from referencing import Registry, Resource

from curate.errors import SchemaValidationError
from schemas import SCHEMA_DIR, load_schema
from schemas.loader import SCHEMA_FILES


@dataclass
class ValidationResult:
    rows: int
    invalid: int
    first_errors: list[str]


def _registry() -> Registry:
    resources = [
        (file_name, Resource.from_contents(load_schema(name))) for name, file_name in SCHEMA_FILES.items()
    ]
    return Registry().with_resources(resources)


def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(schema_name), registry=_registry())


def _iter_rows(path: Path):
    name = path.name.lower()
    if name.endswith(".parquet"):
        frame = pl.read_parquet(path, glob=False)
        for index, row in enumerate(frame.iter_rows(named=True), start=1):
            yield index, {key: value for key, value in row.items() if value is not None}
        return
    text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte order mark is not content
    if text.lstrip().startswith("["):
        for index, row in enumerate(json.loads(text), start=1):
            yield index, row
        return
    for index, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as error:
                yield index, SchemaValidationError(f"{path}: line {index}: not valid JSON ({error.msg})")
            except RecursionError:
                yield index, SchemaValidationError(f"{path}: line {index}: JSON nested too deeply")


def validate_file(path: str | Path, schema: str = "auto", max_errors: int = 20) -> ValidationResult:
    """Validate every row of a JSONL / JSON / Parquet record file; `schema` is chat, preference or auto
    (by each row's `kind`). A checking tool, not a pipeline stage: it validates row by row on purpose,
    with the reference JSON Schema validator."""
    path = Path(path)
    if not path.is_file():
        raise SchemaValidationError(f"{path}: no such file")
    if schema == "pipeline":
        from curate.runner import load_pipeline

        load_pipeline(path)
        return ValidationResult(rows=1, invalid=0, first_errors=[])
    validators = {"chat": _validator("chat"), "preference": _validator("preference")}
    rows = invalid = 0
    errors: list[str] = []
    try:
        for index, row in _iter_rows(path):
            rows += 1
            if isinstance(row, Exception):
                invalid += 1
                if len(errors) < max_errors:
                    errors.append(str(row))
                continue
            name = schema
            if name == "auto":
                kind = row.get("kind") if isinstance(row, dict) else None
                name = "preference" if kind == "preference" or (isinstance(row, dict) and "chosen" in row) else "chat"
            problem = next(iter(sorted(validators[name].iter_errors(row), key=lambda e: list(e.absolute_path))), None)
            if problem is not None:
                invalid += 1
                if len(errors) < max_errors:
                    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem.absolute_path).lstrip(".")
                    errors.append(f"{path}: row {index}: {where or '(record)'}: {problem.message}")
    except (UnicodeDecodeError, json.JSONDecodeError, pl.exceptions.PolarsError, RecursionError) as error:
        raise SchemaValidationError(f"{path}: cannot read ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    return ValidationResult(rows=rows, invalid=invalid, first_errors=errors)


__all__ = ["SCHEMA_DIR", "ValidationResult", "validate_file"]
