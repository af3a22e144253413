"""Benchmark: the same pipeline on the local engine and on the Ray engine with 1 and 2 workers.

Corpus: `--rows` generated chat records (default 200,000, ~1 KB each: a user question and an assistant
answer of random words from a fixed vocabulary, an e-mail address in every 7th row, a short answer in
every 11th). Pipeline: ingest, then `pii` (redact), `tag` (no language id: its model load is the same on
both sides) and `filter` (`chat` preset), the row-local stages. A stage given here that is not
row-local runs in a row form (its whole-table step applied per batch: valid only for a stage whose
every row's result depends on that row alone), so the Ray side runs it on the workers; the table
prints where each stage ran.

Each side runs in a process of its own (`--side`); the parent samples the memory of that process and of
every process below it (a local Ray cluster's GCS, raylet and workers are its descendants) every 50 ms:
peak RSS of the driver, of the largest Ray worker and of all workers together, and the peak of the whole
tree's PSS (shared pages, e.g. Ray's object store, counted once). Records/s is over the stages after
ingest (ingest is the runner's and runs on the driver on both engines); the Ray cluster's start is shown
apart. Ratios last.

    .venv/bin/python bench/engines.py            # 200k records (minutes)
    .venv/bin/python bench/engines.py --quick    # 5k records: shows it runs; figures are not results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from peak_memory import sampled  # noqa: E402
STAGES = ({"type": "pii", "config": {"mode": "redact"}}, {"type": "tag", "config": {"language": None}}, {"type": "filter", "config": {"preset": "chat", "languages": None}})
SIDES = {"local": None, "ray-1": 1, "ray-2": 2}


# ---------------------------------------------------------------------------------------------------
# Corpus


def generate(path: Path, rows: int, seed: int = 13) -> None:
    """`rows` chat records as JSONL, built column-wise (no per-row Python)."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{index:04d}" for index in range(3000)] + ["the", "order", "refund", "account", "please", "thanks"])

    def texts(words: int) -> pl.Series:
        picks = vocabulary[rng.integers(0, len(vocabulary), size=(rows, words))]
        return pl.Series(picks.tolist()).list.join(" ")

    index = pl.int_range(rows, eager=True)
    frame = pl.DataFrame({"user": texts(24), "assistant": texts(140), "index": index}).with_columns(
        pl.when(pl.col("index") % 7 == 0).then(pl.format("{} mail me at user{}@example.com", "user", "index")).otherwise("user").alias("user"),
        pl.when(pl.col("index") % 11 == 0).then(pl.lit("ok")).otherwise("assistant").alias("assistant"),
    )
    messages = pl.concat_list(
        pl.struct(pl.lit("user").alias("role"), pl.col("user").alias("content")),
        pl.struct(pl.lit("assistant").alias("role"), pl.col("assistant").alias("content")),
    )
    frame.select(messages.alias("messages")).write_ndjson(path)


# ---------------------------------------------------------------------------------------------------
# One side (a process of its own)


def row_forms(stages: list[dict]) -> list[dict]:
    """Each stage as a row-local stage: as it is when it already is one, else its whole-table step per batch."""
    from curate.stage import BatchOutput, get_stage, register_row_stage

    forms = []
    for entry in stages:
        spec = get_stage(entry["type"])
        if spec.kind == "row":
            forms.append({**entry, "name": entry["type"]})
            continue
        row_type = f"bench_row_{entry['type']}"

        def transform(batch, config, ctx, run=spec.run):
            output = run(batch.lazy(), config, ctx)
            return BatchOutput(kept=output.kept.collect(), dropped=output.dropped.collect() if output.dropped is not None else None)

        register_row_stage(row_type, config=spec.config_model, version=spec.version)(transform)
        forms.append({**entry, "type": row_type, "name": entry["type"]})
    return forms


def run_side(side: str, data: Path, work: Path) -> dict:
    from curate.engines import get_engine
    from curate.runner import run_pipeline

    pipeline = {"name": "bench", "seed": 1, "inputs": [{"path": str(data)}], "stages": row_forms(list(STAGES))}
    started = time.perf_counter()
    engine = get_engine("local") if SIDES[side] is None else get_engine("ray", num_cpus=SIDES[side])
    start_s = time.perf_counter() - started
    try:
        result = run_pipeline(pipeline, run_dir=work / side, report=False, engine=engine)
    finally:
        engine.close()
    stages = result.manifest["stages"]
    stage_s = sum(record["seconds"] for record in stages[1:])
    return {
        "side": side,
        "start_s": round(start_s, 2),
        "ingest_s": stages[0]["seconds"],
        "stages_s": round(stage_s, 2),
        "rows": stages[1]["rows_in"],
        "kept": result.manifest["accounting"]["kept"],
        "where": {record["name"]: (record.get("report") or {}).get("executed_on", "local") for record in stages[1:]},
    }


# ---------------------------------------------------------------------------------------------------
# Memory of a side's process tree


def _role(process) -> str:
    try:
        name = " ".join(process.cmdline()[:2]) or process.name()
    except Exception:  # noqa: BLE001 - a process that just exited
        return "gone"
    if "ray::" in name or "default_worker.py" in name:
        return "worker"
    return "other"


def sample(pid: int, peaks: dict) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    workers, pss = [], 0
    for process in tree:
        try:
            memory = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += memory.pss
        if process.pid == pid:
            peaks["driver_rss_mb"] = max(peaks["driver_rss_mb"], memory.rss / 2**20)
        elif _role(process) == "worker":
            workers.append(memory.rss / 2**20)
    peaks["worker_max_rss_mb"] = max(peaks["worker_max_rss_mb"], max(workers, default=0.0))
    peaks["workers_rss_mb"] = max(peaks["workers_rss_mb"], sum(workers))
    peaks["tree_pss_mb"] = max(peaks["tree_pss_mb"], pss / 2**20)


def measure(side: str, data: Path, work: Path) -> dict:
    command = [sys.executable, __file__, "--side", side, "--data", str(data), "--work", str(work)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    peaks = dict.fromkeys(("driver_rss_mb", "worker_max_rss_mb", "workers_rss_mb", "tree_pss_mb"), 0.0)
    while process.poll() is None:
        _, wait = sampled(lambda: sample(process.pid, peaks))
        time.sleep(wait)
    output = process.stdout.read().strip().splitlines()
    if process.returncode != 0 or not output:
        raise SystemExit(f"side {side} failed (exit code {process.returncode}; its error is above)")
    return {**json.loads(output[-1]), **{key: round(value) for key, value in peaks.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="generated records (default 200,000)")
    parser.add_argument("--quick", action="store_true", help="5,000 records: shows the bench runs")
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.data, args.work)))
        return
    rows = 5_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as folder:
        work = Path(folder)
        data = work / "chats.jsonl"
        generate(data, rows)
        print(f"corpus: {rows:,} records, {data.stat().st_size / 2**20:.0f} MB JSONL; stages: {', '.join(s['type'] for s in STAGES)}")
        results = {side: measure(side, data, work) for side in SIDES}
    print(f"{'side':8} {'start s':>8} {'stages s':>9} {'records/s':>10} {'driver MB':>10} {'worker max MB':>14} {'workers MB':>11} {'tree PSS MB':>12}  where")
    for side, result in results.items():
        rate = result["rows"] / max(result["stages_s"], 1e-9)
        result["rate"] = rate
        where = ", ".join(f"{name}: {place}" for name, place in result["where"].items())
        print(
            f"{side:8} {result['start_s']:8.1f} {result['stages_s']:9.1f} {rate:10,.0f} {result['driver_rss_mb']:10,} "
            f"{result['worker_max_rss_mb']:14,} {result['workers_rss_mb']:11,} {result['tree_pss_mb']:12,}  {where}"
        )
    kept = {result["kept"] for result in results.values()}
    print(f"kept rows: {kept.pop() if len(kept) == 1 else f'DIFFER {sorted(kept)}'}")
    local = results["local"]
    for side in ("ray-1", "ray-2"):
        ray_side = results[side]
        print(
            f"ratio {side}/local records/s {ray_side['rate'] / local['rate']:.2f}x, "
            f"tree PSS {ray_side['tree_pss_mb'] / max(local['tree_pss_mb'], 1):.2f}x"
        )


if __name__ == "__main__":
    main()
