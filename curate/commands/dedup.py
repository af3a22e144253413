"""`curate dedup INPUT... --out DIR`: exact and MinHash near-dedup of raw files or a stage's output.

Runs the `dedup` stage alone (ingest first, unless the input is already a canonical data.parquet) into
a run directory: `DIR/dedup/data.parquet` (kept rows, with `dup_cluster`), `DIR/dedup/dropped.parquet`
(reason, duplicate_of, jaccard_estimated, jaccard_verified), `DIR/dedup/index/` (the index a later run
can dedup against with `--index`), and `DIR/manifest.json`.
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
from curate.dedup import DedupConfig
from curate.display import console, live_run_events, print_summary
from curate.runner import run_single_stage


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dedup",
        help="remove exact and MinHash near duplicates (standalone dedup stage)",
        description=__doc__,
    )
    add_input_arguments(parser, "raw files or a canonical data.parquet", "YAML file with the dedup stage config (flags override it)")
    parser.add_argument("--index", dest="index_path", help="a saved dedup index folder to dedup against")
    parser.add_argument("--threshold", type=float, help="Jaccard threshold for near duplicates")
    parser.add_argument("--num-perm", type=int, help="MinHash permutations")
    parser.add_argument("--bands", type=int, help="LSH bands (with --rows; default: optimal for threshold)")
    parser.add_argument("--rows", type=int, help="LSH rows per band (with --bands)")
    parser.add_argument("--shingle", choices=["char", "word"], help="shingle unit")
    parser.add_argument("--ngram", type=int, help="shingle length in units")
    parser.add_argument("--hash", choices=["xxh32", "sha1"], help="shingle hash")
    parser.add_argument("--key", choices=["conversation", "prompt"], help="what SFT rows are compared on")
    parser.add_argument(
        "--preference-key",
        choices=["pair", "prompt"],
        help="what preference rows are compared on: prompt + chosen + rejected or the prompt alone",
    )
    parser.add_argument(
        "--no-lowercase", dest="lowercase", action="store_false", default=None, help="case-sensitive keys"
    )
    parser.add_argument(
        "--strip-punctuation", action="store_true", default=None, help="punctuation and symbols to spaces (merges more)"
    )
    parser.add_argument(
        "--normalize-digits", action="store_true", default=None, help="every digit to 0 (merges rows that differ only in numbers)"
    )
    parser.add_argument(
        "--merge-number-variants", action="store_true", default=None,
        help="let rows that differ only in their numbers be near duplicates",
    )
    parser.add_argument(
        "--keep", choices=["longest_response", "highest_score", "earliest_source"], help="which duplicate survives"
    )
    parser.add_argument("--score-column", help="column for --keep highest_score")
    parser.add_argument("--no-exact", dest="exact", action="store_false", default=None, help="skip exact dedup")
    parser.add_argument("--no-near", dest="near", action="store_false", default=None, help="skip near dedup")
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", default=None, help="trust MinHash estimates, skip exact Jaccard"
    )
    add_set_argument(parser, "threshold=0.8")
    parser.add_argument("--force", action="store_true", help="recompute even if cached")
    parser.add_argument("--quiet", action="store_true", help="no live display")
    derive_flags_from_model(parser, DedupConfig, FLAG_FIELDS)
    parser.set_defaults(handler=handle)


FLAG_FIELDS = (
    "index_path",
    "threshold",
    "num_perm",
    "bands",
    "rows",
    "shingle",
    "ngram",
    "hash",
    "key",
    "preference_key",
    "lowercase",
    "strip_punctuation",
    "normalize_digits",
    "merge_number_variants",
    "keep",
    "score_column",
    "exact",
    "near",
    "verify",
)


def handle(args) -> int:
    config = apply_set_items(apply_overrides(load_stage_config(args.config, "dedup"), args, FLAG_FIELDS), args.set_items)
    if config.get("index_path"):
        config["index_path"] = str(Path(config["index_path"]).expanduser().resolve())
    with live_run_events(enabled=not args.quiet) as events:
        result = run_single_stage("dedup", config, args.inputs, args.out, input_format=args.format, columns=parse_columns(args.column), force=args.force, events=events)
    print_summary(result.manifest)
    stage = next((s for s in result.manifest["stages"] if s.get("type") == "dedup"), None)
    report = (stage or {}).get("report") or {}
    if report.get("largest_clusters"):
        table = Table(title="largest duplicate clusters")
        table.add_column("size", justify="right")
        table.add_column("dup_cluster")
        table.add_column("example")
        for cluster in report["largest_clusters"]:
            example = " ".join(cluster["example"].split())
            table.add_row(str(cluster["size"]), cluster["dup_cluster"], example[:80])
        console.print(table)
    if report.get("index", {}).get("path"):
        console.print(f"index: {report['index']['path']}")
    return 0
