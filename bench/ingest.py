"""Ingest + format throughput: ours vs `datasets.load_dataset("json")` + `Dataset.map(batched=True)`.

Both sides read the same generated JSONL files (Alpaca + ShareGPT + OpenAI messages, with a few broken
lines), set the broken lines aside, normalize text (NFC, whitespace) and roles, and produce canonical
`messages` with a sha256 content id. The peer at its best: its batched map on Arrow batches with
pyarrow compute kernels for the normalization (C++), run with num_proc 1 and `--num-proc` (default: every
core; the faster counts), and
orjson to find the broken lines its JSON loader would stop at; the only per-row Python is the sha256,
which neither library vectorizes. Each side runs in its own process (peak memory: bench/peak_memory.py),
`--repeat` times; the fastest run counts, the same N for both. The ratio comes last.

    python bench/ingest.py [--records 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import run_measured  # noqa: E402

WORDS = (
    "order refund invoice password account login shipping parcel tracking device battery firmware app "
    "crash update billing plan upgrade downgrade cancel charge card payment delivery address reset email"
).split()


def generate(folder: Path, records: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)

    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    per_file = records // 3
    paths = []
    alpaca = folder / "alpaca.jsonl"
    with alpaca.open("w") as handle:
        for i in range(per_file):
            handle.write(json.dumps({"instruction": sentence(12), "input": "", "output": sentence(40)}) + "\n")
            if i % 20000 == 0:
                handle.write('{"instruction": "broken\n')
    sharegpt = folder / "sharegpt.jsonl"
    with sharegpt.open("w") as handle:
        for _ in range(per_file):
            turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": sentence(15 if t % 2 == 0 else 35)} for t in range(4)]
            handle.write(json.dumps({"conversations": turns}) + "\n")
    openai = folder / "openai.jsonl"
    with openai.open("w") as handle:
        for _ in range(records - 2 * per_file):
            handle.write(
                json.dumps({"messages": [{"role": "user", "content": sentence(12)}, {"role": "assistant", "content": sentence(40)}]}) + "\n"
            )
    paths += [alpaca, sharegpt, openai]
    return paths


# ---------------------------------------------------------------------------------------------- baseline

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def normalize_arrow(text):
    """The canonical text normalization as pyarrow compute kernels (C++, RE2): NFC, CRLF -> LF, runs of
    spaces/tabs -> one space, no spaces around newlines, at most one blank line, trimmed."""
    import pyarrow.compute as pc

    text = pc.utf8_normalize(text, "NFC")
    text = pc.replace_substring(text, "\r\n", "\n")
    text = pc.replace_substring_regex(text, r"[ \t]+", " ")
    text = pc.replace_substring_regex(text, r" *\n *", "\n")
    text = pc.replace_substring_regex(text, r"\n{3,}", "\n\n")
    return pc.utf8_trim_whitespace(text)


def _turns(table):
    """(list offsets, roles, contents) of a batch in any of the three layouts."""
    import numpy as np
    import pyarrow as pa

    if "conversations" in table.column_names or "messages" in table.column_names:
        name, role, content = ("conversations", "from", "value") if "conversations" in table.column_names else ("messages", "role", "content")
        lists = table[name].combine_chunks()
        flat = lists.flatten()
        return lists.offsets, flat.field(role), flat.field(content)
    n = table.num_rows  # Alpaca: instruction -> user, output -> assistant, interleaved
    order = np.empty(2 * n, dtype=np.int64)
    order[0::2], order[1::2] = np.arange(n), n + np.arange(n)
    contents = pa.concat_arrays([table["instruction"].combine_chunks(), table["output"].combine_chunks()]).take(order)
    roles = pa.array(["user", "assistant"] * n)
    return pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), roles, contents


def format_batch(table):
    """`Dataset.map(batched=True)` on Arrow batches: canonical `messages` and a content-hash `id`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets, roles, contents = _turns(table)
    keys = pa.array(list(ROLE))
    roles = pa.array(list(ROLE.values())).take(pc.index_in(roles, value_set=keys))
    contents = normalize_arrow(contents)
    messages = pa.ListArray.from_arrays(offsets, pa.StructArray.from_arrays([roles, contents], names=["role", "content"]))
    turn_keys = pc.binary_join_element_wise(roles, contents, "\x1f")
    row_keys = pc.binary_join(pa.ListArray.from_arrays(offsets, turn_keys), "\x1e")
    # datasets/pyarrow have no vectorized sha256: one hashlib call per row (what ours does in Rust).
    ids = [hashlib.sha256(key.encode()).hexdigest()[:32] for key in row_keys.to_pylist()]
    return pa.table({"id": ids, "messages": messages})


def without_malformed_lines(path: Path, folder: Path) -> tuple[Path, int]:
    """datasets' JSON loader stops at a malformed line: checking every line first is part of its cost."""
    import orjson

    good, bad = [], 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                orjson.loads(line)
                good.append(line)
            except orjson.JSONDecodeError:
                bad += 1
    clean = folder / path.name
    clean.write_bytes(b"".join(good))
    return clean, bad


def run_baseline(paths: list[Path], num_proc: int) -> dict:
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()  # no fingerprint cache reuse between repeats
    started = time.perf_counter()
    kept = bad = 0
    with tempfile.TemporaryDirectory() as cache:
        for path in paths:
            clean, broken = without_malformed_lines(path, Path(cache))
            bad += broken
            dataset = datasets.load_dataset("json", data_files=str(clean), split="train", cache_dir=cache)
            formatted = dataset.with_format("arrow").map(
                format_batch, batched=True, batch_size=10_000, remove_columns=dataset.column_names,
                num_proc=num_proc if num_proc > 1 else None,
            )  # fmt: skip
            kept += formatted.num_rows
    return {"seconds": time.perf_counter() - started, "kept": kept, "bad": bad}


def run_ours(paths: list[Path], num_proc: int) -> dict:
    from curate.runner import run_pipeline

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = run_pipeline(
            {"name": "bench", "inputs": [{"path": str(p)} for p in paths], "stages": []},
            run_dir=Path(out) / "run",
            report=False,  # the baseline makes no report either
        )
    accounting = result.manifest["accounting"]
    return {"seconds": time.perf_counter() - started, "kept": accounting["kept"], "bad": accounting["quarantined"]}


def best_of(side, paths: list[Path], repeat: int, num_proc: int) -> dict:
    """Runs in the side's own process: `repeat` runs, the fastest counts."""
    runs = [side(paths, num_proc) for _ in range(repeat)]
    return min(runs, key=lambda run: run["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts (both sides)")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="datasets.map processes for its parallel mode (it also runs with 1; the faster counts)")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = generate(Path(folder), args.records)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"input: {args.records:,} records in {len(paths)} JSONL files, {size_mb:.0f} MB; best of {args.repeat} "
              f"per side; {len(os.sched_getaffinity(0))} cores, datasets.map num_proc {args.num_proc}")  # fmt: skip
        peer_modes = sorted({1, args.num_proc})
        peers = {n: run_measured(best_of, run_baseline, paths, args.repeat, n) for n in peer_modes}
        ours = run_measured(best_of, run_ours, paths, args.repeat, 1)
    sides = [(f"datasets load_dataset + map(batched, arrow), num_proc {n}", peers[n]) for n in peer_modes]
    baseline = min(peers.values(), key=lambda result: result["seconds"])
    for name, result in [*sides, ("ours (curate ingest)", ours)]:
        rate = result["kept"] / result["seconds"]
        print(f"{name:56s} {result['seconds']:7.2f} s  {rate:10,.0f} records/s  kept {result['kept']:,}  "
              f"bad {result['bad']}  peak memory {result['peak_mb']:.0f} MB")  # fmt: skip
    print(f"ratio (datasets at its fastest / ours): {baseline['seconds'] / ours['seconds']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
