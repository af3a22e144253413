"""What differs between `train sft` and `train dpo`, behind one small interface the loop calls.

A strategy loads and plans its splits, counts what truncation removes, prepares the device buffers and
the per-row target counts a step is normalized by, runs one micro-step (forward, loss SUM, backward) and
returns its sums as named device tensors (never read here), evaluates, and names its log fields. The loop
(train/loop.py) owns everything they share: schedule, accumulation, checkpoint, resume, logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from train.data import dpo_target_stats, load_dpo_split, load_sft_split, sft_target_stats
from train.dpo import batch_dpo_loss, pack_pairs, pair_logps, precompute_reference_logps, reference_logps
from train.evaluate import base_vs_adapter_sft, dpo_metrics, sft_loss
from train.packing import (
    PACKED_SDPA, pack_batch, packed_lm_loss, plan_dpo_packing, plan_packing, prepare_packed_model, without_padding,
)

if TYPE_CHECKING:  # the run context is built by the loop
    from train.loop import RunContext


@dataclass
class Splits:
    train_data: object
    val_data: object | None
    train_plan: object
    val_plan: object | None


class SftStrategy:
    """Next-token loss on target tokens; a step is normalized by its target tokens."""

    mode = "sft"
    sum_names = ("loss",)

    def __init__(self, config):
        self.config = config

    def load(self, tokenizer, overflow) -> Splits | None:
        data, only = self.config.data, self.config.data.completion_only_loss
        train = load_sft_split(tokenizer, data.split_dir, "train", data.max_train_samples, only, data.replay, self.config.seed)
        val = load_sft_split(tokenizer, data.split_dir, "validation", data.max_val_samples, only)
        if train is None:
            return None
        plan = lambda d: plan_packing(d.lengths, data.max_seq_len, overflow)  # noqa: E731
        return Splits(train, val, plan(train), plan(val) if val is not None else None)

    def target_stats(self, data, plan) -> dict:
        return sft_target_stats(data, plan)

    def prepare(self, splits: Splits, device) -> np.ndarray:
        """Device copies of the train tokens; returns each packed row's target tokens (host, no device read)."""
        data = splits.train_data
        self.tokens, self.mask, self.offsets = data.tokens.to(device), data.target_mask.to(device), data.offsets.to(device)
        return splits.train_plan.target_counts(data.target_mask.numpy(), data.offsets.numpy())

    def check_model(self, run: RunContext) -> None:
        prepare_packed_model(run.model)  # attention per packed sample and the fused head loss, checked before any step

    def micro_step(self, run: RunContext, rows, scale: float) -> dict[str, torch.Tensor]:
        batch = pack_batch(self.tokens, self.mask, self.offsets, run.splits.train_plan, rows, pad_id=run.pad_id, pad_to_multiple_of=8)
        attn = run.model.config._attn_implementation
        if attn == PACKED_SDPA:  # rows no longer matter: one row without the padding's compute
            batch = without_padding(batch)
        with run.amp():
            loss_sum, _ = packed_lm_loss(run.train_model, batch.model_inputs(attn), batch.labels)
        (loss_sum * scale).backward()
        return {"loss": loss_sum.detach()}

    def log_fields(self, means: dict[str, float]) -> dict:
        return {"loss": means["loss"]}

    def evaluate(self, run: RunContext) -> dict:
        loss, n = sft_loss(*self._val_args(run))
        return {"val_loss": loss, "val_tokens": n}

    def final_eval(self, run: RunContext, last_eval: tuple[int, dict], step: int) -> dict:
        if last_eval[0] == step and last_eval[1]:
            # The adapter side was just measured at this step; only the base is new.
            with run.model.disable_adapter():
                base, n = sft_loss(*self._val_args(run))
            return {"base_loss": base, "adapter_loss": last_eval[1]["val_loss"], "target_tokens": n}
        return base_vs_adapter_sft(*self._val_args(run))

    @staticmethod
    def _val_args(run: RunContext) -> tuple:
        s = run.splits
        return (run.model, s.val_data, s.val_plan, run.config.optim.batch_rows, run.pad_id, run.device, run.config.eval.max_rows, run.autocast_dtype)


class DpoStrategy:
    """DPO loss per pair against the reference (the adapter disabled); a step is normalized by its pairs."""

    mode = "dpo"
    sum_names = ("loss", "reward_chosen", "reward_rejected", "correct")

    def __init__(self, config):
        self.config = config
        self.ref_table = None

    def load(self, tokenizer, overflow) -> Splits | None:
        data = self.config.data
        train = load_dpo_split(tokenizer, data.split_dir, "train", data.max_train_samples, data.replay, self.config.seed)
        val = load_dpo_split(tokenizer, data.split_dir, "validation", data.max_val_samples)
        if train is None:
            return None
        plan = lambda d: plan_dpo_packing(d.prompt_lens, d.chosen_lens, d.rejected_lens, data.max_seq_len, overflow)  # noqa: E731
        return Splits(train, val, plan(train), plan(val) if val is not None else None)

    def target_stats(self, data, plan) -> dict:
        return dpo_target_stats(data, plan)

    def prepare(self, splits: Splits, device) -> np.ndarray:
        return np.diff(splits.train_plan.row_ptr)  # pairs per packed row

    def check_model(self, run: RunContext) -> None:
        """Reference log-probs once for the whole train split, when asked (before DDP wraps the model)."""
        if self.config.dpo.precompute_ref_logps:
            s, rows = run.splits, run.config.optim.batch_rows
            self.ref_table = precompute_reference_logps(run.model, s.train_data, s.train_plan, rows, run.pad_id, run.device, run.autocast_dtype)

    def micro_step(self, run: RunContext, rows, scale: float) -> dict[str, torch.Tensor]:
        batch = pack_pairs(run.splits.train_data, run.splits.train_plan, rows, run.pad_id, run.device)
        policy_c, policy_r = pair_logps(run.train_model, batch, run.autocast_dtype)
        if self.ref_table is not None:
            ref = torch.from_numpy(self.ref_table[batch.sample]).to(run.device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            ref_c, ref_r = reference_logps(run.model, batch, run.autocast_dtype)
        losses, chosen_r, rejected_r = batch_dpo_loss(self.config.dpo, batch, policy_c, policy_r, ref_c, ref_r)
        (losses.sum() * scale).backward()
        return {"loss": losses.detach().sum(), "reward_chosen": chosen_r.sum(), "reward_rejected": rejected_r.sum(),
                "correct": (chosen_r > rejected_r).sum()}  # fmt: skip

    def log_fields(self, means: dict[str, float]) -> dict:
        chosen, rejected = means["reward_chosen"], means["reward_rejected"]
        return {"loss": means["loss"], "reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": chosen - rejected, "reward_accuracy": means["correct"]}  # fmt: skip

    def evaluate(self, run: RunContext) -> dict:
        s, c = run.splits, run.config
        return dpo_metrics(run.model, s.val_data, s.val_plan, c.optim.batch_rows, run.pad_id, run.device, c.dpo, c.eval.max_rows, run.autocast_dtype)

    def final_eval(self, run: RunContext, last_eval: tuple[int, dict], step: int) -> dict:
        return self.evaluate(run)


STRATEGIES = {"sft": SftStrategy, "dpo": DpoStrategy}
