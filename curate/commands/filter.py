"""`curate filter INPUT... --out DIR [--config FILE.yaml] [--preset NAME]`: tag quality scores, then
apply filter rules. `curate filter --explain RULE|PRESET` prints what a rule measures and why.

The config file holds one section per stage: `tag:` (which scores, tokenizer, language id) and
`filter:` (preset, rules, disable, languages); optional `pii:` and `decontaminate:` sections add those
stages before tagging. Rerunning with only `filter:` changed reuses the cached scores of the tag stage.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from curate.cli_support import add_input_arguments, add_set_argument, apply_set_items, parse_columns, read_yaml_mapping
from curate.display import console, live_run_events, print_summary
from curate.errors import ConfigError
from curate.filters.thresholds import PRESETS, describe_rule, find_rule, preset_description, preset_rules
from curate.runner import run_stages

SECTIONS = ("pii", "decontaminate", "tag", "filter")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="score rows (tag) and drop those failing quality/language/safety thresholds (filter)",
        description=__doc__,
    )
    add_input_arguments(
        parser,
        "raw files, or a canonical data.parquet from an earlier run",
        "YAML with tag:/filter: (and optional pii:/decontaminate:) sections",
    )
    # --explain needs no inputs: they become optional here and are checked in handle().
    for action in parser._actions:
        if action.dest == "inputs":
            action.nargs, action.required = "*", False
        elif action.dest == "out":
            action.required = False
    parser.add_argument("--preset", choices=PRESETS, help="filter rule preset (overrides filter.preset; default chat)")
    parser.add_argument("--explain", metavar="RULE", help="print what a rule (or every rule of a preset) measures, then exit")
    parser.add_argument("--tokenizer", help="tokenizer.json for token counts (overrides tag.tokenizer)")
    parser.add_argument("--languages", help="comma-separated keep-list, e.g. en,de (overrides filter.languages)")
    add_set_argument(parser, "filter.preset=short_answer (SECTION.FIELD; a pii/decontaminate section set here is added)")
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


def stages_from(sections: dict) -> list[tuple[str, dict]]:
    """tag and filter always; pii and decontaminate when the config has their sections, before tag."""
    return [(name, sections.get(name, {})) for name in SECTIONS if name in ("tag", "filter") or name in sections]


def explain(name: str) -> int:
    if name in PRESETS:
        found = [(name, rule) for rule in map(dict, preset_rules(name))]
        title = f"preset {name}: {preset_description(name)}"
    else:
        found = [(preset, spec.model_dump(by_alias=True, exclude_none=True)) for preset, spec in find_rule(name)]
        title = f"rule {name}"
    if not found:
        known = sorted({rule["name"] for preset in PRESETS for rule in preset_rules(preset)})
        raise ConfigError(f"--explain: no preset or rule named {name!r} (presets: {', '.join(PRESETS)}; rules: {', '.join(known)})")
    from curate.filters.thresholds import RuleSpec

    table = Table(title=title, show_lines=True)
    table.add_column("preset", no_wrap=True)
    table.add_column("rule", no_wrap=True)  # a name users copy into their config: never broken
    table.add_column("test", overflow="fold")
    table.add_column("why", overflow="fold")
    for preset, rule in found:
        spec = RuleSpec.model_validate(rule)
        test = describe_rule(spec) + (" (skipped when the column is absent)" if spec.optional else "")
        table.add_row(preset, spec.name, test, spec.why or "")
    console.print(table, markup=False)
    return 0


def handle(args) -> int:
    if args.explain:
        return explain(args.explain)
    if not args.inputs or args.out is None:
        raise ConfigError("curate filter: give INPUT files and --out DIR (or --explain RULE)")
    sections = load_sections(args.config)
    if args.preset:
        sections.setdefault("filter", {})["preset"] = args.preset
    if args.tokenizer:
        sections.setdefault("tag", {})["tokenizer"] = str(Path(args.tokenizer).resolve())
    if args.languages:
        sections.setdefault("filter", {})["languages"] = [c.strip() for c in args.languages.split(",") if c.strip()]
    for item in args.set_items:
        section = item.partition("=")[0].split(".")[0].strip()
        if section not in SECTIONS or "." not in item.partition("=")[0]:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE with SECTION one of {', '.join(SECTIONS)}")
    apply_set_items(sections, args.set_items)
    with live_run_events(enabled=not args.quiet) as events:
        result = run_stages(
            stages_from(sections),
            args.inputs,
            args.out,
            input_format=args.format,
            columns=parse_columns(args.column),
            force=args.force,
            events=events,
            base_dir=args.config.parent if args.config else None,  # eval files etc. relative to the config
        )
    print_summary(result.manifest)
    console.print(f"kept: {result.run_dir / 'filter' / 'data.parquet'}")
    console.print(f"dropped: {result.run_dir / 'filter' / 'dropped.parquet'}")
    return 0
