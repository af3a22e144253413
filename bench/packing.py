"""Planner benchmark: best-fit-decreasing (ours, vectorized) vs a plain first-fit Python loop.

Lengths come from a chat-like mix (documented in `chat_lengths`). Prints, per row length: our planner's
time for 1M samples and its packing efficiency (non-pad tokens / all tokens); the baseline's time and
efficiency on a subset (plain first-fit is O(samples x rows), so 1M samples would take hours — its 1M
figure is a projection and labelled so); the ratio on the same subset last.

    python bench/packing.py [--samples 1000000] [--baseline-samples 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from train.packing import first_fit_python, plan_packing  # noqa: E402


def chat_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token lengths of tokenized chats: 50% short Q&A (median ~180), 35% medium (median ~600),
    15% long multi-turn (median ~1800), lognormal within each. The bench prints the share of samples
    longer than each row length (they are truncated and counted)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=n, p=[0.50, 0.35, 0.15])
    mu = np.log(np.array([180.0, 600.0, 1800.0]))[kind]
    sigma = np.array([0.8, 0.7, 0.6])[kind]
    return np.clip(rng.lognormal(mu, sigma), 1, 32768).astype(np.int64)


def best_of(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def first_fit_efficiency(lengths, max_seq_len):
    clipped = np.minimum(lengths, max_seq_len)
    bins = first_fit_python(clipped.tolist(), max_seq_len)
    return clipped.sum() / (len(bins) * max_seq_len)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--baseline-samples", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lengths = chat_lengths(args.samples)
    subset = lengths[: args.baseline_samples]
    print(f"cores available: {len(os.sched_getaffinity(0))}; planner is single-threaded numpy")
    print(f"length mix: n={args.samples:,} mean={lengths.mean():.0f} median={np.median(lengths):.0f} "
          f"p99={np.percentile(lengths, 99):.0f}; > 2048: {np.mean(lengths > 2048):.1%}, "
          f"> 4096: {np.mean(lengths > 4096):.1%}")  # fmt: skip
    rows = []
    for max_seq_len in (2048, 4096):
        ours_t, plan = best_of(lambda: plan_packing(lengths, max_seq_len), args.repeats)
        ours_sub_t, plan_sub = best_of(lambda: plan_packing(subset, max_seq_len), args.repeats)
        base_t, _ = best_of(lambda: first_fit_python(np.minimum(subset, max_seq_len).tolist(), max_seq_len), 1)
        base_eff = first_fit_efficiency(subset, max_seq_len)
        print(f"\n== max_seq_len {max_seq_len} ==")
        print(f"baseline first-fit (Python) {len(subset):>9,} samples: {base_t:8.3f} s  "
              f"efficiency {base_eff:.4%}  (1M projected linearly: >= {base_t * args.samples / len(subset):,.0f} s)")
        print(f"ours BFD (numpy)            {len(subset):>9,} samples: {ours_sub_t:8.3f} s  "
              f"efficiency {plan_sub.efficiency:.4%}")
        print(f"ours BFD (numpy)            {args.samples:>9,} samples: {ours_t:8.3f} s  "
              f"efficiency {plan.efficiency:.4%}  rows {plan.num_rows:,}  truncated {plan.num_truncated:,} "
              f"({plan.truncated_tokens:,} tokens)  goal <= 1 s: {'met' if ours_t <= 1 else 'MISSED'}; "
              f"goal >= 99.5%: {'met' if plan.efficiency >= 0.995 else 'MISSED'}")
        rows.append((max_seq_len, base_t / ours_sub_t, base_t * args.samples / len(subset) / ours_t))
    print()
    for max_seq_len, same, projected in rows:
        print(f"ratio @ {max_seq_len}: first-fit / ours on the same {len(subset):,} samples = {same:,.0f}x; "
              f"projected 1M first-fit / measured 1M ours = {projected:,.0f}x")


if __name__ == "__main__":
    main()
