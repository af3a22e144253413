"""`curate filter INPUT... --out DIR [--config FILE.yaml]`: tag quality scores, then apply thresholds.

The config file holds one section per stage: `tag:` (which scores, tokenizer, languages) and `filter:`
(thresholds); optional `pii:` and `decontaminate:` sections add those stages before tagging. Rerunning
with only `filter:` changed reuses the cached scores of the tag stage.
"""

from __future__ import annotations

from pathlib import Path

from curate.cli_support import parse_columns, read_yaml_mapping
from curate.display import console, live_run_events, print_summary
from curate.errors import ConfigError
from curate.formats import FORMATS
from curate.runner import run_pipeline

SECTIONS = ("pii", "decontaminate", "tag", "filter")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="score rows (tag) and drop those failing quality/language/safety thresholds (filter)",
        description=__doc__,
    )
    parser.add_argument("inputs", nargs="+", help="raw files, or a canonical data.parquet from an earlier run")
    parser.add_argument("--out", type=Path, required=True, help="run directory to write")
    parser.add_argument("--config", type=Path, help="YAML with tag:/filter: (and optional pii:/decontaminate:) sections")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="raw format (default: detect)")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="field name for a role in the raw inputs, e.g. --column prompt=customer_message (as in `curate ingest`)",
    )
    parser.add_argument("--tokenizer", help="tokenizer.json for token counts (overrides tag.tokenizer)")
    parser.add_argument("--languages", help="comma-separated keep-list, e.g. en,de (overrides filter.languages)")
    parser.add_argument("--force", action="store_true", help="recompute every stage")
    parser.add_argument("--quiet", action="store_true", help="no live display; print only the summary")
    parser.set_defaults(handler=handle)


def load_sections(path: Path | None) -> dict:
    if path is None:
        return {}
    data = read_yaml_mapping(path, f"sections {', '.join(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}; expected {', '.join(SECTIONS)}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{path}: section {name!r} must be a mapping")
    return {name: dict(section or {}) for name, section in data.items()}


def build_pipeline(inputs: list[str], input_format: str, sections: dict, columns: dict | None = None) -> dict:
    stages = [
        {"name": name, "type": name, "config": sections.get(name, {})}
        for name in SECTIONS
        if name in ("tag", "filter") or name in sections
    ]
    return {
        "name": "filter",
        "inputs": [
            {"path": str(Path(p).resolve()), "format": input_format, "columns": dict(columns or {})} for p in inputs
        ],
        "stages": stages,
    }


def handle(args) -> int:
    sections = load_sections(args.config)
    if args.tokenizer:
        sections.setdefault("tag", {})["tokenizer"] = str(Path(args.tokenizer).resolve())
    if args.languages:
        sections.setdefault("filter", {})["languages"] = [c.strip() for c in args.languages.split(",") if c.strip()]
    base_dir = args.config.parent.resolve() if args.config else Path.cwd()
    pipeline = build_pipeline(args.inputs, args.format, sections, parse_columns(args.column))
    with live_run_events(enabled=not args.quiet) as events:
        result = run_pipeline(pipeline, run_dir=args.out, force=args.force, events=events, base_dir=base_dir)
    print_summary(result.manifest)
    console.print(f"kept: {result.run_dir / 'filter' / 'data.parquet'}")
    console.print(f"dropped: {result.run_dir / 'filter' / 'dropped.parquet'}")
    return 0
