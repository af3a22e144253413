"""`curate preview RUN_DIR [--stage S] [--reason R] [--quarantined] [-n N]`: example rows of a run.

Without --reason: rows a stage kept (default: the last stage). With --reason: rows dropped for that
reason (in --stage, or in every stage that dropped rows). With --quarantined: raw lines ingest could
not read, with the field and detail of why (filtered by --reason if given). Text is shown as written.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from rich.table import Table

from curate.display import console, styled
from curate.errors import ConfigError
from curate.examples import quarantine_examples, row_examples, stage_folder, stage_names
from curate.runner import load_manifest


def register(subparsers) -> None:
    parser = subparsers.add_parser("preview", help="print example rows of a run (kept, dropped by reason, quarantined)", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", help="stage name (default: the last stage; with --reason: every stage)")
    parser.add_argument("--reason", help="show rows dropped (or quarantined) for this reason")
    parser.add_argument("--quarantined", action="store_true", help="show quarantined raw lines")
    parser.add_argument("-n", type=int, default=5, help="rows per table (default 5)")
    parser.set_defaults(handler=handle)


def _table(title: str, frame: pl.DataFrame) -> Table:
    table = Table(title=styled(title), show_lines=True, expand=True)
    for column in frame.columns:
        if column == "reason":  # a name users pass back to --reason: never wrapped or cut
            width = max([len(column), *(len(value or "") for value in frame[column].to_list())])
            table.add_column(column, no_wrap=True, min_width=width)
        else:
            table.add_column(column, overflow="fold", ratio=4 if column in ("text", "raw") else 1)
    for row in frame.iter_rows():
        table.add_row(*(styled("" if value is None else value) for value in row))
    return table


def _show(title: str, frame: pl.DataFrame) -> None:
    if frame.is_empty():
        console.print(styled(f"{title}: no rows"))
    else:
        console.print(_table(title, frame.drop([c for c in frame.columns if frame[c].null_count() == frame.height])))


def handle(args) -> int:
    if args.n < 1:
        raise ConfigError("curate preview: -n must be at least 1")
    manifest = load_manifest(args.run_dir)
    if args.quarantined:
        path = args.run_dir / "quarantine.parquet"
        if not path.exists():
            raise ConfigError(f"{args.run_dir}: no quarantine.parquet (nothing was quarantined)")
        title = "quarantined" + (f", reason {args.reason}" if args.reason else "")
        _show(title, quarantine_examples(path, args.n, args.reason))
        return 0
    if args.reason is None:
        stage, folder = stage_folder(args.run_dir, manifest, args.stage)
        _show(f"kept by {stage}", row_examples(folder / "data.parquet", args.n))
        return 0
    stages = [stage_folder(args.run_dir, manifest, args.stage)[0]] if args.stage else stage_names(manifest)
    shown = 0
    for stage in stages:
        path = args.run_dir / stage / "dropped.parquet"
        if path.exists():
            frame = row_examples(path, args.n, args.reason)
            if not frame.is_empty():
                _show(f"dropped by {stage}, reason {args.reason}", frame)
                shown += 1
    if not shown:
        raise ConfigError(f"{args.run_dir}: no rows dropped for reason {args.reason!r}" + (f" in stage {args.stage!r}" if args.stage else ""))
    return 0
