"""A stage's work in a process of its own, so that every stage starts from a fresh heap.

Polars' allocator (jemalloc) and Arrow's pool keep memory that a phase freed for the next one, and
none of it goes back to the system between stages: measured at 1M records, the split stage alone peaks
at 870 MB, but at the end of a whole pipeline in one process it reached 1,165-1,331 MB. A process per
stage returns everything when the stage ends, so a run's peak is its largest stage's, not the sum of
what every stage before it left behind. It costs a process start (~0.6 CPU-s of imports) per stage,
which is why the local engine isolates only stages with large inputs unless told otherwise
(`engine: isolate_stages`).

The child is a fresh interpreter (`python -m curate.engines.isolation`, not a fork: Polars' thread
pool does not survive a fork; and not multiprocessing's spawn, which re-imports the caller's main
script in the child, running any unguarded top-level code of a user's script a second time).

Everything between the two processes is JSON, never a pickle (nothing here may unpickle bytes, even
from our own child): the child reads one JSON object on its stdin — this process's `sys.path` (plugin
stages import there too), the task (one of TASKS, by name), the stage context's plain fields and the
task's arguments as JSON — and writes JSON lines to a pipe: progress reports, which this process hands
to its own callbacks (bars and counts look the same), then the task's JSON result or its error. A
`CurateError` comes back as the same class with the same one-line message; any other error as a
RuntimeError naming its type (its traceback is printed by the child). A child that ends without
answering (killed, out of memory) is an error naming the stage and the signal.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import curate.errors
from curate.errors import CurateError
from curate.stage import StageContext

# What a child may be asked to run: task name -> "module:function(ctx, arguments: dict) -> JSON-able".
TASKS = {
    "stage": "curate.runner:stage_task",
    "ingest": "curate.runner:ingest_task",
}


class StageProcessError(CurateError):
    """A stage's process ended without a result (killed by a signal, out of memory, exited)."""


def run_in_child(task: str, ctx: StageContext, arguments: dict) -> Any:
    """TASKS[task](ctx, arguments) in a new interpreter; its progress reported through `ctx`'s
    callbacks; its JSON result returned. `arguments` must be JSON (paths as strings)."""
    request = {
        "sys_path": list(sys.path),
        "task": task,
        "context": _context_fields(ctx),
        "arguments": arguments,
    }
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "curate.engines.isolation", str(write_end)], stdin=subprocess.PIPE, pass_fds=(write_end,)
        )
    finally:
        os.close(write_end)  # the child holds it now: end of file here means the child is gone
    with os.fdopen(read_end, "rb") as replies:
        try:
            try:
                process.stdin.write(json.dumps(request).encode("utf-8"))
                process.stdin.close()
            except BrokenPipeError:  # it ended before reading its work: _serve reports how
                pass
            return _serve(replies, process, ctx)
        finally:
            if process.poll() is None:  # this process was interrupted (Ctrl-C) or failed: the child goes too
                process.terminate()
            process.wait()


def _context_fields(ctx: StageContext) -> dict:
    # The input schema is not sent: the child reads it from the input file, as the runner does.
    return {
        "name": ctx.name, "run_dir": str(ctx.run_dir), "stage_dir": str(ctx.stage_dir), "pipeline_dir": str(ctx.pipeline_dir),
        "seed": ctx.seed, "input_path": str(ctx.input_path) if ctx.input_path is not None else None,
        "with_input_schema": ctx.input_schema is not None,
    }  # fmt: skip


def _serve(replies, process: subprocess.Popen, ctx: StageContext) -> Any:
    """Forward the child's reports until its result or error arrives (or it ends without one)."""
    for line in replies:
        message = json.loads(line)
        kind = message["kind"]
        if kind == "progress":
            ctx.progress(message["message"])
        elif kind == "phase":
            ctx.phase_progress(message["phase"], message["done"], message["total"], message["unit"])
        elif kind == "result":
            return message["result"]
        elif kind == "error":
            raise _error_from(message, ctx.name)
    raise StageProcessError(f"stage {ctx.name!r}: its process ended without a result ({_ending(process.wait())})")


def _ending(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = ": out of memory? lower engine: batch_rows, or give the run more memory" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def _error_from(message: dict, stage: str) -> BaseException:
    """The child's error as an exception of this process: a CurateError class of curate.errors (or this
    module) by name, with its message; anything else a RuntimeError saying what it was."""
    if message["curate"]:
        for module in (curate.errors, sys.modules[__name__]):
            kind = getattr(module, message["type"], None)
            if isinstance(kind, type) and issubclass(kind, CurateError):
                return kind(message["message"])
        return CurateError(message["message"])
    if message["type"] == "KeyboardInterrupt":
        return KeyboardInterrupt()
    return RuntimeError(f"stage {stage!r} failed in its process: {message['type']}: {message['message']}")


def _json_value(value: Any) -> Any:
    """What `json` cannot write itself: numpy scalars (in reports) as numbers, anything else as text."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def _child_main(reply_fd: int) -> None:
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")

    def send(message: dict) -> None:
        replies.write(json.dumps(message, default=_json_value) + "\n")
        replies.flush()

    request = json.loads(sys.stdin.buffer.read())
    sys.path[:] = request["sys_path"]  # before the task's module is imported: plugins live on this path
    module_name, function_name = TASKS[request["task"]].split(":")
    task = getattr(importlib.import_module(module_name), function_name)
    ctx = _context(request["context"])
    ctx.progress = lambda text: send({"kind": "progress", "message": text})
    ctx.phase_progress = lambda phase, done, total, unit: send({"kind": "phase", "phase": phase, "done": done, "total": total, "unit": unit})
    try:
        result = task(ctx, request["arguments"])
    except BaseException as error:  # every failure goes back to the parent, which decides what to show
        if not isinstance(error, (CurateError, KeyboardInterrupt)):
            traceback.print_exc()  # a bug: its traceback is only here
        send({"kind": "error", "type": type(error).__name__, "curate": isinstance(error, CurateError), "message": str(error)})
    else:
        send({"kind": "result", "result": result})
    replies.close()


def _context(fields: dict) -> StageContext:
    import polars as pl

    input_path = Path(fields["input_path"]) if fields["input_path"] else None
    return StageContext(
        name=fields["name"], run_dir=Path(fields["run_dir"]), stage_dir=Path(fields["stage_dir"]),
        pipeline_dir=Path(fields["pipeline_dir"]), seed=fields["seed"], input_path=input_path,
        input_schema=dict(pl.scan_parquet(input_path, glob=False).collect_schema()) if fields["with_input_schema"] else None,
    )  # fmt: skip


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
