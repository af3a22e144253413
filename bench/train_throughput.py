"""LoRA SFT throughput on CPU: packed rows vs batches padded to their longest sample.

Same tiny random Llama (built from a config), same LoRA, same samples (one pass over the same data, in
the same order before planning), same optimizer. Throughput = real (non-pad) tokens per second of
wall time, including collation/packing. Padded batches take `--batch-size` samples each; packed
micro-batches take `--rows` rows of `--max-seq-len`, chosen so both hold a similar number of real
tokens per step. Prints the padded baseline, the packed run, and the ratio last.

    python bench/train_throughput.py [--samples 192] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from packing import chat_lengths  # noqa: E402  (bench/packing.py: the same length mix)

from train.packing import pack_batch, packed_causal_lm_loss, packed_forward, packing_canary, plan_packing  # noqa: E402

IGNORE = -100


def build_model(seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    return model.train()


def make_data(n, max_seq_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(chat_lengths(n, seed) // 8, 8, max_seq_len)  # the chat mix, scaled to a CPU run
    tokens = torch.from_numpy(rng.integers(1, 1024, size=int(lengths.sum())))
    # Chats: the first ~30% of each sample is prompt (not a target), the rest the assistant turn.
    pos_in_sample = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    target = torch.from_numpy(pos_in_sample >= np.repeat((lengths * 0.3).astype(np.int64), lengths))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return lengths, tokens, target, offsets


def run_padded(model, opt, lengths, tokens, target, offsets, batch_size, pad_id=0):
    real = 0
    computed = 0
    steps = 0
    t0 = time.perf_counter()
    for start in range(0, len(lengths), batch_size):
        idx = range(start, min(start + batch_size, len(lengths)))
        width = int(max(lengths[i] for i in idx))
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(idx):
            n, o = int(lengths[i]), int(offsets[i])
            ids[j, :n] = tokens[o : o + n]
            labels[j, 1:n] = torch.where(target[o + 1 : o + n], tokens[o + 1 : o + n], IGNORE)
            mask[j, :n] = 1
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        loss_sum, n_targets = packed_causal_lm_loss(out.logits, labels)
        (loss_sum / n_targets.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int(mask.sum())
        computed += mask.numel()
        steps += 1
    return real, steps, time.perf_counter() - t0, real / computed


def run_packed(model, opt, lengths, tokens, target, offsets, max_seq_len, rows):
    t0 = time.perf_counter()
    plan = plan_packing(lengths, max_seq_len)
    offsets_t = torch.from_numpy(offsets)
    counts = plan.target_counts(target.numpy(), offsets)  # host-side, no sync, for normalization
    real = 0
    steps = 0
    for start in range(0, plan.num_rows, rows):
        batch = pack_batch(tokens, target, offsets_t, plan, slice(start, start + rows), impl="torch")
        out = packed_forward(model, **batch.model_inputs("sdpa"))
        loss_sum, _ = packed_causal_lm_loss(out.logits, batch.labels)
        (loss_sum / max(1, int(counts[start : start + rows].sum()))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += batch.num_tokens
        steps += 1
    return real, steps, time.perf_counter() - t0, plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=192)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=0, help="packed rows per step (0: match padded real tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    lengths, tokens, target, offsets = make_data(args.samples, args.max_seq_len)
    rows = args.rows or max(1, round(args.batch_size * lengths.mean() / args.max_seq_len))
    print(f"{args.samples} samples, mean {lengths.mean():.0f} tokens (max {lengths.max()}), "
          f"{args.threads} threads; padded: {args.batch_size} samples/step; "
          f"packed: {rows} rows x {args.max_seq_len}")  # fmt: skip

    # Runs alternate (padded, packed, padded, ...) and the best of --repeats counts, so load from other
    # processes on a shared machine hits both sides alike.
    results = {"padded": 0.0, "packed": 0.0}
    for rep in range(args.repeats):
        for name in ("padded", "packed"):
            model = build_model()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            if name == "packed":
                packing_canary(model)
            # Warm-up step on a few samples (allocator, kernels), not timed.
            run_padded(model, opt, lengths[:2], tokens, target, offsets, 2)
            if name == "padded":
                real, steps, secs, eff = run_padded(model, opt, lengths, tokens, target, offsets, args.batch_size)
                extra = f"  (non-pad share of computed tokens {eff:.2%})"
            else:
                real, steps, secs, plan = run_packed(
                    model, opt, lengths, tokens, target, offsets, args.max_seq_len, rows
                )
                extra = f"  (packing efficiency {plan.efficiency:.2%}, {plan.num_rows} rows)"
            results[name] = max(results[name], real / secs)
            print(f"run {rep + 1} {name:>7}: {real:,} real tokens, {steps} steps, {secs:.2f} s -> "
                  f"{real / secs:,.0f} tokens/s{extra}")  # fmt: skip
    print(f"best padded: {results['padded']:,.0f} tokens/s; best packed: {results['packed']:,.0f} tokens/s")
    ratio = results["packed"] / results["padded"]
    print(f"ratio packed / padded tokens/s = {ratio:.2f}x (goal >= 1.8x: {'met' if ratio >= 1.8 else 'MISSED'})")


if __name__ == "__main__":
    main()
