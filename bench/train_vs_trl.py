"""Training throughput: our loop vs TRL's SFTTrainer, same tiny Llama, data, sequence length, batch and
steps, in the same run. Prints the baseline, ours, and the ratio last.

Both sides get the same LoRA (rank 8, all linear layers), AdamW, packing on (TRL: `packing=True`, its
best-fit-decreasing padding-free packing). Tokens/s is measured identically on both: a forward pre-hook
counts the non-pad input tokens of every training forward and stamps its start time; throughput is
tokens of steps 2..N-1 over the time from the start of step 2 to the start of step N (steady state,
setup and the first warm-up step excluded, no evaluation or saving inside the window).

    python bench/train_vs_trl.py [--steps 30] [--seq-len 256] [--rows 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from train_helpers import make_tiny_model, sft_conversations, write_sft_split  # noqa: E402


class TokenClock:
    """Forward pre-hook: (start time, non-pad tokens) of every forward made in training mode."""

    def __init__(self, model, pad_id: int):
        self.pad_id, self.events = pad_id, []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if module.training:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.events.append((time.perf_counter(), int((ids != self.pad_id).sum())))

    def tokens_per_s(self) -> float:
        ev = self.events
        if len(ev) < 4:
            raise RuntimeError(f"only {len(ev)} training forwards recorded")
        tokens = sum(n for _, n in ev[1:-1])
        return tokens / (ev[-1][0] - ev[1][0])


def run_ours(model_dir: Path, split_dir: Path, out: Path, args) -> float:
    import train.loop as loop
    from train.config import load_config

    config = load_config(None, base={
        "model": {"path": str(model_dir)},
        "data": {"split_dir": str(split_dir), "max_seq_len": args.seq_len},
        "output_dir": str(out), "seed": 0, "progress": False, "threads": args.threads,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 2e-4, "max_steps": args.steps, "batch_rows": args.rows, "grad_accum": 1, "schedule": "linear", "max_grad_norm": 1.0},
        "eval": {"every": 0, "at_end": False}, "checkpoint": {"every": 0},
    })  # fmt: skip
    clocks = []
    original = loop.add_lora

    def add_lora_with_clock(model, settings, seed):
        peft_model = original(model, settings, seed)
        clocks.append(TokenClock(peft_model.get_base_model(), model.config.pad_token_id))
        return peft_model

    loop.add_lora = add_lora_with_clock
    try:
        loop.train(config, "sft", resume="never")
    finally:
        loop.add_lora = original
    return clocks[0].tokens_per_s()


def run_trl(model_dir: Path, split_dir: Path, out: Path, args) -> float:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    dataset = datasets.Dataset.from_parquet(str(split_dir / "train-00000.parquet")).select_columns(["messages"])
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.rows, gradient_accumulation_steps=1,
        learning_rate=2e-4, lr_scheduler_type="linear", max_grad_norm=1.0, max_length=args.seq_len, packing=True,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    clock = TokenClock(trainer.model.get_base_model(), tokenizer.pad_token_id)
    trainer.train()
    return clock.tokens_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(tmp / "model")
        split_dir = write_sft_split(tmp / "split", sft_conversations(args.samples), sft_conversations(8, offset=10_000))
        print(f"tiny Llama (hidden 64, 2 layers), {args.samples} conversations, seq len {args.seq_len}, "
              f"{args.rows} rows/step, {args.steps} steps, {args.threads} threads")  # fmt: skip
        baseline = run_trl(model_dir, split_dir, tmp / "trl", args)
        print(f"TRL SFTTrainer (packing=True): {baseline:,.0f} tokens/s")
        ours = run_ours(model_dir, split_dir, tmp / "ours", args)
        print(f"train sft (ours):              {ours:,.0f} tokens/s")
        print(f"ratio ours / TRL: {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
