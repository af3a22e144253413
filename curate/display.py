"""Rich rendering for the CLI: a live view while a pipeline runs, and the summary tables.

User text (paths, stage names, JSON keys, drop reasons, messages from services) is never read as rich
markup: the console has markup off, so a string is always shown as written, and our own styling is
built as `Text` with a style. Everything shown also passes through `safety.redact` (a URL in a message
may carry credentials)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from curate.runner import RunEvents
from safety.redact import redact

console = Console(highlight=False, soft_wrap=True, markup=False)


def styled(text: str, style: str = "") -> Text:
    """User or service text as a rich Text: shown literally (no markup), credentials redacted."""
    return Text(redact(str(text)), style=style)


@contextmanager
def live_run_events(enabled: bool = True) -> Iterator[RunEvents]:
    """A live table of stages (status, rows, time) that updates as the runner reports events."""
    rows: dict[str, dict] = {}

    def render() -> Table:
        table = Table(title="curate run", expand=False, show_lines=False)
        for column in ("stage", "type", "status", "rows in", "kept", "dropped", "seconds"):
            table.add_column(column, justify="right" if column in ("rows in", "kept", "dropped", "seconds") else "left")
        for name, row in rows.items():
            table.add_row(name, row.get("type", ""), row.get("status", ""), *row.get("numbers", ("", "", "", "")))
        return table

    if not enabled or not console.is_terminal:
        yield RunEvents(
            stage_finished=lambda name, record: console.print(
                styled(f"{name}: {'cached' if record.get('skipped') else 'done'} ({record['rows_out']:,} rows)", "dim")
            )
            if enabled
            else None
        )
        return

    with Live(render(), console=console, refresh_per_second=8, transient=True) as live:

        def started(name: str, type_name: str) -> None:
            rows[name] = {"type": type_name, "status": styled("running…", "yellow")}
            live.update(render())

        def progress(name: str, message: str) -> None:
            rows.setdefault(name, {})["status"] = styled(message, "yellow")
            live.update(render())

        def finished(name: str, record: dict) -> None:
            rows[name]["status"] = styled("cached", "dim") if record.get("skipped") else styled("done", "green")
            rows[name]["numbers"] = _numbers(record)
            live.update(render())

        yield RunEvents(stage_started=started, stage_progress=progress, stage_finished=finished)


def _numbers(record: dict) -> tuple[str, str, str, str]:
    dropped = record.get("rows_dropped", 0) + record.get("rows_quarantined", 0)
    return (
        f"{record['rows_in']:,}",
        f"{record['rows_out']:,}",
        f"{dropped:,}",
        f"{record.get('seconds', 0):.2f}",
    )


def summary_tables(manifest: dict) -> list[Table]:
    """The run summary: one row per stage, then reasons for everything that did not flow on."""
    stages = Table(title=f"run {manifest['pipeline']['name']} → {manifest['run_dir']}")
    for column in ("stage", "type", "rows in", "kept", "dropped", "quarantined", "seconds", ""):
        stages.add_column(column, justify="left" if column in ("stage", "type", "") else "right")
    for record in manifest["stages"]:
        stages.add_row(
            record["name"],
            record["type"],
            f"{record['rows_in']:,}",
            f"{record['rows_out']:,}",
            f"{record.get('rows_dropped', 0):,}",
            f"{record.get('rows_quarantined', 0):,}" if "rows_quarantined" in record else "",
            f"{record.get('seconds', 0):.2f}",
            "cached" if record.get("skipped") else "",
        )
    accounting = manifest["accounting"]
    stages.caption = Text.assemble(
        f"rows in {accounting['rows_in']:,}"
        + (f" + added {accounting['rows_added']:,}" if accounting.get("rows_added") else "")
        + f" = kept {accounting['kept']:,} + dropped {accounting['dropped']:,} + quarantined {accounting['quarantined']:,}",
        ("  ✓ reconciled", "green") if accounting["reconciled"] else ("  ✗ does not reconcile", "red"),
    )
    tables = [stages]

    reasons = Table(title="why rows did not flow on")
    reasons.add_column("stage")
    reasons.add_column("reason")
    reasons.add_column("rows", justify="right")
    for reason, count in accounting.get("quarantined_by_reason", {}).items():
        reasons.add_row("ingest (quarantine)", reason, f"{count:,}")
    for stage, by_reason in accounting.get("dropped_by_stage_reason", {}).items():
        for reason, count in sorted(by_reason.items(), key=lambda item: -item[1]):
            reasons.add_row(stage, reason, f"{count:,}")
    if reasons.row_count:
        tables.append(reasons)

    for record in manifest["stages"]:
        report = record.get("report") or {}
        scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool)) and k != "summary"}
        if not scalars:
            continue
        table = Table(title=f"{record['name']} report")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, value in scalars.items():
            table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
        tables.append(table)
    return tables


def biggest_reasons(accounting: dict, limit: int = 3) -> list[tuple[str, int]]:
    """("stage: reason", rows) for the reasons that removed the most rows, quarantine included."""
    found = [(f"ingest (quarantine): {reason}", count) for reason, count in accounting.get("quarantined_by_reason", {}).items()]
    for stage, by_reason in accounting.get("dropped_by_stage_reason", {}).items():
        found += [(f"{stage}: {reason}", count) for reason, count in by_reason.items()]
    return sorted(found, key=lambda item: (-item[1], item[0]))[:limit]


def empty_output_warning(manifest: dict) -> Text | None:
    """A run that kept nothing is not an error (the report still shows why), but it must not pass unseen."""
    accounting = manifest.get("accounting") or {}
    if accounting.get("kept", 1) or not accounting.get("rows_in"):
        return None
    reasons = ", ".join(f"{name} ({count:,})" for name, count in biggest_reasons(accounting))
    return Text.assemble(("warning:", "bold yellow"), " ", redact(f"no rows survived; biggest reasons: {reasons or 'none recorded'}"))


def print_summary(manifest: dict) -> None:
    for table in summary_tables(manifest):
        console.print(table)
    warning = empty_output_warning(manifest)
    if warning is not None:
        console.print(warning)


def print_json(payload) -> None:
    console.print_json(json.dumps(payload, default=str))
