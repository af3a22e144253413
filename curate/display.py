"""Rich rendering for the CLI: a live view while a pipeline runs, and the summary tables.

User text (paths, stage names, JSON keys, drop reasons, messages from services) is never read as rich
markup: the console has markup off, so a string is always shown as written, and our own styling is
built as `Text` with a style. Everything shown also passes through `safety.redact` (a URL in a message
may carry credentials)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator

from rich import filesize
from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
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

    bars = PhaseBars()
    view = lambda: Group(render(), bars.progress)  # noqa: E731 - the live view: stage table, then the bars

    with Live(view(), console=console, refresh_per_second=8, transient=True) as live:

        def started(name: str, type_name: str) -> None:
            rows[name] = {"type": type_name, "status": styled("running…", "yellow")}
            live.update(view())

        def progress(name: str, message: str) -> None:
            rows.setdefault(name, {})["status"] = styled(message, "yellow")
            live.update(view())

        def phase(name: str, phase_name: str, done: int, total: int | None, unit: str) -> None:
            bars.update(name, phase_name, done, total, unit)
            live.update(view())

        def finished(name: str, record: dict) -> None:
            rows[name]["status"] = styled("cached", "dim") if record.get("skipped") else styled("done", "green")
            rows[name]["numbers"] = _numbers(record)
            bars.finish_stage(name)
            live.update(view())

        yield RunEvents(stage_started=started, stage_progress=progress, phase_progress=phase, stage_finished=finished)


class RateColumn(ProgressColumn):
    """Units per second (bytes shown as MB/s), from rich's own speed estimate."""

    def render(self, task) -> Text:
        if not task.speed:
            return Text("")
        unit = task.fields.get("unit", "")
        if unit == "bytes":
            return Text(f"{filesize.decimal(int(task.speed))}/s", style="cyan")
        return Text(f"{task.speed:,.0f} {unit}/s", style="cyan")


class CountColumn(ProgressColumn):
    """done/total (or just done when the total is unknown), bytes in decimal units."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "")
        show = (lambda n: filesize.decimal(int(n))) if unit == "bytes" else (lambda n: f"{int(n):,}")
        total = f"/{show(task.total)}" if task.total is not None else ""
        return Text(f"{show(task.completed)}{total} {'' if unit == 'bytes' else unit}".rstrip(), style="green")


class PhaseBars:
    """One bar per counted phase of the running stage: count, %, ETA and rate; a stage's bars go when
    it finishes (its row in the table says how it ended)."""

    def __init__(self):
        self.progress = Progress(
            TextColumn("  {task.description}", markup=False),  # stage names are user text
            BarColumn(bar_width=30),
            CountColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            RateColumn(),
            console=console,
            auto_refresh=False,
        )
        self._tasks: dict[tuple[str, str], int] = {}

    def update(self, stage: str, phase: str, done: int, total: int | None, unit: str) -> None:
        key = (stage, phase)
        if key not in self._tasks:
            self._tasks[key] = self.progress.add_task(redact(f"{stage}: {phase}"), total=total, unit=unit)
        self.progress.update(self._tasks[key], completed=done, total=total)

    def finish_stage(self, stage: str) -> None:
        for key in [key for key in self._tasks if key[0] == stage]:
            self.progress.remove_task(self._tasks.pop(key))


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
