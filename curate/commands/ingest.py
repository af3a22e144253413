"""`curate ingest INPUT...`: read raw files into canonical records plus a quarantine, nothing else."""

from __future__ import annotations

from pathlib import Path

import yaml

from curate.cli_support import add_input_arguments, parse_columns
from curate.errors import ConfigError
from curate.display import console, live_run_events, print_summary
from curate.runner import run_pipeline


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="read raw files (JSONL/.gz/.zst, JSON, CSV, Parquet, datasets folders, globs) into canonical records",
        description="Read raw conversational data into canonical records. Rows that cannot be read go to "
        "OUT/quarantine.parquet with file, row, reason and the raw text.",
    )
    add_input_arguments(parser, "files, folders or quoted globs")
    parser.add_argument(
        "--keep-columns",
        metavar="NAMES",
        help="comma-separated input fields to keep in the `metadata` column (default: every field the format "
        "does not consume; '' keeps none)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mapping-language field (docs/formats.md), VALUE read as YAML, e.g. --map messages=input "
        "--map 'append=[{field: ideal}]' --map answers=explode --map trim_trailing_user=true",
    )
    parser.add_argument("--max-row-bytes", type=int, default=200_000)
    parser.add_argument("--force", action="store_true")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    columns = parse_columns(args.column)
    pipeline = {
        "name": "ingest",
        # Paths stay as typed: `source.file` is then relative to where the command runs.
        "inputs": [{"path": p, "format": args.format, "columns": columns, **_keep(args), **_mapping(args)} for p in args.inputs],
        "ingest": {"max_row_bytes": args.max_row_bytes},
        "stages": [],
    }
    with live_run_events() as events:
        result = run_pipeline(pipeline, run_dir=args.out, force=args.force, events=events, base_dir=Path.cwd())
    print_summary(result.manifest)
    console.print(f"records: {result.run_dir / 'ingest' / 'data.parquet'}")
    console.print(f"quarantine: {result.run_dir / 'quarantine.parquet'}")
    return 0


def _keep(args) -> dict:
    if args.keep_columns is None:
        return {}
    return {"keep_columns": [name.strip() for name in args.keep_columns.split(",") if name.strip()]}


def _mapping(args) -> dict:
    """`--map KEY=VALUE` flags → an input's `mapping:` block (values parsed as YAML, as in the file)."""
    mapping = {}
    for item in args.map:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--map {item!r}: expected KEY=VALUE, e.g. messages=input")
        try:
            mapping[key.strip()] = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            raise ConfigError(f"--map {item!r}: the value is not valid YAML") from None
    return {"mapping": mapping} if mapping else {}
