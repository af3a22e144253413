"""Packing kernel on a GPU: Triton kernel vs the pure-torch oracle for ~1M tokens, and proof of no host syncs.

Needs CUDA; without it, prints why and exits 0. Lengths come from bench/packing.py's chat mix, packed
into rows of --max-seq-len until about --tokens real tokens. Prints, from the same run: the oracle's
device time, the kernel's device time (CUDA events, median of --iters, segment table already on the
device), the full `pack_batch` call (host segment table + pinned async copy + kernel), an exact equality
check, a run of `pack_batch` under `torch.cuda.set_sync_debug_mode("error")`, and the ratio last.
Goal: kernel <= 50 us for 1M tokens on an H200.

    python bench/kernel_gpu.py [--tokens 1000000] [--max-seq-len 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))


def device_time_us(fn, iters):
    if not torch.cuda.is_available():  # --cpu-dry-run: wall time, only to exercise the script
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters * 1e6
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        start[i].record()  # events on the current stream: device time only, launch overhead excluded
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000 for s, e in zip(start, end))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--cpu-dry-run", action="store_true", help="exercise the script on CPU (tiny, not a measurement)")
    args = ap.parse_args()
    if args.cpu_dry_run:
        args.tokens, args.max_seq_len, args.iters = 3000, 256, 10
    elif not torch.cuda.is_available():
        print("bench/kernel_gpu.py: no CUDA device here (torch.cuda.is_available() is False); "
              "this benchmark only runs on a GPU. Nothing measured.")  # fmt: skip
        return 0

    from packing import chat_lengths  # bench/packing.py

    from train.packing import pack_batch, pack_batch_reference, plan_packing
    from train.packing.kernel import _pack_torch, _pack_triton, _to_device, segment_table

    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    cuda = device.type == "cuda"
    lengths = chat_lengths(4 * args.tokens // 500 + 1000, seed=1)
    lengths = np.minimum(lengths, args.max_seq_len)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), args.tokens)) + 1]
    plan = plan_packing(lengths, args.max_seq_len)
    rng = np.random.default_rng(0)
    total = int(lengths.sum())
    tokens = torch.from_numpy(rng.integers(1, 128_000, size=total)).to(device)
    target = torch.from_numpy(rng.random(total) < 0.6).to(device)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)).to(device)
    width = args.max_seq_len
    meta = _to_device(segment_table(plan, width), device)
    where = torch.cuda.get_device_name() if cuda else "CPU dry run"
    print(f"{where}: {len(lengths):,} samples, {plan.num_tokens:,} real tokens in {plan.num_rows} rows x {width} "
          f"= {plan.num_rows * width:,} positions, {meta.shape[1]:,} segments")  # fmt: skip

    args_ = (tokens, target, offsets, meta, plan.num_rows, width, 0)
    ref = _pack_torch(*args_)
    got = _pack_triton(*args_)  # also compiles
    sync()
    equal = all(torch.equal(a, b) for a, b in zip(ref, got))

    oracle_us = device_time_us(lambda: _pack_torch(*args_), max(10, args.iters // 10))
    kernel_us = device_time_us(lambda: _pack_triton(*args_), args.iters)

    pack_batch(tokens, target, offsets, plan, impl="triton")
    sync()
    t = time.perf_counter()
    for _ in range(20):
        full = pack_batch(tokens, target, offsets, plan, impl="triton")
    sync()
    full_us = (time.perf_counter() - t) / 20 * 1e6

    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        checked = pack_batch(tokens, target, offsets, plan, impl="triton")
        sync_free = "yes (set_sync_debug_mode('error') raised nothing)" if cuda else "not checked (CPU dry run)"
    except RuntimeError as e:
        checked, sync_free = None, f"NO: {e}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    oracle_full = pack_batch_reference(tokens, target, offsets, plan)
    if checked is not None:
        equal &= all(torch.equal(getattr(checked, f), getattr(oracle_full, f))
                     for f in ("input_ids", "labels", "position_ids", "segment_ids", "cu_seqlens"))  # fmt: skip
    del full

    print(f"oracle (torch) device time: {oracle_us:10.1f} us")
    goal = "met" if kernel_us <= 50 else "MISSED"
    print(f"kernel (Triton) device time: {kernel_us:9.1f} us   goal <= 50 us: {goal}")
    print(f"pack_batch wall time (host table + pinned copy + kernel, synced): {full_us:.1f} us")
    print(f"kernel == oracle exactly: {equal}")
    print(f"no host syncs in pack_batch: {sync_free}")
    if not cuda:
        print("(CPU dry run: Triton interpreter and wall clock; these figures are not measurements)")
    print(f"ratio oracle / kernel = {oracle_us / kernel_us:.1f}x")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
