"""`curate stats RUN_DIR`: print a finished run's summary tables again."""

from __future__ import annotations

from pathlib import Path

from curate.display import print_json, print_summary
from curate.runner import load_manifest


def register(subparsers) -> None:
    parser = subparsers.add_parser("stats", help="print the summary of a finished run", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    manifest = load_manifest(args.run_dir)
    if args.json:
        print_json(manifest)
    else:
        print_summary(manifest)
    return 0
