"""Peak memory of one benchmark side, run in a process of its own; and `curate run`'s peak on N
generated chat records (what the scale bench builds on):

    .venv/bin/python bench/peak_memory.py --records 100000 --stages pii,tag,filter [--batch-rows 50000]
    .venv/bin/python bench/peak_memory.py --records 100000 --curate-root /path/to/other/checkout  # before/after
    .venv/bin/python bench/peak_memory.py dedup --rows 100000   # the dedup stage in memory vs out of core

`ru_maxrss` of a child cannot be used: exec keeps the parent's peak, so every side would report at least
the parent's. Instead a side reports its own VmHWM (per address space, fresh at exec), and the parent
samples the proportional set size (PSS) summed over the side's process tree every 50 ms (less often for
large processes: `sampled`), which counts the worker processes some peers fork (datatrove,
`datasets.map(num_proc=...)`), with their copy-on-write pages counted once. The peak is the larger of
the two.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue as queue_module
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def own_peak_mb() -> float:
    """This process's own peak RSS (VmHWM)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# Reading a process's PSS walks its page tables under the kernel's mmap lock, which the process's own
# page faults and mmap/munmap wait on: sampled every 50 ms, a 4 GB trainer ran at 139 tokens/s instead of
# 233 (bench/train_vs_trl.py, SmolLM2, 2 threads). So a sampler waits at least this many times as long as
# its last sample took, which keeps it under ~2% of the measured side's time whatever that side's size.
SAMPLE_WAIT_FACTOR = 50
MIN_SAMPLE_INTERVAL = 0.05


def sampled(measure):
    """`measure()` timed: (its value, the seconds to wait before the next sample)."""
    started = time.perf_counter()
    value = measure()
    return value, max(MIN_SAMPLE_INTERVAL, SAMPLE_WAIT_FACTOR * (time.perf_counter() - started))


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
        memory, wait = sampled(lambda: tree_memory_mb(process.pid))
        peak = max(peak, memory)
        try:
            result = queue.get(timeout=wait)
            break
        except queue_module.Empty:
            if not process.is_alive():
                what = " ".join(getattr(f, "__name__", "") for f in (target, *args[:1]) if callable(f))
                raise SystemExit(f"{what} failed (exit code {process.exitcode}; its error is above)") from None
    process.join()
    result["peak_mb"] = max(peak, result.pop("own_peak_mb"))
    return result


# --------------------------------------------------------------------------------- `curate run` on N records

TOPICS = ("refund", "router", "invoice", "password", "parcel", "battery", "subscription", "firmware", "login", "warranty")
WORDS = (
    "please could you help me with my order account since yesterday the app keeps crashing when I open settings "
    "thanks for reaching out we are sorry about the trouble here is what you can try first restart the device then "
    "check the cable and update to the latest version if that does not work reply with your ticket number"
).split()
NAMES = ("Olivia", "Hannah", "Sofia", "Fatima", "Liam", "Noah", "Mateo", "Aiko", "Ravi", "Chen")


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + rng.choice(".?!")


def chat_record(rng: random.Random, index: int) -> dict:
    """One support conversation of about 1 KB: optional system prompt, 1-3 user/assistant turns, now
    and then an email or phone number (for pii) and a verbatim repeat (for dedup)."""
    topic, name = rng.choice(TOPICS), rng.choice(NAMES)
    messages = [{"role": "system", "content": f"You are a helpful support agent for {topic} questions."}] if rng.random() < 0.3 else []
    for turn in range(rng.choice((1, 1, 2, 3))):
        user = f"Hi, {name} here about my {topic} #{index}-{turn}. " + " ".join(_sentence(rng, rng.randint(8, 18)) for _ in range(2))
        if rng.random() < 0.05:
            user += f" Reach me at {name.lower()}{index}@example.com or +1 555 {rng.randint(100, 999)} {rng.randint(1000, 9999)}."
        messages.append({"role": "user", "content": user})
        answer = " ".join(_sentence(rng, rng.randint(10, 22)) for _ in range(rng.randint(3, 6)))
        messages.append({"role": "assistant", "content": f"Thanks {name}. {answer}"})
    return {"messages": messages}


def generate_chat_records(path: Path, records: int, seed: int = 13) -> int:
    """Write `records` JSONL chat records (1% verbatim repeats); returns the file size in bytes."""
    rng = random.Random(seed)
    previous: list[str] = []
    with path.open("w", encoding="utf-8") as handle:
        for index in range(records):
            line = rng.choice(previous) if previous and rng.random() < 0.01 else json.dumps(chat_record(rng, index))
            previous = (previous + [line])[-100:]
            handle.write(line + "\n")
    return path.stat().st_size


def curate_run(curate_root: str, folder: str, stages: list[str], batch_rows: int | None) -> dict:
    """`curate run` through the library on folder/records.jsonl (in the measured child process)."""
    sys.path.insert(0, curate_root)
    from curate.runner import run_pipeline

    pipeline = {"name": "peak", "run_dir": "run", "inputs": [{"path": "records.jsonl"}], "stages": [{"type": s} for s in stages]}
    if "filter" in stages:
        pipeline["stages"][stages.index("filter")]["config"] = {"preset": "chat"}
    if batch_rows is not None:
        pipeline["engine"] = {"batch_rows": batch_rows}
    started = time.perf_counter()
    result = run_pipeline(pipeline, base_dir=Path(folder), report=False, force=True)
    return {"seconds": time.perf_counter() - started, "kept": result.manifest["accounting"]["kept"],
            "stage_seconds": {s["name"]: s["seconds"] for s in result.manifest["stages"]}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak memory (PSS of the process tree / VmHWM) of `curate run` on generated chat records.")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--stages", default="pii,tag,filter", help="comma-separated stage types after ingest")
    parser.add_argument("--batch-rows", type=int, default=None, help="engine.batch_rows (default: the engine's)")
    parser.add_argument("--curate-root", default=str(REPO_ROOT), help="the checkout whose curate/ runs (for before/after)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="curate-peak-") as folder:
        size = generate_chat_records(Path(folder) / "records.jsonl", args.records)
        print(f"{args.records:,} records, {size / args.records:,.0f} bytes each; stages: ingest, {', '.join(stages)}")
        ingest_only = run_measured(curate_run, args.curate_root, folder, [], args.batch_rows)
        full = run_measured(curate_run, args.curate_root, folder, stages, args.batch_rows)
    print(f"ingest alone: peak {ingest_only['peak_mb']:,.0f} MB, {ingest_only['seconds']:.1f} s")
    print(f"whole run:    peak {full['peak_mb']:,.0f} MB, {full['seconds']:.1f} s, "
          f"{args.records / full['seconds']:,.0f} records/s, kept {full['kept']:,}")
    print("stage seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in full["stage_seconds"].items()))


# --------------------------------------------------------------------------------------------------
# `python bench/peak_memory.py dedup --rows 100000`: peak RSS of the dedup stage, before and after it
# went out of core, each side in a process of its own on the same Parquet input.


def dedup_corpus(rows: int, path: str, seed: int = 0) -> None:
    """~1 KB SFT records (a question and a ~170-word answer), 10% near copies (5% of words replaced), 3%
    exact copies, written as the stage's canonical input."""
    import numpy as np
    import polars as pl

    from curate.records import canonical_frame

    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{index:05d}" for index in range(20_000)])
    words = vocabulary[rng.integers(0, len(vocabulary), size=(rows, 170))]
    copies = rng.random(rows) < 0.10
    source = np.maximum(np.arange(rows) - rng.integers(1, 50, rows), 0)
    words[copies] = words[source[copies]]
    edits = (rng.random(words.shape) < 0.05) & copies[:, None]
    words[edits] = vocabulary[rng.integers(0, len(vocabulary), int(edits.sum()))]
    exact = rng.random(rows) < 0.03
    words[exact] = words[source[exact]]
    answers = [" ".join(row) for row in words.tolist()]
    records = [{"messages": [{"role": "user", "content": f"Question {answer[:40]}?"}, {"role": "assistant", "content": answer}]} for answer in answers]
    canonical_frame(records).write_parquet(path, row_group_size=5_000)  # as a stage input should be: slices read only their groups
    del pl


def dedup_side(side: str, input_path: str, out_dir: str, curate_root: str = str(REPO_ROOT)) -> dict:
    import time
    from pathlib import Path

    sys.path.insert(0, curate_root)
    import polars as pl

    from curate.dedup import DedupConfig, deduplicate
    from curate.engines.local import LocalEngine
    from curate.stage import StageContext, get_stage

    config = DedupConfig()
    out = Path(out_dir) / side
    out.mkdir(parents=True)
    start = time.perf_counter()
    if side == "in-memory":  # what the stage did before issue 13: collect, decide, join, write
        frame = pl.read_parquet(input_path).with_row_index("__row")
        outcome = deduplicate(frame, config)
        joined = frame.join(outcome.decisions, on="__row", how="left")
        joined.filter(pl.col("reason").is_null()).write_parquet(out / "data.parquet")
        joined.filter(pl.col("reason").is_not_null()).write_parquet(out / "dropped.parquet")
        kept = outcome.report["kept"]
    else:  # the stage through the local engine, with the RSS peak of each phase (the engine's writing included)
        sampler = PhaseRss()
        ctx = StageContext(
            name="dedup", run_dir=out, stage_dir=out / "dedup", pipeline_dir=out, progress=sampler.progress,
            phase_progress=lambda name, done, total, unit: sampler.progress(name),
        )
        report = LocalEngine().execute(get_stage("dedup"), config, ctx, Path(input_path), out / "data.parquet", out / "dropped.parquet")
        kept = report["kept"]
        return {"side": side, "seconds": time.perf_counter() - start, "kept": kept, "phases": sampler.stop()}
    return {"side": side, "seconds": time.perf_counter() - start, "kept": kept}


class PhaseRss:
    """RSS sampled every 10 ms on a thread, its peak kept per phase of the stage (tracemalloc does not
    see Arrow, Polars or numpy buffers). `progress` messages and `phase` blocks name the phase."""

    def __init__(self):
        import threading

        import psutil

        self.process, self.current, self.peaks = psutil.Process(), "imports and input", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            # RSS = anonymous memory + file-backed pages (memory-mapped work files, shared libraries).
            fields = {}
            for line in open("/proc/self/status", encoding="ascii"):
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
                    fields[line.split(":")[0]] = int(line.split()[1]) / 1024
            peak = self.peaks.get(self.current, (0.0, 0.0, 0.0))
            if fields["VmRSS"] > peak[0]:
                self.peaks[self.current] = (fields["VmRSS"], fields["RssAnon"], fields["RssFile"])

    def progress(self, message: str) -> None:
        self.current = message

    def phase(self, name: str, total=None, unit: str = "rows"):
        import contextlib

        @contextlib.contextmanager
        def block():
            outer, self.current = self.current, name
            try:
                yield type("Progress", (), {"advance": lambda _self, n: None})()
            finally:
                self.current = f"after {name}"
                del outer

        return block()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {name: f"{rss:.0f} MB RSS peak (anonymous {anon:.0f}, file-backed {file:.0f})" for name, (rss, anon, file) in self.peaks.items()}


def dedup_stage_alone(input_path: str, out_dir: str) -> dict:
    """The dedup stage's own phases (no engine sink), with the RSS peak of each."""
    import time
    from pathlib import Path

    import polars as pl

    from curate.dedup import DedupConfig
    from curate.dedup.stream import deduplicate_out_of_core

    sampler = PhaseRss()
    start = time.perf_counter()
    outcome = deduplicate_out_of_core(pl.scan_parquet(input_path), DedupConfig(), Path(out_dir) / "alone", progress=sampler.progress, phase=sampler.phase)
    return {"side": "stage alone", "seconds": time.perf_counter() - start, "kept": outcome.report["kept"], "phases": sampler.stop()}


def main_dedup(rows: int, sides: list[str], input_path: str | None = None, curate_root: str = str(REPO_ROOT)) -> None:
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as folder:
        if input_path is None:
            input_path = str(Path(folder) / "input.parquet")
            dedup_corpus(rows, input_path)
        results = [run_measured(dedup_side, side, input_path, folder, curate_root) for side in sides if side != "stage-alone"]
        if "stage-alone" in sides:
            results.append(run_measured(dedup_stage_alone, input_path, folder))
    for result in results:
        print(f"{result['side']:>12}: {result['peak_mb']:7.0f} MB peak, {result['seconds']:6.1f} s, kept {result['kept']:,}")
        for name, peak in result.get("phases", {}).items():
            print(f"{'':>14}{name}: {peak}")
    if sides[:2] == ["in-memory", "out-of-core"]:
        print(f"peak memory ratio (in-memory / out-of-core): {results[0]['peak_mb'] / results[1]['peak_mb']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["dedup"]:  # python bench/peak_memory.py dedup [--rows N] [--sides ...]
        dedup_parser = argparse.ArgumentParser(description="Peak memory of the dedup stage, before and after (same run).")
        dedup_parser.add_argument("--rows", type=int, default=100_000)
        dedup_parser.add_argument(
            "--sides", nargs="+", choices=["in-memory", "out-of-core", "stage-alone"], default=["in-memory", "out-of-core", "stage-alone"],
            help="stage-alone: the stage's own phases without the engine's sink, each with its RSS peak",
        )
        dedup_parser.add_argument("--input", help="an existing canonical Parquet file (e.g. a run's ingest/data.parquet) instead of generated rows")
        dedup_parser.add_argument("--curate-root", default=str(REPO_ROOT), help="the checkout whose curate/ runs the engine side (for before/after)")
        dedup_arguments = dedup_parser.parse_args(sys.argv[2:])
        main_dedup(dedup_arguments.rows, dedup_arguments.sides, dedup_arguments.input, dedup_arguments.curate_root)
    else:
        main()
