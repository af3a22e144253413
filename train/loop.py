"""The training loop for `train sft` and `train dpo`, top to bottom in one file.

    data   split dir -> chat template -> tokens + target mask -> packing plan (best-fit, host)
    model  base (HF folder or GGUF) + peft LoRA, optional gradient checkpointing, DDP under torchrun
    step   grad_accum micro-batches of packed rows; every loss is a SUM divided by the step's total
           targets (tokens for SFT, pairs for DPO) across micro-batches and processes, so each target
           weighs the same wherever it landed; clip, AdamW, warmup + cosine/linear schedule
    eval   validation loss every `eval.every` steps, early stopping, base vs adapter at the end
    ckpt   adapter + optimizer + scheduler + RNG + data position (epoch, cursor), atomically; a rerun
           resumes from the newest checkpoint and reproduces the uninterrupted run exactly on CPU

The data order is a pure function of (seed, epoch): the packed rows are shuffled with
`default_rng(seed + epoch)`, and `cursor` counts the rows consumed in that epoch. That pair is the whole
data position, so resuming needs no iterator state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from safety.errors import OwnershipError, SafetyError
from safety.locking import exclusive_lock
from safety.ownership import claim_dir, record, remove_leftover_temps, remove_recorded
from train.checkpoint import latest_usable_checkpoint, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from train.config import TrainConfig
from train.data import (
    describe_cut, dpo_target_stats, load_dpo_split, load_sft_split, planner_overflow, set_chat_template, sft_target_stats, split_files,
)
from train.dpo import batch_dpo_loss, pack_pairs, pair_logps, precompute_reference_logps, reference_logps
from train.errors import CheckpointError, DataError, TrainingDivergedError
from train.evaluate import base_vs_adapter_sft, dpo_metrics, sft_loss
from train.models import add_lora, base_model_id, load_base_model, load_tokenizer, pick_precision, set_cpu_threads
from train.model_card import write_model_card
from train.tracking import Tracker
from train.packing import pack_batch, packed_lm_loss, packing_canary, plan_dpo_packing, plan_packing


# --------------------------------------------------------------------------------------------- setup
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed() -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return info, torch.device("cuda", info.local_rank)
    return info, torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step `s`: linear warmup, then cosine/linear/constant decay."""

    def factor(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return factor


def run_fingerprint(config: TrainConfig, mode: str, world: int) -> str:
    """What a checkpoint must agree with to be resumed: model, data, LoRA, seed, batch shape, mode."""
    keyed = {
        "mode": mode,
        "model": config.model.model_dump(),
        "data": config.data.model_dump(),
        "lora": config.lora.model_dump(),
        "seed": config.seed,
        "rows": [config.optim.batch_rows, config.optim.grad_accum, world],
    }
    if config.init_adapter:  # another starting adapter is another run (added only when set: old fingerprints hold)
        from train.continual import weights_sha256

        keyed["init_adapter_sha256"] = weights_sha256(config.init_adapter)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def rows_for_step(num_rows: int, rows_needed: int, seed: int, epoch: int, cursor: int):
    """The next `rows_needed` packed-row indices from the epoch-shuffled order, and the new (epoch, cursor)."""
    taken: list[np.ndarray] = []
    while rows_needed:
        order = np.random.default_rng(seed + epoch).permutation(num_rows)
        chunk = order[cursor : cursor + rows_needed]
        taken.append(chunk)
        rows_needed -= chunk.shape[0]
        cursor += chunk.shape[0]
        if cursor >= num_rows:
            epoch, cursor = epoch + 1, 0
    return np.concatenate(taken), epoch, cursor


def resolve_batch_and_steps(opt, plan, world: int) -> None:
    """Fill the optimizer settings given in data terms, in place (train_config.json records the result):
    batch_samples -> batch_rows (the plan's average samples per packed row), epochs -> max_steps (passes
    over the packed train rows), warmup_ratio -> warmup_steps (rounded up, as transformers does)."""
    if opt.batch_samples is not None:
        samples_per_row = plan.sample.shape[0] / max(1, plan.num_rows)
        opt.batch_rows = max(1, round(opt.batch_samples / samples_per_row))
    rows_per_step = opt.batch_rows * opt.grad_accum * world
    if opt.epochs is not None:
        opt.max_steps = max(1, math.ceil(opt.epochs * plan.num_rows / rows_per_step))
    elif opt.max_steps is None:
        opt.max_steps = 100
    if opt.warmup_ratio is not None:
        opt.warmup_steps = math.ceil(opt.warmup_ratio * opt.max_steps)


# ------------------------------------------------------------------------------------------ safety
def _warn(message: str) -> None:
    # Plain text on stderr: paths and data in the message are never read as rich markup.
    sys.stderr.write(f"warning: {message}\n")


def _target_stats(config: TrainConfig, mode: str, split: str, data, plan, warn) -> dict:
    """Count what data.max_seq_len removes from a split; warn when it removes targets, refuse a train
    split left with none (it would save an untrained adapter)."""
    stats = (sft_target_stats if mode == "sft" else dpo_target_stats)(data, plan)
    cut = describe_cut(f"{config.data.split_dir}/{split}", stats, config.data.max_seq_len, config.data.overflow)
    if config.data.overflow == "reject" and stats["samples_cut"]:
        raise DataError(f"{cut}; data.overflow is 'reject': raise data.max_seq_len or choose 'truncate' or 'drop'")
    if stats["target_tokens_left"] == 0:
        if split == "train":
            raise DataError(f"{cut}: nothing to train on; raise data.max_seq_len")
        warn(f"{cut}: validation skipped")
    elif stats["target_tokens_removed"] or stats["samples_cut"]:  # prompt tokens cut count too
        warn(cut)
    return stats


def _clip_and_measure(params: list, max_grad_norm: float | None) -> float:
    """The global gradient norm (clipped to `max_grad_norm` when set), read to the host."""
    if max_grad_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _stop_if_not_finite(step: int, loss: float, grad_norm: float, last_checkpoint: int | None, opt) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    kept = f"checkpoint step-{last_checkpoint:06d} is the last saved" if last_checkpoint else "nothing was saved"
    clip = "" if opt.max_grad_norm is not None else " or set optim.max_grad_norm"
    raise TrainingDivergedError(
        f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; stopped before the update ({kept}); "
        f"lower optim.lr (now {opt.lr}){clip}"
    )


def _require_finite_weights(params: list, step: int) -> None:
    """Never persist a poisoned adapter: one device sync per save."""
    if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        raise TrainingDivergedError(f"step {step}: the adapter weights are not finite; not saved; lower optim.lr")


# ----------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """metrics.jsonl: one JSON object per line. On resume, lines past the checkpoint step are dropped so
    the file reads as if the run had never stopped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a line cut short by kill -9 mid-write
                    record = None
                # Keep what the checkpoint had seen; the end-of-run comparison is redone.
                if isinstance(record, dict) and record.get("step", 0) <= resume_step and "final" not in record:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    stopped_early: bool = False
    resumed_from: int | None = None
    data_stats: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- output folder
# What a training run writes into output_dir; recorded in its ownership marker before the run writes.
TRAIN_OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "train_config.json", "loss.png", "tensorboard")


def run_inputs(config: TrainConfig) -> list[Path]:
    """Local paths a run reads: no folder holding one of them may be its output_dir."""
    paths = [config.data.split_dir, config.model.path, config.eval.general_set]
    return [Path(p) for p in paths if p and Path(p).expanduser().exists()]


@contextmanager
def owned_output_dir(config: TrainConfig, ddp: Dist, protected: tuple = ()) -> Iterator[None]:
    """Claim output_dir (new, empty or a train output folder: never a user's folder) and hold its lock
    for the run; leftovers of a killed run are removed under the lock. The main process does this; the
    others learn whether it was refused, so a refusal stops every process instead of leaving them waiting."""
    if not ddp.main:
        if ddp.all_sum([0.0])[0]:
            raise OwnershipError(f"{config.output_dir}: refused by the main process (see its error)")
        yield
        return
    with ExitStack() as stack:
        try:
            out = claim_dir(config.output_dir, "train", "train-output", [*run_inputs(config), *protected], option="output_dir (--output-dir)")
            stack.enter_context(exclusive_lock(out, "train run"))
            remove_leftover_temps(out)
            record(out, *TRAIN_OUTPUTS)
        except SafetyError:
            ddp.all_sum([1.0])
            raise
        ddp.all_sum([0.0])
        yield


# -------------------------------------------------------------------------------------------- train
def train(
    config: TrainConfig, mode: str = "sft", resume: str = "auto", stop_at_step: int | None = None, console=None, protected: tuple = ()
) -> TrainResult:
    """Train a LoRA adapter (`mode` "sft" or "dpo"). resume: "auto" (newest checkpoint if any), "never"
    (start over, deleting old checkpoints) or a checkpoint folder. `stop_at_step` ends the run early
    after checkpointing (for preemptible jobs and tests); the schedule still targets optim.max_steps.
    `protected`: more files the run reads (its config file), whose folders output_dir must not be."""
    ddp, device = init_distributed()
    with ExitStack() as held:
        # Claimed once the inputs have been read (their errors come first), before anything is written;
        # held until the run returns.
        claim_output = lambda: held.enter_context(owned_output_dir(config, ddp, protected))  # noqa: E731
        return _train(config, mode, resume, stop_at_step, console, ddp, device, claim_output)


def _train(config: TrainConfig, mode: str, resume: str, stop_at_step: int | None, console, ddp: Dist, device: torch.device, claim_output) -> TrainResult:
    if device.type == "cpu":
        set_cpu_threads(config.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    out = Path(config.output_dir)
    opt = config.optim
    seed_everything(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    autocast_dtype = pick_precision(opt.precision, device)
    amp = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext

    # --- data: tokens + targets, then the packing plan (host-side, deterministic)
    split_files(config.data.split_dir, "train")  # a missing split fails now, not after a GGUF conversion
    tokenizer = load_tokenizer(config.model)
    set_chat_template(tokenizer, config.data.chat_template)
    pad_id = tokenizer.pad_token_id
    overflow = planner_overflow(config.data.overflow)
    if mode == "sft":
        only = config.data.completion_only_loss
        train_data = load_sft_split(tokenizer, config.data.split_dir, "train", config.data.max_train_samples, only, config.data.replay, config.seed)
        val_data = load_sft_split(tokenizer, config.data.split_dir, "validation", config.data.max_val_samples, only)
        plan_of = lambda d: plan_packing(d.lengths, config.data.max_seq_len, overflow)  # noqa: E731
    else:
        train_data = load_dpo_split(tokenizer, config.data.split_dir, "train", config.data.max_train_samples, config.data.replay, config.seed)
        val_data = load_dpo_split(tokenizer, config.data.split_dir, "validation", config.data.max_val_samples)
        plan_of = lambda d: plan_dpo_packing(d.prompt_lens, d.chosen_lens, d.rejected_lens, config.data.max_seq_len, overflow)  # noqa: E731
    if train_data is None:
        raise DataError(f"{config.data.split_dir}: the train split has no {mode} rows")
    train_plan = plan_of(train_data)
    val_plan = plan_of(val_data) if val_data is not None else None
    if train_plan.num_rows == 0:
        raise DataError(f"{config.data.split_dir}: nothing to train on after packing")
    resolve_batch_and_steps(opt, train_plan, ddp.world)
    rows_per_step = opt.batch_rows * opt.grad_accum * ddp.world
    warn = _warn if ddp.main else (lambda message: None)
    data_stats = {"train": _target_stats(config, mode, "train", train_data, train_plan, warn)}
    if val_plan is not None:
        data_stats["validation"] = _target_stats(config, mode, "validation", val_data, val_plan, warn)
        if data_stats["validation"]["target_tokens_left"] == 0:
            val_plan = None  # a loss over no targets is NaN: no validation rather than a meaningless one
    if mode == "sft":
        # Host copies to count each step's target tokens without touching the device.
        host_mask = train_data.target_mask.numpy()
        host_offsets = train_data.offsets.numpy()
        tokens_dev = train_data.tokens.to(device)
        mask_dev = train_data.target_mask.to(device)
        offsets_dev = train_data.offsets.to(device)
        targets_per_row = train_plan.target_counts(host_mask, host_offsets)
    else:
        pairs_per_row = np.diff(train_plan.row_ptr)
    lineage = None
    if config.init_adapter:  # checked before the output folder is claimed: a mismatch writes nothing
        from train.continual import check_init_adapter, init_adapter_lineage

        check_init_adapter(config.init_adapter, config)
        lineage = init_adapter_lineage(config.init_adapter)
    tokens_per_row = np.zeros(train_plan.num_rows, np.int64)
    np.add.at(tokens_per_row, train_plan.row, train_plan.length)

    claim_output()

    # --- model: base + LoRA (seeded init), checked for packed-attention isolation before any step
    model = load_base_model(config.model).to(device)
    model = add_lora(model, config.lora, config.seed)
    if config.init_adapter:  # weights only: optimizer and schedule start fresh; a resume overwrites them below
        from train.continual import load_init_adapter

        load_init_adapter(model, config.init_adapter)
    if opt.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "sft":
        packing_canary(model)
    model.train()
    peft_model = model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(opt.schedule, opt.warmup_steps, opt.max_steps, opt.min_lr_ratio)
    )

    # --- resume
    fingerprint = run_fingerprint(config, mode, ddp.world)
    step, epoch, cursor = 0, 0, 0
    best_val, bad_evals, tokens_seen, elapsed_before = math.inf, 0, 0, 0.0
    resumed_from = None
    if resume == "never":
        if ddp.main:
            remove_recorded(out, "checkpoints")
        ddp.barrier()
        checkpoint = None
    elif resume == "auto":
        # The main process sets damaged checkpoints aside first, so every process then finds the same one.
        checkpoint = latest_usable_checkpoint(out, warn) if ddp.main else None
        ddp.barrier()
        if not ddp.main:
            checkpoint = latest_usable_checkpoint(out, warn, set_aside=False)
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, peft_model, fingerprint)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, cursor = int(state["step"]), int(state["epoch"]), int(state["cursor"])
            best_val, bad_evals = float(state["best_val"]), int(state["bad_evals"])
            tokens_seen, elapsed_before = int(state["tokens_seen"]), float(state["elapsed"])
            set_rng_states(state["rng"][ddp.rank] if isinstance(state["rng"], list) else state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            # Only a hand-edited state.json gets here (the manifest matched): say so, never a traceback.
            raise CheckpointError(f"{checkpoint}: state.json does not fit this run ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
        resumed_from = step

    ref_table = None
    if mode == "dpo" and config.dpo.precompute_ref_logps:
        ref_table = precompute_reference_logps(peft_model, train_data, train_plan, opt.batch_rows, pad_id, device, autocast_dtype)

    train_model = peft_model
    if ddp.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(peft_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = MetricsLog(out / "metrics.jsonl", ddp.main, resumed_from if resumed_from is not None else 0)
    if ddp.main and resumed_from is None:
        remove_recorded(out, "tensorboard")  # a fresh run's curves never mix with an old run's
    tracker = Tracker(config.report_to if ddp.main else [], out, resumed_from)
    history: list[dict] = []
    if ddp.main:
        (out / "train_config.json").write_text(json.dumps({"mode": mode, **config.model_dump(), "data_stats": data_stats, "init_adapter_lineage": lineage, "replay": train_data.replay}, indent=2, sort_keys=True) + "\n")

    def evaluate() -> dict:
        if val_plan is None or val_plan.num_rows == 0:
            return {}
        if mode == "sft":
            loss, n = sft_loss(peft_model, val_data, val_plan, opt.batch_rows, pad_id, device, config.eval.max_rows, autocast_dtype)
            return {"val_loss": loss, "val_tokens": n}
        return dpo_metrics(peft_model, val_data, val_plan, opt.batch_rows, pad_id, device, config.dpo, config.eval.max_rows, autocast_dtype)

    def checkpoint_now():
        _require_finite_weights(params, step)
        state = {
            "fingerprint": fingerprint, "step": step, "epoch": epoch, "cursor": cursor,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "best_val": best_val, "bad_evals": bad_evals, "tokens_seen": tokens_seen,
            "elapsed": elapsed_before + (time.perf_counter() - started),
        }  # fmt: skip
        rngs = [None] * ddp.world if ddp.world > 1 else None
        if ddp.world > 1:
            dist.all_gather_object(rngs, rng_states())
        state["rng"] = rngs if ddp.world > 1 else rng_states()
        if ddp.main:
            save_checkpoint(out, step, peft_model, state, config.checkpoint.keep)
        ddp.barrier()

    progress = _Progress(ddp.main and config.progress, opt.max_steps, step, console, mode)
    started = time.perf_counter()
    stopped_early = False
    last_ckpt_step = resumed_from
    last_eval: tuple[int, dict] = (-1, {})
    with progress:
        while step < opt.max_steps:
            t0 = time.perf_counter()
            step_rows, epoch, cursor = rows_for_step(train_plan.num_rows, rows_per_step, config.seed, epoch, cursor)
            if mode == "sft":
                step_targets = int(targets_per_row[step_rows].sum())  # over every micro-batch and process
            else:
                step_pairs = int(pairs_per_row[step_rows].sum())
            sums = np.zeros(5)  # loss sum, chosen reward sum, rejected reward sum, correct pairs, tokens
            for micro in range(opt.grad_accum):
                first = (micro * ddp.world + ddp.rank) * opt.batch_rows
                rows = step_rows[first : first + opt.batch_rows]
                last = micro == opt.grad_accum - 1
                sync = nullcontext() if last or ddp.world == 1 else train_model.no_sync()
                with sync:
                    if mode == "sft":
                        batch = pack_batch(tokens_dev, mask_dev, offsets_dev, train_plan, rows, pad_id=pad_id, pad_to_multiple_of=8)
                        with amp():
                            loss_sum, _ = packed_lm_loss(train_model, batch.model_inputs(peft_model.config._attn_implementation), batch.labels)
                        # DDP averages gradients over processes; scale by world so the result is the
                        # global sum divided by the global target count.
                        (loss_sum * (ddp.world / max(1, step_targets))).backward()
                        sums[0] += float(loss_sum.detach())
                    else:
                        batch = pack_pairs(train_data, train_plan, rows, pad_id, device)
                        policy_c, policy_r = pair_logps(train_model, batch, autocast_dtype)
                        if ref_table is not None:
                            ref = torch.from_numpy(ref_table[batch.sample]).to(device)
                            ref_c, ref_r = ref[:, 0], ref[:, 1]
                        else:
                            ref_c, ref_r = reference_logps(peft_model, batch, autocast_dtype)
                        losses, chosen_r, rejected_r = batch_dpo_loss(config.dpo, batch, policy_c, policy_r, ref_c, ref_r)
                        (losses.sum() * (ddp.world / max(1, step_pairs))).backward()
                        sums[0] += float(losses.detach().sum())
                        sums[1] += float(chosen_r.sum())
                        sums[2] += float(rejected_r.sum())
                        sums[3] += float((chosen_r > rejected_r).sum())
                sums[4] += int(tokens_per_row[rows].sum())
            # Checked before the update, so a non-finite step never reaches the weights (the loss and
            # norm are read from the device here anyway; every process sees the same global values).
            totals = ddp.all_sum(sums.tolist())
            denominator = step_targets if mode == "sft" else step_pairs
            grad_norm = _clip_and_measure(params, opt.max_grad_norm)
            _stop_if_not_finite(step + 1, totals[0] / max(1, denominator), grad_norm, last_ckpt_step, opt)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1

            step_tokens = int(totals[4])
            tokens_seen += step_tokens
            dt = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, "loss": totals[0] / max(1, denominator), "lr": lr,
                      "tokens": step_tokens, "tokens_per_s": step_tokens / dt if dt > 0 else None}  # fmt: skip
            if opt.max_grad_norm is not None:
                record["grad_norm"] = grad_norm
            if mode == "dpo":
                record.update(reward_chosen=totals[1] / max(1, step_pairs), reward_rejected=totals[2] / max(1, step_pairs),
                              reward_margin=(totals[1] - totals[2]) / max(1, step_pairs), reward_accuracy=totals[3] / max(1, step_pairs))  # fmt: skip
            metrics.write(record)
            tracker.log(record, step)
            history.append(record)
            progress.update(step, record)

            is_last = step >= opt.max_steps or step == stop_at_step
            if (config.eval.every and step % config.eval.every == 0) or (is_last and step >= opt.max_steps):
                result = evaluate()
                last_eval = (step, result)
                if result:
                    metrics.write({"step": step, **result})
                    tracker.log(result, step)
                    history.append({"step": step, **result})
                    progress.note(step, result)
                    if result["val_loss"] < best_val - config.eval.early_stopping_min_delta:
                        best_val, bad_evals = result["val_loss"], 0
                    else:
                        bad_evals += 1
                    if config.eval.early_stopping_patience and bad_evals >= config.eval.early_stopping_patience:
                        stopped_early = True
            if (config.checkpoint.every and step % config.checkpoint.every == 0) or is_last or stopped_early:
                checkpoint_now()
                last_ckpt_step = step
            if stopped_early or step == stop_at_step:
                break

    if last_ckpt_step != step:
        checkpoint_now()
    adapter_dir = out / "adapter"
    final: dict = {}
    finished = step >= opt.max_steps or stopped_early
    if finished:
        _require_finite_weights(params, step)
    if ddp.main and finished:
        tmp = out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # Named by its real id, never this machine's GGUF cache folder: the adapter loads anywhere.
        peft_model.peft_config["default"].base_model_name_or_path = base_model_id(config.model)
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_mode.txt").write_text(mode + "\n")
        remove_recorded(out, "adapter")  # ours: recorded in output_dir's marker (a link is unlinked, not followed)
        os.replace(tmp, adapter_dir)
        if config.eval.at_end and val_plan is not None and val_plan.num_rows:
            if mode == "sft" and last_eval[0] == step and last_eval[1]:
                # The adapter side was just measured at this step; only the base is new.
                with peft_model.disable_adapter():
                    base, n = sft_loss(peft_model, val_data, val_plan, opt.batch_rows, pad_id, device, config.eval.max_rows, autocast_dtype)
                final = {"base_loss": base, "adapter_loss": last_eval[1]["val_loss"], "target_tokens": n}
            elif mode == "sft":
                final = base_vs_adapter_sft(peft_model, val_data, val_plan, opt.batch_rows, pad_id, device, config.eval.max_rows, autocast_dtype)
            else:
                final = dpo_metrics(peft_model, val_data, val_plan, opt.batch_rows, pad_id, device, config.dpo, config.eval.max_rows, autocast_dtype)
            metrics.write({"step": step, "final": final, "data_stats": data_stats})
            tracker.log_final(final, step)
        write_model_card(adapter_dir, config, mode, step, data_stats, final, lineage)
        try:
            from train.plot import plot_losses

            plot_losses(out / "metrics.jsonl", out / "loss.png")
        except Exception:  # noqa: BLE001 - a missing plot never fails a finished training run
            pass
    tracker.close()
    ddp.barrier()
    if ddp.world > 1:
        dist.destroy_process_group()
    return TrainResult(out, adapter_dir, step, history, final, stopped_early, resumed_from, data_stats)


# ------------------------------------------------------------------------------------------ progress
class _Progress:
    """A rich progress bar with loss, tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, console, mode: str):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{mode}[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self.task = self.progress.add_task("train", total=total, completed=completed, loss="-", tps="-")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, step: int, record: dict):
        if self.enabled:
            tps = record.get("tokens_per_s")
            self.progress.update(self.task, completed=step, loss=f"{record['loss']:.4f}", tps=f"{tps:,.0f}" if tps else "-")

    def note(self, step: int, result: dict):
        if self.enabled:
            text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            self.progress.console.print(f"step {step}: {text}")
