"""`curate run PIPELINE.yaml`: execute a pipeline into its run directory."""

from __future__ import annotations

from pathlib import Path

from curate.display import console, live_run_events, print_summary
from curate.runner import clean_run_dir, load_pipeline, run_pipeline


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a YAML pipeline end to end (resumes: unchanged stages are skipped)",
        description="Run a curation pipeline into its run directory. Stages whose inputs and config are "
        "unchanged since their last successful run are skipped, so a rerun after a crash resumes.",
    )
    parser.add_argument("pipeline", type=Path, help="pipeline YAML file")
    parser.add_argument("--run-dir", type=Path, help="override the pipeline's run_dir")
    parser.add_argument("--force", action="store_true", help="recompute every stage, ignoring cached outputs")
    parser.add_argument("--clean", action="store_true", help="delete the run directory first")
    parser.add_argument("--quiet", action="store_true", help="no live display; print only the summary")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    pipeline = load_pipeline(args.pipeline, run_dir=args.run_dir)
    if args.clean:
        clean_run_dir(pipeline.run_dir)
    with live_run_events(enabled=not args.quiet) as events:
        result = run_pipeline(pipeline, force=args.force, events=events)
    print_summary(result.manifest)
    console.print(f"manifest: {result.run_dir / 'manifest.json'}")
    for extra in ("report.html", "sft", "pref"):
        if (result.run_dir / extra).exists():
            console.print(f"{extra}: {result.run_dir / extra}")
    return 0
