"""Records per CPU-second of `curate run`, per stage, for two checkouts in the same sitting.

Runs the same pipeline YAML with the `curate` CLI of a baseline checkout (`--baseline-root`, e.g. a
detached worktree of an older commit) and of this one, alternating, `--repeats` times each, in child
processes, and keeps each side's best run (least CPU). Per run:

- CPU seconds (user + sys of the child's process tree, from `wait4`) and wall seconds;
- records per CPU-second (input records / CPU seconds) and cores busy (CPU / wall: only meaningful on
  an otherwise idle machine; CPU seconds are what to compare on a shared one);
- per stage: CPU seconds, sampled every 0.1 s from /proc and charged to the stage whose folder
  appeared last, and which threads did that CPU (`main`: the Python main thread; `python-threads`: the
  engine's worker threads; `polars`: Polars' pool; `other`). A stage whose CPU is mostly `main` runs
  on one core whatever the machine has.

    python bench/throughput.py PIPELINE.yaml --baseline-root /path/to/old/checkout [--repeats 2]

The input is not generated here: use a corpus of bench/scale.py (its `pipeline-*.yaml` beside it).
Stage outputs of both sides land in `--work` (a temp dir by default); compare them with `cmp` to check
that a speed-up changed no byte.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _thread_kind(pid: int, tid: str) -> str:
    comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    if int(tid) == pid:
        return "main"
    if comm.startswith("python"):
        return "python-threads"
    return "polars" if comm.startswith(("polars", "async-executor")) else "other"


def _thread_cpu(pid: int) -> dict[tuple[str, str], int]:
    """On-CPU nanoseconds of every live thread of `pid`, keyed by (thread id, kind)."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            times[(tid, _thread_kind(pid, tid))] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass
    return times


def run_once(curate_root: Path, pipeline: Path, run_dir: Path, stages: list[str]) -> dict:
    command = [sys.executable, "-m", "curate.cli", "run", str(pipeline), "--run-dir", str(run_dir), "--force", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(curate_root))
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=curate_root, env=env, stdout=subprocess.DEVNULL)
    seen: dict = {}
    per_stage: dict[str, dict[str, int]] = {}
    current = "start"
    while child.poll() is None:
        try:
            times = _thread_cpu(child.pid)
        except OSError:
            break
        shares = per_stage.setdefault(current, {})
        for key, ns in times.items():
            shares[key[1]] = shares.get(key[1], 0) + ns - seen.get(key, 0)
        seen.update(times)
        present = [name for name in stages if (run_dir / name).is_dir()]
        current = present[-1] if present else "start"
        time.sleep(0.1)
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise SystemExit(f"curate run failed in {curate_root} (exit {child.returncode})")
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    records = manifest["stages"][0]["rows_in"]
    return {"wall": wall, "records": records, "stages": per_stage}


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(curate_root: Path, pipeline: Path, run_dir: Path, stages: list[str]) -> dict:
    """One run; its CPU is the growth of this process's reaped-children totals (the child's whole tree)."""
    before = _cpu_children()
    result = run_once(curate_root, pipeline, run_dir, stages)
    result["cpu"] = _cpu_children() - before
    return result


def show(label: str, result: dict) -> None:
    cpu, wall, records = result["cpu"], result["wall"], result["records"]
    print(f"{label}: {records:,} records, {cpu:.1f} CPU-s, {wall:.1f} s wall, "
          f"{records / cpu:,.0f} records/CPU-s, cores busy {cpu / wall:.2f}")
    for stage, shares in result["stages"].items():
        total = sum(shares.values())
        if total <= 0:
            continue
        split = ", ".join(f"{kind} {ns / total:.0%}" for kind, ns in sorted(shares.items()) if ns > 0)
        print(f"    {stage:<8} {total / 1e9:6.1f} CPU-s   ({split})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--baseline-root", type=Path, required=True, help="checkout measured as the baseline")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the best is kept")
    parser.add_argument("--work", type=Path, default=None, help="where the run dirs go (default: a temp dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="curate-throughput-"))
    import yaml

    stages = ["ingest"] + [stage.get("name", stage["type"]) for stage in yaml.safe_load(args.pipeline.read_text())["stages"]]
    sides = {"baseline": args.baseline_root.resolve(), "ours": ROOT}
    best: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for label, root in sides.items():
            result = measured(root, args.pipeline.resolve(), work / f"{label}-{repeat}", stages)
            print(f"  {label} run {repeat + 1}: {result['cpu']:.1f} CPU-s", flush=True)
            if label not in best or result["cpu"] < best[label]["cpu"]:
                best[label] = result
    show(f"baseline ({sides['baseline']})", best["baseline"])
    show(f"ours ({sides['ours']})", best["ours"])
    ratio = (best["ours"]["records"] / best["ours"]["cpu"]) / (best["baseline"]["records"] / best["baseline"]["cpu"])
    print(f"records per CPU-second, ours / baseline: {ratio:.2f}x")


if __name__ == "__main__":
    main()
