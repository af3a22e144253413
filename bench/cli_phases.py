"""`curate ARGS` as the CLI runs it, with one `@phase stage: phase` line per change of stage or phase
instead of the live display: the measured child of bench/scale.py, so it can say in which phase each
new memory peak was reached. Nothing is imported before `curate.cli`, so the CLI's process start
(allocator settings made before Polars loads) is what gets measured.

    python bench/cli_phases.py run PIPELINE.yaml --run-dir RUN --force
"""

from __future__ import annotations

import contextlib
import re
import sys

PHASE_MARK = "@phase "


def main(argv: list[str]) -> int:
    import curate.cli
    import curate.commands.run
    from curate.runner import RunEvents

    current = [""]

    def mark(text: str) -> None:
        if text != current[0]:
            current[0] = text
            print(PHASE_MARK + text, flush=True)

    @contextlib.contextmanager
    def phase_lines(enabled: bool = True):
        yield RunEvents(
            stage_started=lambda name, type_name: mark(name),
            # "file.jsonl: 41,647 rows" is one phase, not one per count.
            stage_progress=lambda name, message: mark(f"{name}: {re.sub(r'[0-9][0-9,]* rows', 'N rows', message)}"),
            phase_progress=lambda name, phase, done, total, unit: mark(f"{name}: {phase}"),
        )

    curate.commands.run.live_run_events = phase_lines
    return curate.cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
