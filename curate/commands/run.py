"""`curate run PIPELINE.yaml`: execute a pipeline into its run directory."""

from __future__ import annotations

from pathlib import Path

from curate.cli_support import add_engine_arguments, engine_from_args
from curate.display import console, live_run_events, print_summary
from curate.runner import load_pipeline, run_pipeline


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
    parser.add_argument("--clean", action="store_true", help="first remove the outputs an earlier run recorded in the run directory (never other files)")
    parser.add_argument("--quiet", action="store_true", help="no live display; print only the summary")
    add_engine_arguments(parser)
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    pipeline = load_pipeline(args.pipeline, run_dir=args.run_dir)
    # After the pipeline is read: a config error needs no cluster.
    engine = engine_from_args(args, getattr(pipeline, "engine_options", None))
    try:
        with live_run_events(enabled=not args.quiet) as events:
            result = run_pipeline(pipeline, force=args.force, events=events, clean=args.clean, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    print_summary(result.manifest)
    if result.removed_stale:
        console.print(f"removed outputs of stages no longer in the pipeline: {', '.join(result.removed_stale)}", markup=False)
    console.print(f"manifest: {result.run_dir / 'manifest.json'}")
    for extra in ("report.html", "sft", "pref"):
        if (result.run_dir / extra).exists():
            console.print(f"{extra}: {result.run_dir / extra}")
    return 0
