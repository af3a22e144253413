"""Peak memory of one benchmark side, run in a process of its own.

`ru_maxrss` of a child cannot be used: exec keeps the parent's peak, so every side would report at least
the parent's. Instead a side reports its own VmHWM (per address space, fresh at exec), and the parent
samples the proportional set size (PSS) summed over the side's process tree every 50 ms, which counts the
worker processes some peers fork (datatrove, `datasets.map(num_proc=...)`), with their copy-on-write pages
counted once. The peak is the larger of the two.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import time


def own_peak_mb() -> float:
    """This process's own peak RSS (VmHWM)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_memory_mb(pid: int) -> float:
    """PSS summed over a process and its descendants, in MB (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def _child(target, args, queue) -> None:
    result = target(*args)
    result["own_peak_mb"] = own_peak_mb()
    queue.put(result)


def run_measured(target, *args) -> dict:
    """`target(*args)` (a module-level function returning a dict) in a spawned process; the dict comes back
    with `peak_mb` added."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    peak = 0.0
    while True:
        peak = max(peak, tree_memory_mb(process.pid))
        try:
            result = queue.get(timeout=0.05)
            break
        except queue_module.Empty:
            if not process.is_alive():
                what = " ".join(getattr(f, "__name__", "") for f in (target, *args[:1]) if callable(f))
                raise SystemExit(f"{what} failed (exit code {process.exitcode}; its error is above)") from None
    process.join()
    result["peak_mb"] = max(peak, result.pop("own_peak_mb"))
    return result
