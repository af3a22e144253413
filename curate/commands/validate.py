"""`curate validate FILE`: check a record file (or a pipeline YAML) against the canonical schemas."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from curate.display import console
from curate.errors import SchemaValidationError
from curate.validation import validate_file


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a JSONL/JSON/Parquet record file or a pipeline YAML against the schemas",
        description=__doc__,
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--schema", default="auto", choices=("auto", "chat", "preference", "pipeline"))
    parser.add_argument("--max-errors", type=int, default=20)
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    schema = args.schema
    if schema == "auto" and args.file.suffix in (".yaml", ".yml"):
        schema = "pipeline"
    result = validate_file(args.file, schema=schema, max_errors=args.max_errors)
    for line in result.first_errors:
        console.print(line)
    if result.invalid:
        raise SchemaValidationError(f"{args.file}: {result.invalid} of {result.rows} rows do not match the {schema} schema")
    console.print(Text.assemble(("ok", "green"), f": {args.file}: {result.rows} rows match the {schema} schema"))
    return 0
