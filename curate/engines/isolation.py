"""A stage's work in a process of its own, so that every stage starts from a fresh heap.

Polars' allocator (jemalloc) and Arrow's pool keep memory that a phase freed for the next one, and
none of it goes back to the system between stages: measured at 1M records, the split stage alone peaks
at 870 MB, but at the end of a whole pipeline in one process it reached 1,165-1,331 MB. A process per
stage returns everything when the stage ends, so a run's peak is its largest stage's, not the sum of
what every stage before it left behind. It costs a process start (~1 s of imports) per stage, which is
why the local engine isolates only stages with large inputs unless told otherwise
(`engine: isolate_stages`).

The child is a fresh interpreter (`python -m curate.engines.isolation`, not a fork: Polars' thread
pool does not survive a fork; and not multiprocessing's spawn, which re-imports the caller's main
script in the child, running any unguarded top-level code of a user's script a second time). It gets
the work pickled on its stdin, with this process's `sys.path` (plugin stages import there too), and
rebuilds the stage context with progress callbacks that send each report back over a pipe; this
process hands them to its own callbacks, so bars and counts look the same. The child's return value
comes back pickled (a report dict, file reports); its exception is raised again here, the same type
with the same one-line message where it can be pickled (every `CurateError` can). A child that ends
without answering (killed, out of memory) is an error naming the stage and the signal.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import traceback
from typing import Any, Callable

from curate.errors import CurateError
from curate.stage import StageContext


class StageProcessError(CurateError):
    """A stage's process ended without a result (killed by a signal, out of memory, exited)."""


_CALLBACKS = ("progress", "phase_progress")
_HEADER = struct.Struct("<Q")  # each message on the pipe: its length, then the pickle


def run_in_child(function: Callable[..., Any], ctx: StageContext, *args: Any) -> Any:
    """`function(ctx, *args)` in a new interpreter; its progress reported through `ctx`'s callbacks.

    `function` and `args` must pickle (module-level functions, configs, paths); the caller checks
    that a stage can be found by name in a fresh process (`importable_stage_type`)."""
    state = {key: value for key, value in ctx.__getstate__().items() if key not in _CALLBACKS}
    payload = pickle.dumps(list(sys.path)) + pickle.dumps((function, args, state), protocol=pickle.HIGHEST_PROTOCOL)
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
                process.stdin.write(payload)
                process.stdin.close()
            except BrokenPipeError:  # it ended before reading its work: _serve reports how
                pass
            return _serve(replies, process, ctx)
        finally:
            if process.poll() is None:  # this process was interrupted (Ctrl-C) or failed: the child goes too
                process.terminate()
            process.wait()


def _serve(replies, process: subprocess.Popen, ctx: StageContext) -> Any:
    """Forward the child's reports until its result or error arrives (or it ends without one)."""
    while True:
        message = _receive(replies)
        if message is None:
            raise StageProcessError(f"stage {ctx.name!r}: its process ended without a result ({_ending(process.wait())})")
        kind = message[0]
        if kind == "progress":
            ctx.progress(message[1])
        elif kind == "phase":
            ctx.phase_progress(*message[1:])
        elif kind == "result":
            return message[1]
        elif kind == "error":
            raise _error_from(message[1], ctx.name)


def _receive(stream) -> tuple | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    body = stream.read(_HEADER.unpack(header)[0])
    return pickle.loads(body) if body else None


def _ending(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = ": out of memory? lower engine: batch_rows, or give the run more memory" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def _error_from(payload: tuple, stage: str) -> BaseException:
    pickled, type_name, message = payload
    if pickled is not None:
        try:
            return pickle.loads(pickled)
        except Exception:  # an exception type that does not unpickle: keep its name and message
            pass
    return RuntimeError(f"stage {stage!r} failed in its process: {type_name}: {message}")


def _child_main(reply_fd: int) -> None:
    replies = os.fdopen(reply_fd, "wb")

    def send(message: tuple) -> None:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        replies.write(_HEADER.pack(len(body)) + body)
        replies.flush()

    sys.path[:] = pickle.load(sys.stdin.buffer)  # first: the work may live in modules only the parent's path finds
    function, args, state = pickle.load(sys.stdin.buffer)
    ctx = StageContext.__new__(StageContext)
    ctx.__setstate__(state)
    ctx.progress = lambda message: send(("progress", message))
    ctx.phase_progress = lambda phase, done, total, unit: send(("phase", phase, done, total, unit))
    try:
        result = function(ctx, *args)
    except BaseException as error:  # every failure goes back to the parent, which decides what to show
        if not isinstance(error, (CurateError, KeyboardInterrupt)):
            traceback.print_exc()  # a bug: its traceback is only here
        send(("error", _portable(error)))
    else:
        send(("result", result))
    replies.close()


def _portable(error: BaseException) -> tuple:
    try:
        pickled = pickle.dumps(error)
        pickle.loads(pickled)
    except Exception:
        pickled = None
    return pickled, type(error).__name__, str(error)


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
