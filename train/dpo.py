"""DPO pieces used by the loop: the sigmoid loss and packed per-sequence log-probs for policy and reference.

The reference model is the same base with the LoRA adapter switched off (peft's `disable_adapter()`), as
TRL does with peft: no second copy of the weights in memory.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from train.packing import pack_dpo_batch, packed_dpo_logps
from train.packing.dpo import dpo_predicting_positions
from train.packing.loss import accepts_logits_to_keep


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair loss `-log σ(β((π_c − π_r) − (ref_c − ref_r)))` and the implicit rewards β(π − ref)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def pack_pairs(data, plan, rows, pad_id: int, device):
    return pack_dpo_batch(
        data.tokens.to(device),
        data.prompt_offsets.to(device),
        data.chosen_offsets.to(device),
        data.rejected_offsets.to(device),
        plan,
        rows,
        pad_id=pad_id,
    )


def pair_logps(model, batch, autocast_dtype=None):
    """Summed log-probs of chosen and rejected per pair (order `batch.sample`), one packed forward."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    param = next(p for p in model.parameters())
    ctx = torch.autocast(param.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    # Only the positions that score a response token go through the LM head (see packed_lm_loss).
    kept = dpo_predicting_positions(batch) if accepts_logits_to_keep(model) else None
    with ctx:
        inputs = batch.model_inputs(attn, dtype=autocast_dtype or param.dtype)
        logits = model(**inputs, **({"logits_to_keep": kept} if kept is not None else {})).logits
    return packed_dpo_logps(logits, batch, kept)


@torch.no_grad()
def reference_logps(peft_model, batch, autocast_dtype=None):
    """Reference log-probs: the base model = the policy with its adapter disabled, dropout off."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            return pair_logps(peft_model, batch, autocast_dtype)
    finally:
        peft_model.train(was_training)


@torch.no_grad()
def precompute_reference_logps(peft_model, data, plan, rows_per_batch: int, pad_id: int, device, autocast_dtype=None):
    """Reference log-probs for every pair of `data`, indexed by sample: `[num_samples, 2]` float32 numpy
    (NaN for pairs the plan left out)."""
    out = np.full((data.num_samples, 2), np.nan, np.float32)
    for start in range(0, plan.num_rows, rows_per_batch):
        batch = pack_pairs(data, plan, slice(start, start + rows_per_batch), pad_id, device)
        chosen, rejected = reference_logps(peft_model, batch, autocast_dtype)
        out[batch.sample, 0] = chosen.cpu().numpy()
        out[batch.sample, 1] = rejected.cpu().numpy()
    return out
