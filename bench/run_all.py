"""Run every bench, collect the ratio lines each prints, and rewrite the table in docs/benchmarks.md.

`bash bench/run_all.sh` (full size: tens of minutes, not for CI) or `bash bench/run_all.sh --quick`
(small sizes that only show each bench runs; the table says which size its figures are). Each bench's
full output goes to a log folder of its own (printed); a bench that fails or times out gets that in its
table cell, and the others still run. `--only dedup,ingest` runs a subset (the other rows keep their
previous cells).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench-table:start (written by bench/run_all.sh) -->", "<!-- bench-table:end -->"
# The lines a bench prints that carry its result: dedup's per-peer headlines, everyone else's ratios.
RESULT_LINE = re.compile(r"^(headline|ratio|speedup)\b.*")


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    peer: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    needs_gpu: bool = False
    headline_only: bool = False  # print only `headline` lines in the table (dedup prints a ratio per banding)


BENCHES = (
    Bench("dedup", "MinHash near-dedup, word 3-grams, xxh32 on every side, each peer's banding; precision/recall vs exact Jaccard; ours in memory and as `curate run`'s out-of-core stage",
          "datasketch per record and `MinHash.bulk` + `insertion_session`; datatrove's 4-step MinHash (all cores and in one process)",
          (), ("--records", "3000", "--repeat", "1"), headline_only=True),
    Bench("ingest", "read 3 JSONL layouts with broken lines into canonical `messages` + sha256 id",
          '`datasets.load_dataset("json")` + `Dataset.map(batched=True)`, `num_proc` 1 and all cores',
          (), ("--records", "3000", "--repeat", "1")),
    Bench("packing", "best-fit-decreasing packing into rows of 2048 / 4096, producing the packed token rows",
          'TRL `pack_dataset(strategy="bfd")`, one global batch (equal efficiency)',
          (), ("--samples", "3000", "--repeats", "1", "--planner-samples", "100000")),
    Bench("filters", "tag + filter heuristics (scores, language id, token counts)", "per-row Python of the same scores",
          (), ("--records", "3000")),
    Bench("train_vs_trl", "LoRA SFT tokens/s and DPO pairs/s, SmolLM2-135M and a tiny Llama, matched tokens per step",
          "TRL `SFTTrainer` padded, `packing` bfd and `padding_free`; `DPOTrainer` padded; ours vs TRL's fastest",
          (), ("--models", "tiny", "--steps", "4", "--seq-len", "128", "--rows", "1", "--samples", "60")),
    Bench("train_throughput", "packed rows vs padded batches in our own loop", "our own padded loop",
          (), ("--samples", "48", "--repeats", "1")),
    Bench("engines", "ingest -> pii -> tag -> filter, local engine vs Ray Data on 1 and 2 CPUs (same outputs)",
          "our own local engine (Ray is the scale-out path, not a peer)", (), ("--quick",)),
    Bench("scale", "curate run end to end at 100k, 300k, 1M records: peak RSS and wall time, growth exponents",
          "its own smaller sizes (growth, not a peer ratio)", (), ("--quick",)),
    Bench("kernel_gpu", "Triton packing kernel for ~1M tokens (goal <= 50 us, no host syncs)", "the pure-torch oracle",
          (), ("--iters", "20"), needs_gpu=True),
)  # fmt: skip


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}){gpu}"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_bench(bench: Bench, quick: bool, logs: Path, timeout: int) -> str:
    """Run one bench; its table cell: the result lines, or why there are none."""
    argv = [sys.executable, f"bench/{bench.name}.py", *(bench.quick if quick else bench.full)]
    log = logs / f"{bench.name}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(argv[1:])}  (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        # A session of its own, so a timeout ends the bench's worker processes too, not only the bench.
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    seconds = time.perf_counter() - started
    lines = [m.group(0).strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if (m := RESULT_LINE.match(line.strip()))]
    if bench.headline_only:
        lines = [line for line in lines if line.startswith("headline")] or lines
    for line in lines:
        print(f"    {line}")
    if code is None:
        return f"timed out after {timeout} s"
    if code != 0:
        return f"failed (exit {code}; see the log)"
    if not lines:
        return "ran, but printed no ratio line"
    return "<br>".join(line.replace("|", "/") for line in lines) + f" ({seconds:.0f} s)"


def table(cells: dict[str, str], sizes: dict[str, str], machine_line: str, dates: dict[str, str]) -> str:
    rows = ["| bench | what | peer(s) at their best | command (full size) | latest ratio (ours faster when > 1) | size | machine | date |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for bench in BENCHES:
        command = f"`python bench/{bench.name}.py`"
        rows.append(f"| `bench/{bench.name}.py` | {bench.what} | {bench.peer} | {command} | {cells.get(bench.name, 'not run')} "
                    f"| {sizes.get(bench.name, '')} | {machine_line if bench.name in dates else ''} | {dates.get(bench.name, '')} |")  # fmt: skip
    return "\n".join(rows)


def previous_rows(text: str) -> dict[str, list[str]]:
    """The cells of the current table, by bench name, so `--only` keeps the other rows."""
    rows = {}
    inside = text.split(START, 1)[1].split(END, 1)[0] if START in text and END in text else ""
    for line in inside.splitlines():
        match = re.match(r"\| `bench/(\w+)\.py` \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    return rows


def write_doc(new_table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{DOC}: the table markers are missing ({START} ... {END})")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    tmp = DOC.with_name(f".{DOC.name}.tmp")
    tmp.write_text(f"{before}{START}\n{new_table}\n{END}{after}", encoding="utf-8")
    os.replace(tmp, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: proves each bench runs; the figures are not results")
    parser.add_argument("--only", help="comma-separated bench names (default: all)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per bench (default 900 quick, 7200 full)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else [b.name for b in BENCHES]
    unknown = set(names) - {b.name for b in BENCHES}
    if unknown:
        raise SystemExit(f"error: unknown bench(es) {sorted(unknown)}; known: {', '.join(b.name for b in BENCHES)}")
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    timeout = args.timeout or (900 if args.quick else 7200)
    old = previous_rows(DOC.read_text(encoding="utf-8"))
    cells = {name: row[4] for name, row in old.items() if len(row) == 8 and row[4] != "not run"}
    sizes = {name: row[5] for name, row in old.items() if len(row) == 8}
    dates = {name: row[7] for name, row in old.items() if len(row) == 8 and row[7]}
    machine_line, today = machine(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    gpu = has_gpu()
    for bench in BENCHES:
        if bench.name not in names:
            continue
        if bench.needs_gpu and not gpu:
            print(f"[{time.strftime('%H:%M:%S')}] {bench.name}: skipped (needs a CUDA GPU)")
            cells.setdefault(bench.name, "not run: needs a CUDA GPU")
            continue
        cells[bench.name] = run_bench(bench, args.quick, logs, timeout)
        sizes[bench.name] = "quick (`" + " ".join(bench.quick) + "`): not a result" if args.quick else "full (defaults)"
        dates[bench.name] = today
    # The machine column is only known for this run's rows; older rows keep theirs.
    text = table(cells, sizes, machine_line, dates)
    if old:
        lines = text.splitlines()
        for i, bench in enumerate(BENCHES, start=2):
            if bench.name not in names and bench.name in old and len(old[bench.name]) == 8:
                lines[i] = "| " + " | ".join(old[bench.name]) + " |"
        text = "\n".join(lines)
    print(f"logs: {logs}")
    if not args.no_doc:
        write_doc(text)
        print(f"table rewritten: {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
