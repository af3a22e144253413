"""Packing benchmark: ours (vectorized best-fit-decreasing planner) vs TRL's own BFD packing, same run.

Both sides get the same tokenized samples (int32 token ids with lengths from the chat-like mix in
`chat_lengths`) and produce the same thing: the samples packed into rows of `max_seq_len` by best fit
decreasing (longer samples truncated), as ragged rows of token ids plus each row's sample lengths.

- **TRL**: `trl.data_utils.pack_dataset(dataset, max_seq_len, strategy="bfd")` on an in-memory
  `datasets.Dataset` with an `input_ids` column, with `map_kwargs={"batch_size": all samples,
  "keep_in_memory": True}`: one global packing (at TRL's default batch of 1,000 samples it packs each
  batch apart, with lower efficiency) and no cache file — TRL at its best and at our efficiency.
- **ours**: `train.packing.plan_packing` (the plan) and one numpy gather of the tokens in plan order.

Each side runs in its own process (peak memory: bench/peak_memory.py), `--repeats` times; the fastest
counts, the same N for both. Efficiency (non-pad tokens / rows × max_seq_len) is printed for both; the
ratio comes last. A secondary line times our planner alone on `--planner-samples` lengths (its goal:
1M samples in <= 1 s at >= 99.5% efficiency); that line has no peer and no ratio.

    python bench/packing.py [--samples 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import run_measured  # noqa: E402


def chat_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token lengths of tokenized chats: 50% short Q&A (median ~180), 35% medium (median ~600),
    15% long multi-turn (median ~1800), lognormal within each. The bench prints the share of samples
    longer than each row length (they are truncated and counted)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.50, 0.35, 0.15])
    mu = np.log(np.array([180.0, 600.0, 1800.0]))[kind]
    sigma = np.array([0.8, 0.7, 0.6])[kind]
    return np.clip(rng.lognormal(mu, sigma), 1, 32768).astype(np.int64)


def samples(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, flat int32 token ids, sample offsets) — the same for both sides."""
    lengths = chat_lengths(n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.random.default_rng(1).integers(1, 49_152, size=int(offsets[-1]), dtype=np.int32)
    return lengths, tokens, offsets


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def run_trl(n: int, max_seq_len: int, repeats: int) -> dict:
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    lengths, tokens, offsets = samples(n)
    column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens))
    dataset = datasets.Dataset(InMemoryTable(pa.table({"input_ids": column})))
    kwargs = {"batch_size": n, "keep_in_memory": True}
    seconds, packed = best_of(lambda: pack_dataset(dataset, max_seq_len, strategy="bfd", map_kwargs=kwargs), repeats)
    real = int(np.minimum(lengths, max_seq_len).sum())
    return {"seconds": seconds, "rows": packed.num_rows, "efficiency": real / (packed.num_rows * max_seq_len)}


def pack_ours(lengths, tokens, offsets, max_seq_len):
    plan = plan_packing(lengths, max_seq_len)
    # Segments come in row order: gather each one's (truncated) tokens, back to back.
    ends = np.cumsum(plan.length)
    index = np.repeat(offsets[plan.sample] - (ends - plan.length), plan.length) + np.arange(int(ends[-1]))
    row_offsets = np.concatenate([[0], np.cumsum(plan.row_fill)])
    return plan, tokens[index], row_offsets


def run_ours(n: int, max_seq_len: int, repeats: int) -> dict:
    global plan_packing
    from train.packing import plan_packing  # imported before the clock starts, as TRL's side does

    lengths, tokens, offsets = samples(n)
    seconds, (plan, _, _) = best_of(lambda: pack_ours(lengths, tokens, offsets, max_seq_len), repeats)
    return {"seconds": seconds, "rows": plan.num_rows, "efficiency": plan.efficiency}


def planner_alone(n: int, max_seq_len: int, repeats: int) -> str:
    from train.packing import plan_packing

    seconds, plan = best_of(lambda: plan_packing(chat_lengths(n), max_seq_len), repeats)
    goals = f"goal <= 1 s: {'met' if seconds <= 1 else 'MISSED'}; goal >= 99.5%: {'met' if plan.efficiency >= 0.995 else 'MISSED'}"
    return (f"ours planner alone (no peer), {n:,} lengths: {seconds:.3f} s, efficiency {plan.efficiency:.4%}, "
            f"rows {plan.num_rows:,}, truncated {plan.num_truncated:,}; {goals}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--planner-samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts (both sides)")
    args = parser.parse_args()

    lengths = chat_lengths(args.samples)
    print(f"cores: {len(os.sched_getaffinity(0))}; both sides single-threaded; best of {args.repeats} per side")
    print(f"length mix: n={args.samples:,} mean={lengths.mean():.0f} median={np.median(lengths):.0f} "
          f"p99={np.percentile(lengths, 99):.0f} tokens={lengths.sum():,}; > 2048: {np.mean(lengths > 2048):.1%}, "
          f"> 4096: {np.mean(lengths > 4096):.1%}")  # fmt: skip
    ratios = []
    for max_seq_len in (2048, 4096):
        trl = run_measured(run_trl, args.samples, max_seq_len, args.repeats)
        ours = run_measured(run_ours, args.samples, max_seq_len, args.repeats)
        print(f"\n== max_seq_len {max_seq_len}, {args.samples:,} samples ==")
        for name, result in (("TRL pack_dataset bfd (one global batch)", trl), ("ours plan_packing + gather", ours)):
            print(f"{name:40s} {result['seconds']:8.3f} s  efficiency {result['efficiency']:.4%}  rows {result['rows']:,}  "
                  f"peak memory {result['peak_mb']:.0f} MB")  # fmt: skip
        gap = abs(trl["efficiency"] - ours["efficiency"])
        if gap > 0.001:
            print(f"note: efficiencies differ by {gap:.2%}; the ratio compares unequal packings")
        ratios.append((max_seq_len, trl["seconds"] / ours["seconds"]))
    if args.planner_samples:
        print("\n" + run_measured(_planner_line, args.planner_samples, 4096, args.repeats)["line"])
    print()
    for max_seq_len, ratio in ratios:
        print(f"ratio @ {max_seq_len}: TRL bfd / ours on the same {args.samples:,} samples = {ratio:,.1f}x")


def _planner_line(n: int, max_seq_len: int, repeats: int) -> dict:
    return {"line": planner_alone(n, max_seq_len, repeats)}


if __name__ == "__main__":
    main()
