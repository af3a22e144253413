"""`curate report RUN_DIR`: regenerate the run's self-contained report.html (funnel, drop reasons,
quarantine, split sizes, length histograms, near-duplicate clusters, languages and labels)."""

from __future__ import annotations

from pathlib import Path

from curate.display import console
from curate.report import write_report


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="regenerate RUN_DIR/report.html from a run directory", description=__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds manifest.json)")
    parser.add_argument("--out", type=Path, help="write the HTML here instead of RUN_DIR/report.html")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    target = write_report(args.run_dir, args.out)
    console.print(f"report: {target}")
    return 0
