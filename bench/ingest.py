"""Ingest + format throughput: ours vs `datasets` JSON loading + a per-row Python formatter.

Both sides read the same generated JSONL files (Alpaca + ShareGPT + OpenAI messages, with a few broken
lines), normalize text and roles, and produce canonical `messages` with a content-hash id. Each side
runs in its own subprocess so peak RSS is measured separately. The ratio comes last.

    python bench/ingest.py [--records 200000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import random
import re
import resource
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

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


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _format_row(row: dict) -> dict | None:
    if row.get("conversations"):
        messages = [{"role": ROLE.get(t["from"]), "content": _normalize(t["value"])} for t in row["conversations"]]
    elif row.get("messages"):
        messages = [{"role": ROLE.get(m["role"]), "content": _normalize(m["content"])} for m in row["messages"]]
    elif row.get("instruction") is not None:
        messages = [{"role": "user", "content": _normalize(row["instruction"])}, {"role": "assistant", "content": _normalize(row["output"])}]
    else:
        return None
    key = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)
    return {"id": hashlib.sha256(key.encode()).hexdigest()[:32], "messages": messages}


def run_baseline(paths: list[Path], queue) -> None:
    import datasets

    datasets.disable_progress_bars()
    started = time.perf_counter()
    kept = bad = 0
    with tempfile.TemporaryDirectory() as cache:
        for path in paths:
            # datasets cannot skip a malformed line; a per-line pre-filter is part of the baseline's cost.
            good_lines = []
            for line in path.read_text().splitlines():
                try:
                    json.loads(line)
                    good_lines.append(line)
                except json.JSONDecodeError:
                    bad += 1
            clean = Path(cache) / path.name
            clean.write_text("\n".join(good_lines) + "\n")
            dataset = datasets.load_dataset("json", data_files=str(clean), split="train", cache_dir=cache)
            for row in dataset:
                if _format_row(row) is not None:
                    kept += 1
    queue.put({"seconds": time.perf_counter() - started, "kept": kept, "bad": bad, "peak_rss_mb": _peak_rss_mb()})


def run_ours(paths: list[Path], queue) -> None:
    from curate.runner import run_pipeline

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = run_pipeline(
            {"name": "bench", "inputs": [{"path": str(p)} for p in paths], "stages": []},
            run_dir=Path(out) / "run",
            report=False,  # the baseline makes no report either
        )
    accounting = result.manifest["accounting"]
    queue.put(
        {
            "seconds": time.perf_counter() - started,
            "kept": accounting["kept"],
            "bad": accounting["quarantined"],
            "peak_rss_mb": _peak_rss_mb(),
        }
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(target, paths) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(paths, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = generate(Path(folder), args.records)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"input: {args.records:,} records in {len(paths)} JSONL files, {size_mb:.0f} MB")
        baseline = measure(run_baseline, paths)
        ours = measure(run_ours, paths)
    for name, result in (("baseline (datasets + per-row Python)", baseline), ("ours (curate ingest)", ours)):
        rate = result["kept"] / result["seconds"]
        print(
            f"{name:40s} {result['seconds']:7.2f} s  {rate:10,.0f} records/s  kept {result['kept']:,}  "
            f"bad {result['bad']}  peak RSS {result['peak_rss_mb']:.0f} MB"
        )
    print(f"speed-up (ours / baseline records/s): {baseline['seconds'] / ours['seconds']:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
