"""How time and memory of `curate run` grow with the data: the inputs of docs/scale.md.

Generates chat records of ~1 KB (OpenAI `messages` JSONL: a user question and an assistant answer drawn
from an English vocabulary, with exact copies, lightly edited near-copies, templated rows and short junk
mixed in at fixed rates), runs the same pipeline (ingest -> dedup -> pii -> tag -> filter -> split) with
the `curate` CLI in a child process at each size, and measures per size:

- wall seconds and CPU seconds (user + sys of the child's process tree, from `wait4`);
- peak RSS: the child's `ru_maxrss` from `wait4` (its own peak, and the largest of its waited-for
  children), and the proportional set size summed over the process tree sampled every 50 ms (Ray workers
  and other helpers included), whichever is larger;
- records per CPU-second, and how many cores were busy on average (CPU seconds / wall seconds);
- the phase in which each new peak was reached: the child is `curate` run through bench/cli_phases.py,
  which prints a line per stage and phase instead of the live display.

Then it fits `peak ~ a * rows^k` and `seconds ~ b * rows^m` by least squares on log-log, and prints the
exponents last: k < 1 means memory grows sub-linearly with the input (the issue's target: <= 1 GiB at
1M records, <= 2 GiB at 10M).

    python bench/scale.py                       # 100k, 300k, 1M records (tens of minutes on 2 cores)
    python bench/scale.py --sizes 20000 60000   # any sizes
    python bench/scale.py --quick               # 5k, 15k, 50k: checks the bench itself (figures are not results)
    python bench/scale.py --engine ray          # the same through `--engine ray` (local cluster)

Corpora are cached under --work (default: a folder in the system temp dir) by size and seed, so a rerun
measures the pipeline, not the generator. `--json FILE` writes the figures for docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_phases import PHASE_MARK  # noqa: E402
from peak_memory import sampled, tree_memory_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

EXACT_COPY_SHARE = 0.05  # rows repeating an earlier row verbatim
NEAR_COPY_SHARE = 0.10  # rows repeating an earlier row with ~5% of the answer's words replaced
TEMPLATED_SHARE = 0.02  # rows filling one fixed template with a few different words (a big LSH bucket)
JUNK_SHARE = 0.03  # one- or two-word answers the filter drops

PIPELINE = """\
name: scale
inputs:
  - path: {corpus}
stages:
  - type: dedup
  - type: pii
  - type: tag
  - type: filter
    config:
      preset: chat
  - type: split
    config:
      train: 0.98
      validation: 0.01
      test: 0.01
"""


def vocabulary() -> np.ndarray:
    """English words as they occur in the sample data's raw text (frequency-weighted by repetition)."""
    words: list[str] = []
    for path in sorted((ROOT / "sample_data" / "raw").glob("*.jsonl")):
        # JSON escapes (\n, \u00e9) are not words: drop them before splitting.
        text = re.sub(r"\\(u[0-9a-fA-F]{4}|.)", " ", path.read_text(encoding="utf-8", errors="ignore"))
        words += WORD.findall(text.lower())
    if len(words) < 1000:
        raise SystemExit("bench/scale.py: sample_data/raw is needed for the vocabulary")
    return np.array(words, dtype=object)


def sentences(rng: np.random.Generator, vocab: np.ndarray, rows: int, low: int, high: int) -> pl.Series:
    """`rows` texts of `low..high` words, with a capital and a full stop every ~12 words."""
    lengths = rng.integers(low, high, rows)
    picks = pl.Series(vocab[rng.integers(0, len(vocab), int(lengths.sum()))].astype(str))
    owners = np.repeat(np.arange(rows), lengths)
    frame = pl.DataFrame({"row": owners, "word": picks}).with_columns(
        pl.when(pl.int_range(pl.len()).over("row") % 12 == 11).then(pl.col("word") + ".").otherwise(pl.col("word"))
    )
    joined = frame.group_by("row", maintain_order=True).agg(pl.col("word").str.join(" "))["word"]
    return joined.str.slice(0, 1).str.to_uppercase() + joined.str.slice(1) + "."


def corpus_chunk(rng: np.random.Generator, vocab: np.ndarray, rows: int, start: int) -> pl.DataFrame:
    users = sentences(rng, vocab, rows, 15, 45)
    answers = sentences(rng, vocab, rows, 110, 170)
    kind = rng.random(rows)
    exact = kind < EXACT_COPY_SHARE
    near = (kind >= EXACT_COPY_SHARE) & (kind < EXACT_COPY_SHARE + NEAR_COPY_SHARE)
    templated = (kind >= 0.5) & (kind < 0.5 + TEMPLATED_SHARE)
    junk = (kind >= 0.9) & (kind < 0.9 + JUNK_SHARE)
    # Copies repeat a row of the same chunk (so a chunk stands alone); near copies change ~5% of words.
    source = np.where(exact | near, rng.integers(0, rows, rows), np.arange(rows))
    users = users.gather(source)
    answers = pl.Series(np.where(exact | near, answers.gather(source).to_numpy(), answers.to_numpy()))
    edited = sentences(rng, vocab, rows, 8, 9)
    answers = pl.Series(np.where(near, (answers.str.slice(0, 600) + " " + edited + " " + answers.str.slice(660)).to_numpy(), answers.to_numpy()))
    template = "Thanks for reaching out about your order. We have updated the shipping address on file and the parcel will leave our warehouse within two business days. "
    filled = template + sentences(rng, vocab, rows, 4, 6)
    answers = pl.Series(np.where(templated, filled.to_numpy(), answers.to_numpy()))
    answers = pl.Series(np.where(junk, np.array(["ok", "Yes.", "thanks!"], dtype=object)[rng.integers(0, 3, rows)], answers.to_numpy()))
    return pl.DataFrame({"user": users, "assistant": answers}).select(
        pl.concat_list(
            pl.struct(pl.lit("user").alias("role"), pl.col("user").alias("content")),
            pl.struct(pl.lit("assistant").alias("role"), pl.col("assistant").alias("content")),
        ).alias("messages"),
        (pl.int_range(pl.len()) + start).cast(pl.String).alias("conversation_id"),
    )


def write_corpus(path: Path, rows: int, seed: int, chunk_rows: int = 50_000) -> None:
    """JSONL written chunk by chunk (bounded memory), atomically."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        for start in range(0, rows, chunk_rows):
            corpus_chunk(rng, vocab, min(chunk_rows, rows - start), start).write_ndjson(out)
    partial.replace(path)


def corpus_for(work: Path, rows: int, seed: int) -> Path:
    path = work / f"chat-{rows}-{seed}.jsonl"
    if not path.exists():
        started = time.perf_counter()
        write_corpus(path, rows, seed)
        print(f"  generated {rows:,} records ({path.stat().st_size / 2**20:,.0f} MB) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def run_measured_cli(arguments: list[str], env: dict) -> dict:
    """Run a command; its wall time, CPU time and peak memory (see the module docstring), and the
    phases (`@phase` lines it prints) at which each new peak was reached."""
    started = time.perf_counter()
    process = subprocess.Popen(arguments, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree_peak = 0.0
    output = b""
    phase, peaks = "imports", []  # [phase, MB]: each new high and the phase it was reached in
    os.set_blocking(process.stdout.fileno(), False)
    while True:
        chunk = process.stdout.read()
        if chunk:
            output += chunk
            marks = [line for line in chunk.decode(errors="replace").splitlines() if line.startswith(PHASE_MARK)]
            phase = marks[-1][len(PHASE_MARK):] if marks else phase
        memory, wait = sampled(lambda: tree_memory_mb(process.pid))
        if memory > tree_peak:
            tree_peak = memory
            if peaks and peaks[-1][0] == phase:
                peaks[-1][1] = round(memory)
            else:
                peaks.append([phase, round(memory)])
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(wait)
    process.returncode = os.waitstatus_to_exitcode(status)
    output += process.stdout.read() or b""
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed ({process.returncode}):\n{output.decode(errors='replace')[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    figures = {"seconds": wall, "cpu_seconds": cpu, "peak_mb": max(usage.ru_maxrss / 1024, tree_peak), "own_peak_mb": usage.ru_maxrss / 1024, "tree_peak_mb": tree_peak}
    return {**figures, "new_peaks": peaks}


def measure_size(work: Path, rows: int, seed: int, engine: str) -> dict:
    corpus = corpus_for(work, rows, seed)
    pipeline = work / f"pipeline-{rows}.yaml"
    pipeline.write_text(PIPELINE.format(corpus=corpus), encoding="utf-8")
    run_dir = work / f"run-{engine}-{rows}"
    command = [sys.executable, str(Path(__file__).resolve().parent / "cli_phases.py"), "run", str(pipeline), "--run-dir", str(run_dir), "--force"]
    if engine != "local":
        command += ["--engine", engine]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = run_measured_cli(command, env)
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    accounting = manifest["accounting"]
    stage_seconds = {stage["name"]: stage["seconds"] for stage in manifest["stages"]}
    # What each stage hands on, per record (compressed Parquet): the doc's bytes-per-record column.
    stage_bytes_per_record = {
        stage["name"]: round((run_dir / stage["name"] / "data.parquet").stat().st_size / max(stage["rows_out"], 1), 1)
        for stage in manifest["stages"]
        if (run_dir / stage["name"] / "data.parquet").is_file()
    }
    return {
        "rows": rows,
        "input_mb": round(corpus.stat().st_size / 2**20, 1),
        **{key: round(value, 2) for key, value in result.items() if key != "new_peaks"},
        "records_per_cpu_second": round(rows / max(result["cpu_seconds"], 1e-9)),
        "cores_busy": round(result["cpu_seconds"] / max(result["seconds"], 1e-9), 2),
        "kept": accounting["kept"],
        "dropped": accounting["dropped"],
        "quarantined": accounting["quarantined"],
        "stage_seconds": stage_seconds,
        "stage_bytes_per_record": stage_bytes_per_record,
        "new_peaks": result["new_peaks"],
    }


def growth_exponent(sizes: list[int], values: list[float]) -> float:
    """k in value ~ a * size^k, least squares on log-log."""
    slope, _ = np.polyfit(np.log(sizes), np.log(values), 1)
    return float(slope)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="5k, 15k, 50k records: checks the bench, not results")
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "curate-bench-scale")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = [5_000, 15_000, 50_000] if args.quick else sorted(args.sizes)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"bench/scale.py: curate run ({args.engine} engine) at {', '.join(f'{s:,}' for s in sizes)} records; {os.cpu_count()} cores")
    results = []
    for rows in sizes:
        result = measure_size(args.work, rows, args.seed, args.engine)
        results.append(result)
        print(
            f"  {rows:>10,} rows  {result['input_mb']:>7,.0f} MB in  {result['seconds']:>8.1f} s  "
            f"{result['records_per_cpu_second']:>7,} rec/CPU-s  {result['cores_busy']:.2f} cores  "
            f"peak {result['peak_mb']:>7,.0f} MB  kept {result['kept']:,}",
            flush=True,
        )
        print("    new peaks by phase: " + "; ".join(f"{phase} {mb:,} MB" for phase, mb in result["new_peaks"]), flush=True)
    figures = {"engine": args.engine, "cpu_count": os.cpu_count(), "quick": args.quick, "sizes": results}
    if len(results) >= 2:
        figures["memory_exponent"] = round(growth_exponent(sizes, [r["peak_mb"] for r in results]), 3)
        figures["time_exponent"] = round(growth_exponent(sizes, [r["seconds"] for r in results]), 3)
        largest = results[-1]
        scale = lambda exponent, target: largest["peak_mb"] * (target / largest["rows"]) ** exponent  # noqa: E731
        figures["peak_mb_at_10m_by_fit"] = round(scale(figures["memory_exponent"], 10_000_000))
        print(f"headline growth: peak memory ~ rows^{figures['memory_exponent']}, wall time ~ rows^{figures['time_exponent']}; "
              f"peak {largest['peak_mb']:,.0f} MB at {largest['rows']:,} records")
        print(f"fit, not measured: peak at 10M records ~ {figures['peak_mb_at_10m_by_fit']:,} MB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.quick:
        print("(--quick: small sizes check the bench; growth figures need the default sizes)")


if __name__ == "__main__":
    main()
