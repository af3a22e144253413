"""`curate report RUN_DIR`: regenerate the run's self-contained report.html (funnel, drop reasons,
quarantine, split sizes, length histograms, near-duplicate clusters, languages and labels)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from curate.display import console
from curate.report import write_report
from safety.locking import exclusive_lock
from safety.ownership import claim_file, is_owned


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="regenerate RUN_DIR/report.html from a run directory", description=__doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (holds manifest.json)")
    parser.add_argument("--out", type=Path, help="write the HTML here instead of RUN_DIR/report.html")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    # A report.html (or --out file) that curate did not write is never overwritten: written when new, or
    # when the run dir (ours) records it; a run writing into the run dir is waited for by its lock.
    wanted = args.out if args.out is not None else args.run_dir / "report.html"
    with exclusive_lock(args.run_dir, "curate run") if is_owned(args.run_dir, "curate") else nullcontext():
        claim_file(wanted, "curate", protected=[args.run_dir / "manifest.json"])
        target = write_report(args.run_dir, args.out)
    console.print(f"report: {target}")
    return 0
