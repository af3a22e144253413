"""DPO pieces used by the loop: the losses (sigmoid, ipo, hinge, robust) and packed per-sequence log-probs for policy and reference.

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


def dpo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None,
):  # fmt: skip
    """Per-pair DPO loss and the implicit rewards β(π − ref), on summed response log-probs.

    With h = (π_c − ref_c) − (π_r − ref_r) and ε = label_smoothing (the formulas of TRL's DPOTrainer):
      sigmoid  −(1−ε)·log σ(βh) − ε·log σ(−βh)                  (ε > 0: conservative DPO)
      robust   (−(1−ε)·log σ(βh) + ε·log σ(−βh)) / (1 − 2ε)     (unbiased under flipped labels)
      hinge    relu(1 − βh)                                      (RSO / SLiC)
      ipo      (h̄ − 1/(2β))², h̄ from log-probs averaged over each response's scored tokens
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs the scored token count of each response")
        mean_h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (mean_h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Per-pair loss `-log σ(β((π_c − π_r) − (ref_c − ref_r)))` and the implicit rewards β(π − ref)."""
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def batch_dpo_loss(settings, batch, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """`dpo_loss` with the run's `dpo` config section on one packed batch (IPO's token counts from it)."""
    counts = response_token_counts(batch).to(policy_chosen.dtype)
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, settings.beta, settings.loss_type,
        settings.label_smoothing, counts[:, 0], counts[:, 1],
    )  # fmt: skip


def response_token_counts(batch) -> torch.Tensor:
    """`[pairs, 2]`: how many tokens of the chosen and rejected response were scored (after truncation)."""
    return torch.bincount(batch.logp_seq, minlength=2 * batch.num_pairs).view(-1, 2)


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
