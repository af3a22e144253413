"""The training loop for `train sft` and `train dpo`, top to bottom in one file; what differs between
the two (data, micro-step, evaluation, log fields) is a strategy object from train/strategies.py, chosen
once, and what a run's parts share travels in one `RunContext`.

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

Host syncs: a step's loss sums and gradient norm stay on the device (named float64 tensors in a
`LogWindow`) and are read, in one copy, only on logging steps (every `log_every` steps) and on
checkpoint steps, as torchtune does; other steps queue work without waiting for it. The non-finite
check reads those sums, so it runs exactly then. The trade-off: on a logging step the check comes
before the update (a bad step never reaches the weights); a NaN/inf on a step between two reads is
applied and caught at the next read, which is always before a checkpoint or the adapter is written,
so a poisoned adapter is never saved (the error names the first bad step). `log_every: 1` (the
default) reads every step and keeps the old guarantee whole.
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
from train.data import describe_cut, planner_overflow, set_chat_template, split_files
from train.errors import CheckpointError, DataError, TrainingDivergedError
from train.models import add_lora, base_model_id, load_base_model, load_tokenizer, pick_precision, set_cpu_threads
from train.model_card import write_model_card
from train.strategies import STRATEGIES, DpoStrategy, SftStrategy, Splits
from train.tracking import Tracker


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


def _target_stats(config: TrainConfig, strategy, split: str, data, plan, warn) -> dict:
    """Count what data.max_seq_len removes from a split; warn when it removes targets, refuse a train
    split left with none (it would save an untrained adapter)."""
    stats = strategy.target_stats(data, plan)
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


def _grad_norm(params: list, max_grad_norm: float | None) -> torch.Tensor:
    """The global gradient norm (clipped to `max_grad_norm` when set), left on the device."""
    if max_grad_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=params[0].device)


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
TRAIN_OUTPUTS = ("checkpoints", "adapter", "metrics.jsonl", "train_config.json", "loss.png", "tensorboard", "trackio")


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


# ------------------------------------------------------------------------------------------ context
@dataclass
class RunContext:
    """What every part of a run shares, built once by `_train` (instead of a long argument list)."""

    config: TrainConfig
    strategy: SftStrategy | DpoStrategy
    ddp: Dist
    device: torch.device
    out: Path
    autocast_dtype: torch.dtype | None
    tokenizer: object
    pad_id: int
    splits: Splits
    data_stats: dict
    lineage: dict | None
    fingerprint: str
    model: object = None  # the peft model; the DPO reference is this model with its adapter disabled
    train_model: object = None  # the same model, under DDP when world > 1
    params: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def amp(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()


@dataclass
class Position:
    """The run's counters: with the weights, optimizer, scheduler and RNG, all a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    best_val: float = math.inf
    bad_evals: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds trained before this process started

    @classmethod
    def from_state(cls, state: dict) -> Position:
        return cls(int(state["step"]), int(state["epoch"]), int(state["cursor"]), float(state["best_val"]),
                   int(state["bad_evals"]), int(state["tokens_seen"]), float(state["elapsed"]))  # fmt: skip


class LogWindow:
    """The optimizer steps since the last log, summed on the device. `read` is the only place the loop
    waits for the device: one all-reduce and one copy to the host, on logging steps and before saves.

    `means[name]` adds up each step's sum divided by that step's targets, so a window's mean loss is the
    mean of its steps' losses (TRL's logged loss); DDP processes add their local sums, which sum to the
    global step loss. `first_bad` keeps (step, loss, grad norm) of the first non-finite step (step 0: none).
    """

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names, self.device = names, device
        self.reset()

    def reset(self) -> None:
        self.means = {name: torch.zeros((), dtype=torch.float64, device=self.device) for name in self.names}
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.first_bad = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, step: int, sums: dict[str, torch.Tensor], denominator: int, grad_norm: torch.Tensor, tokens: int) -> None:
        for name in self.names:
            self.means[name] += sums[name] / max(1, denominator)
        self.grad_norm = grad_norm.detach().double()
        step_loss = sums["loss"] / max(1, denominator)
        bad = ~(torch.isfinite(step_loss) & torch.isfinite(self.grad_norm))
        found = torch.stack([step_loss.new_tensor(float(step)), step_loss, self.grad_norm])
        self.first_bad = torch.where(bad & (self.first_bad[0] == 0), found, self.first_bad)
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens

    def read(self, ddp: Dist) -> dict:
        means = torch.stack([self.means[name] for name in self.names])
        if ddp.world > 1:
            dist.all_reduce(means)
        host = torch.cat([means, self.grad_norm[None], self.first_bad]).tolist()
        count = len(self.names)
        return {"means": dict(zip(self.names, host[:count])), "grad_norm": host[count], "first_bad": host[count + 1 :]}


def _stop_if_not_finite(read: dict, step: int, updated: bool, last_checkpoint: int | None, opt) -> None:
    bad_step, loss, grad_norm = read["first_bad"]
    if not bad_step:
        return
    kept = f"checkpoint step-{last_checkpoint:06d} is the last saved" if last_checkpoint else "nothing was saved"
    clip = "" if opt.max_grad_norm is not None else " or set optim.max_grad_norm"
    if int(bad_step) == step and not updated:
        where = "stopped before the update"
    else:  # a step between two reads of the device: its update was applied, but nothing after it is saved
        where = f"seen at step {step} (the loss is read on logging steps and before saves), stopped before saving"
    raise TrainingDivergedError(
        f"step {int(bad_step)}: loss {loss} / gradient norm {grad_norm} is not finite; {where} ({kept}); lower optim.lr (now {opt.lr}){clip}"
    )


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
        run = _prepare_run(config, mode, ddp, device)
        # Claimed once the inputs have been read (their errors come first), before anything is written;
        # held until the run returns.
        held.enter_context(owned_output_dir(config, ddp, protected))
        _build_model(run)
        position, resumed_from = _resume(run, resume)
        run.strategy.check_model(run)
        if ddp.world > 1:
            run.train_model = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
        return _train_and_save(run, position, resumed_from, stop_at_step, console)


def _prepare_run(config: TrainConfig, mode: str, ddp: Dist, device: torch.device) -> RunContext:
    """Everything that reads inputs (and may refuse them) before the output folder is claimed."""
    if device.type == "cpu":
        set_cpu_threads(config.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    seed_everything(config.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    strategy = STRATEGIES[mode](config)
    split_files(config.data.split_dir, "train")  # a missing split fails now, not after a GGUF conversion
    tokenizer = load_tokenizer(config.model)
    set_chat_template(tokenizer, config.data.chat_template)
    splits = strategy.load(tokenizer, planner_overflow(config.data.overflow))
    if splits is None:
        raise DataError(f"{config.data.split_dir}: the train split has no {mode} rows")
    if splits.train_plan.num_rows == 0:
        raise DataError(f"{config.data.split_dir}: nothing to train on after packing")
    resolve_batch_and_steps(config.optim, splits.train_plan, ddp.world)
    warn = _warn if ddp.main else (lambda message: None)
    replayed = splits.train_data.replay or {}
    if "fraction_reached" in replayed:
        warn(f"{config.data.replay.split_dir}: data.replay.fraction={config.data.replay.fraction} needs "
             f"{round(replayed['new_rows'] * config.data.replay.fraction / (1 - config.data.replay.fraction))} rows but its "
             f"train split has {replayed['previous_rows']}: replayed rows are {replayed['fraction_reached']:.1%} of the "
             "train split (set data.replay.upsample: true to repeat rows up to the fraction)")  # fmt: skip
    data_stats = {"train": _target_stats(config, strategy, "train", splits.train_data, splits.train_plan, warn)}
    if splits.val_plan is not None:
        data_stats["validation"] = _target_stats(config, strategy, "validation", splits.val_data, splits.val_plan, warn)
        if data_stats["validation"]["target_tokens_left"] == 0 or splits.val_plan.num_rows == 0:
            splits.val_plan = None  # a loss over no targets is NaN: no validation rather than a meaningless one
    lineage = None
    if config.init_adapter:  # checked before the output folder is claimed: a mismatch writes nothing
        from train.continual import check_init_adapter, init_adapter_lineage

        check_init_adapter(config.init_adapter, config)
        lineage = init_adapter_lineage(config.init_adapter)
    return RunContext(
        config, strategy, ddp, device, Path(config.output_dir), pick_precision(config.optim.precision, device), tokenizer,
        tokenizer.pad_token_id, splits, data_stats, lineage, run_fingerprint(config, mode, ddp.world),
    )  # fmt: skip


def _build_model(run: RunContext) -> None:
    """Base + LoRA (seeded init), the optimizer and the schedule."""
    config, opt = run.config, run.config.optim
    model = load_base_model(config.model).to(run.device)
    model = add_lora(model, config.lora, config.seed)
    if config.init_adapter:  # weights only: optimizer and schedule start fresh; a resume overwrites them
        from train.continual import load_init_adapter

        load_init_adapter(model, config.init_adapter)
    if opt.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    run.model = run.train_model = model
    run.params = [p for p in model.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(run.params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lr_lambda(opt.schedule, opt.warmup_steps, opt.max_steps, opt.min_lr_ratio))


def _resume(run: RunContext, resume: str) -> tuple[Position, int | None]:
    """The position to start from, restoring weights, optimizer, scheduler and RNG from a checkpoint."""
    ddp, out = run.ddp, run.out
    warn = _warn if ddp.main else (lambda message: None)
    if resume == "never":
        if ddp.main:
            remove_recorded(out, "checkpoints")
        ddp.barrier()
        return Position(), None
    if resume == "auto":
        # The main process sets damaged checkpoints aside first, so every process then finds the same one.
        checkpoint = latest_usable_checkpoint(out, warn) if ddp.main else None
        ddp.barrier()
        if not ddp.main:
            checkpoint = latest_usable_checkpoint(out, warn, set_aside=False)
        if checkpoint is None:
            return Position(), None
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise CheckpointError(f"{checkpoint}: checkpoint folder not found")
    state = load_checkpoint(checkpoint, run.model, run.fingerprint)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        position = Position.from_state(state)
        set_rng_states(state["rng"][ddp.rank] if isinstance(state["rng"], list) else state["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
        # Only a hand-edited state.json gets here (the manifest matched): say so, never a traceback.
        raise CheckpointError(f"{checkpoint}: state.json does not fit this run ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
    return position, position.step


def _save_checkpoint(run: RunContext, position: Position, started: float) -> None:
    _require_finite_weights(run.params, position.step)
    state = {
        "fingerprint": run.fingerprint, "step": position.step, "epoch": position.epoch, "cursor": position.cursor,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "best_val": position.best_val, "bad_evals": position.bad_evals, "tokens_seen": position.tokens_seen,
        "elapsed": position.elapsed + (time.perf_counter() - started),
    }  # fmt: skip
    if run.ddp.world > 1:
        rngs = [None] * run.ddp.world
        dist.all_gather_object(rngs, rng_states())
        state["rng"] = rngs
    else:
        state["rng"] = rng_states()
    if run.ddp.main:
        save_checkpoint(run.out, position.step, run.model, state, run.config.checkpoint.keep)
    run.ddp.barrier()


@dataclass
class _Outputs:
    """Where a run's records go: metrics.jsonl, the trackers, the returned history, the progress bar."""

    metrics: MetricsLog
    tracker: Tracker
    progress: _Progress
    history: list[dict] = field(default_factory=list)

    def write(self, step: int, record: dict) -> None:
        self.metrics.write(record)
        self.tracker.log(record, step)
        self.history.append(record)


def _train_and_save(run: RunContext, position: Position, resumed_from: int | None, stop_at_step: int | None, console) -> TrainResult:
    config, ddp, out = run.config, run.ddp, run.out
    if ddp.main and resumed_from is None:
        for tracker_folder in ("tensorboard", "trackio"):  # a fresh run's curves never mix with an old run's
            remove_recorded(out, tracker_folder)
    outputs = _Outputs(
        MetricsLog(out / "metrics.jsonl", ddp.main, resumed_from if resumed_from is not None else 0),
        Tracker(config.report_to if ddp.main else [], out, resumed_from),
        _Progress(ddp.main and config.progress, config.optim.max_steps, position.step, console, run.strategy.mode),
    )
    if ddp.main:
        record = {"mode": run.strategy.mode, **config.model_dump(), "data_stats": run.data_stats,
                  "init_adapter_lineage": run.lineage, "replay": run.splits.train_data.replay}  # fmt: skip
        (out / "train_config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    started = time.perf_counter()
    with outputs.progress:
        stopped_early, last_eval, last_ckpt_step = _run_steps(run, position, stop_at_step, outputs, started, resumed_from)
    if last_ckpt_step != position.step:
        _save_checkpoint(run, position, started)
    finished = position.step >= config.optim.max_steps or stopped_early
    final = _save_adapter(run, position.step, last_eval, outputs) if finished else {}
    outputs.tracker.close()
    ddp.barrier()
    if ddp.world > 1:
        dist.destroy_process_group()
    history = outputs.history
    return TrainResult(out, out / "adapter", position.step, history, final, stopped_early, resumed_from, run.data_stats)


def _run_steps(run: RunContext, position: Position, stop_at_step: int | None, outputs: _Outputs, started: float, resumed_from: int | None):
    """Optimizer steps until max_steps, `stop_at_step` or early stopping, with eval and checkpoints."""
    config, opt = run.config, run.config.optim
    plan = run.splits.train_plan
    targets_per_row = run.strategy.prepare(run.splits, run.device)  # target tokens (SFT) or pairs (DPO)
    tokens_per_row = np.zeros(plan.num_rows, np.int64)
    np.add.at(tokens_per_row, plan.row, plan.length)
    window = LogWindow(run.strategy.sum_names, run.device)
    stopped_early, last_eval, last_ckpt_step = False, (-1, {}), resumed_from
    while position.step < opt.max_steps:
        step = position.step + 1
        is_last = step >= opt.max_steps or step == stop_at_step
        checkpoint_due = bool(config.checkpoint.every and step % config.checkpoint.every == 0) or is_last
        log_now = step % config.log_every == 0 or checkpoint_due
        began = time.perf_counter()
        lr, read = _optimizer_step(run, position, window, targets_per_row, tokens_per_row, log_now, last_ckpt_step)
        window.seconds += time.perf_counter() - began
        if read is not None:
            _log_window(run, position, window, read, lr, outputs)
        else:
            outputs.progress.advance(position.step)
        if (config.eval.every and step % config.eval.every == 0) or (is_last and step >= opt.max_steps):
            last_eval = (step, _evaluate(run, position, outputs))
            stopped_early = bool(config.eval.early_stopping_patience and position.bad_evals >= config.eval.early_stopping_patience)
        if checkpoint_due or stopped_early:
            if window.steps:  # an early stop between logging steps: the device is read before the save
                _log_window(run, position, window, window.read(run.ddp), lr, outputs, last_ckpt_step)
            _save_checkpoint(run, position, started)
            last_ckpt_step = step
        if stopped_early or step == stop_at_step:
            break
    return stopped_early, last_eval, last_ckpt_step


def _optimizer_step(run: RunContext, position: Position, window: LogWindow, targets_per_row, tokens_per_row, log_now: bool, last_ckpt_step):
    """grad_accum micro-batches, clip, update. Nothing is read from the device unless `log_now`: then the
    window is read (returned) and checked before the update, so a non-finite step never reaches the weights."""
    opt, ddp = run.config.optim, run.ddp
    rows_per_step = opt.batch_rows * opt.grad_accum * ddp.world
    step_rows, position.epoch, position.cursor = rows_for_step(run.splits.train_plan.num_rows, rows_per_step, run.config.seed, position.epoch, position.cursor)
    denominator = int(targets_per_row[step_rows].sum())  # over every micro-batch and process
    # DDP averages gradients over processes; scaling by world makes the result the global sum divided
    # by the global target count, so each target weighs the same wherever it landed.
    scale = ddp.world / max(1, denominator)
    sums = {name: torch.zeros((), dtype=torch.float64, device=run.device) for name in run.strategy.sum_names}
    for micro in range(opt.grad_accum):
        first = (micro * ddp.world + ddp.rank) * opt.batch_rows
        rows = step_rows[first : first + opt.batch_rows]
        sync = nullcontext() if micro == opt.grad_accum - 1 or ddp.world == 1 else run.train_model.no_sync()
        with sync:
            parts = run.strategy.micro_step(run, rows, scale)
        for name, value in parts.items():
            sums[name] += value.double()
    window.add(position.step + 1, sums, denominator, _grad_norm(run.params, opt.max_grad_norm), int(tokens_per_row[step_rows].sum()))
    read = window.read(ddp) if log_now else None
    if read is not None:
        _stop_if_not_finite(read, position.step + 1, False, last_ckpt_step, opt)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    position.step += 1
    position.tokens_seen += int(tokens_per_row[step_rows].sum())
    return lr, read


def _log_window(run: RunContext, position: Position, window: LogWindow, read: dict, lr: float, outputs: _Outputs, last_ckpt_step=None) -> None:
    _stop_if_not_finite(read, position.step, True, last_ckpt_step, run.config.optim)  # a no-op when checked before the update
    seconds = window.seconds
    means = {name: value / window.steps for name, value in read["means"].items()}
    record = {"step": position.step, "epoch": position.epoch, **run.strategy.log_fields(means), "lr": lr,
              "tokens": window.tokens, "tokens_per_s": window.tokens / seconds if seconds > 0 else None}  # fmt: skip
    if run.config.optim.max_grad_norm is not None:
        record["grad_norm"] = read["grad_norm"]  # the last step's, as TRL logs it
    outputs.write(position.step, record)
    outputs.progress.update(position.step, record)
    window.reset()


def _evaluate(run: RunContext, position: Position, outputs: _Outputs) -> dict:
    """Validation now; updates the early-stopping counters."""
    if run.splits.val_plan is None:
        return {}
    result = run.strategy.evaluate(run)
    if result:
        outputs.write(position.step, {"step": position.step, **result})
        outputs.progress.note(position.step, result)
        if result["val_loss"] < position.best_val - run.config.eval.early_stopping_min_delta:
            position.best_val, position.bad_evals = result["val_loss"], 0
        else:
            position.bad_evals += 1
    return result


def _save_adapter(run: RunContext, step: int, last_eval: tuple[int, dict], outputs: _Outputs) -> dict:
    """The finished adapter (atomically), the base-vs-adapter comparison, the model card and the plot."""
    _require_finite_weights(run.params, step)
    if not run.ddp.main:
        return {}
    config, out, mode = run.config, run.out, run.strategy.mode
    adapter_dir, tmp = out / "adapter", out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Named by its real id, never this machine's GGUF cache folder: the adapter loads anywhere.
    run.model.peft_config["default"].base_model_name_or_path = base_model_id(config.model)
    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    (tmp / "train_mode.txt").write_text(mode + "\n")
    remove_recorded(out, "adapter")  # ours: recorded in output_dir's marker (a link is unlinked, not followed)
    os.replace(tmp, adapter_dir)
    final: dict = {}
    if config.eval.at_end and run.splits.val_plan is not None:
        final = run.strategy.final_eval(run, last_eval, step)
        outputs.metrics.write({"step": step, "final": final, "data_stats": run.data_stats})
        outputs.tracker.log_final(final, step)
    write_model_card(adapter_dir, config, mode, step, run.data_stats, final, run.lineage)
    try:
        from train.plot import plot_losses

        plot_losses(out / "metrics.jsonl", out / "loss.png")
    except Exception:  # noqa: BLE001 - a missing plot never fails a finished training run
        pass
    return final


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

    def advance(self, step: int):
        if self.enabled:
            self.progress.update(self.task, completed=step)

    def update(self, step: int, record: dict):
        if self.enabled:
            tps = record.get("tokens_per_s")
            self.progress.update(self.task, completed=step, loss=f"{record['loss']:.4f}", tps=f"{tps:,.0f}" if tps else "-")

    def note(self, step: int, result: dict):
        if self.enabled:
            text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            self.progress.console.print(f"step {step}: {text}")
