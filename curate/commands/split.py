"""`curate split INPUT... --out DIR`: leak-free train/validation/test splits of raw files or a stage's output.

Runs the `split` stage alone (ingest first, unless the input is already a canonical data.parquet, such
as a dedup stage's output with `dup_cluster`) into a run directory: `DIR/sft/` and `DIR/pref/` with
`<split>-00000-of-0000N.parquet` shards and a dataset card each, `DIR/split/data.parquet` (every row
with its `split`), `DIR/manifest.json` and `DIR/report.html`.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from curate.cli_support import (
    add_input_arguments,
    add_set_argument,
    apply_overrides,
    apply_set_items,
    derive_flags_from_model,
    load_stage_config,
    parse_columns,
)
from curate.display import console, live_run_events, print_summary
from curate.errors import ConfigError
from curate.runner import run_single_stage
from curate.split import SPLITS, SplitConfig


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "split",
        help="split into sft/ and pref/ train/validation/test sets, keeping near-duplicate clusters together",
        description=__doc__,
    )
    add_input_arguments(parser, "raw files or a canonical data.parquet", "YAML file with the split stage config (flags override it)")
    parser.add_argument("--train", type=float, help="train fraction")
    parser.add_argument("--validation", type=float, help="validation fraction")
    parser.add_argument("--test", type=float, help="test fraction")
    parser.add_argument("--seed", type=int, help="assignment seed (default: the run seed, 0)")
    parser.add_argument("--stratify-by", help="`source` or a column name (e.g. a label)")
    parser.add_argument("--min-validation-rows", type=int, help="minimum validation rows per dataset")
    parser.add_argument("--min-test-rows", type=int, help="minimum test rows per dataset")
    parser.add_argument("--previous-splits", help="folder with earlier sft/ and pref/ splits to extend")
    parser.add_argument("--max-shard-rows", type=int, help="rows per Parquet shard")
    parser.add_argument("--save-to-disk", action="store_true", default=None, help="also write datasets.save_to_disk copies")
    parser.add_argument("--license", help="license field of the dataset cards")
    parser.add_argument(
        "--group-prompts",
        choices=["near", "exact", "off"],
        help="keep rows with the same (exact) or also near-duplicate (near) prompts in one split; off: dup_cluster only",
    )
    parser.add_argument("--prompt-threshold", type=float, help="Jaccard at which two prompts are near-duplicates")
    add_set_argument(parser, "group_prompts=exact")
    parser.add_argument("--force", action="store_true", help="recompute even if cached")
    parser.add_argument("--quiet", action="store_true", help="no live display")
    derive_flags_from_model(parser, SplitConfig, FLAG_FIELDS)
    parser.set_defaults(handler=handle)


FLAG_FIELDS = (
    "train",
    "validation",
    "test",
    "seed",
    "stratify_by",
    "min_validation_rows",
    "min_test_rows",
    "previous_splits",
    "max_shard_rows",
    "save_to_disk",
    "license",
    "group_prompts",
    "prompt_threshold",
)


def handle(args) -> int:
    config = apply_overrides(load_stage_config(args.config, "split"), args, FLAG_FIELDS)
    given = [name for name in SPLITS if getattr(args, name) is not None]
    if given and len(given) < len(SPLITS):
        # Some fractions on the command line: the others share what is left in their configured ratio.
        rest = [name for name in SPLITS if name not in given]
        left = 1.0 - sum(getattr(args, name) for name in given)
        if left < -1e-9:
            raise ConfigError(f"--{' + --'.join(given)} add up to more than 1")
        base = {name: float(config.get(name, SplitConfig.model_fields[name].default)) for name in rest}
        total = sum(base.values())
        for name in rest:
            config[name] = max(0.0, left) * (base[name] / total if total else 1 / len(rest))
    config = apply_set_items(config, args.set_items)
    if config.get("previous_splits"):
        config["previous_splits"] = str(Path(config["previous_splits"]).expanduser().resolve())
    with live_run_events(enabled=not args.quiet) as events:
        result = run_single_stage("split", config, args.inputs, args.out, input_format=args.format, columns=parse_columns(args.column), force=args.force, events=events)
    print_summary(result.manifest)
    stage = next((s for s in result.manifest["stages"] if s.get("type") == "split"), None)
    folders = ((stage or {}).get("report") or {}).get("folders") or {}
    table = Table(title="splits")
    table.add_column("dataset")
    for split in SPLITS:
        table.add_column(split, justify="right")
    table.add_column("folder")
    for name, info in folders.items():
        table.add_row(name, *(f"{info['counts'][split]:,}" for split in SPLITS), info["path"])
    console.print(table)
    return 0
