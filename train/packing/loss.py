"""Token-level loss sums, so the trainer can normalize by the targets of a whole optimizer step."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .attention import packed_forward

IGNORE_INDEX = -100
# Rows of logits turned into log-probabilities at a time: bounds the float32 copy of a bf16 head's
# output and the softmax buffer (4,096 x a 152k vocab = 2.4 GB in float32 otherwise for long batches).
CE_CHUNK = 4096


def packed_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(loss_sum, n_targets)`: summed next-token cross-entropy and the number of target tokens.

    labels use the HuggingFace unshifted convention (labels[t] is the token at t, -100 where not a
    target); the shift happens here. Both results are device tensors (no host sync). With gradient
    accumulation, divide each micro-batch's loss_sum by the step's total target count (e.g. the sum of
    `PackPlan.target_counts` over the step's micro-batches) before backward, so every target token
    weighs the same whatever micro-batch it fell in.
    """
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean `[rows, width]`: the positions whose next token is a target (the only logits a loss needs)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any DDP/peft wrapping takes transformers' `logits_to_keep` argument."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(type(inner).forward).parameters
    except (TypeError, ValueError):
        return False


def _chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        # A micro-batch without targets: a zero that still reaches every LoRA weight, so backward and
        # DDP's gradient all-reduce behave as with targets.
        return logits.float().sum()
    if logits.shape[0] <= CE_CHUNK:  # one piece: no split, whose backward would add a copy of the logits' grad
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    pieces = zip(logits.split(CE_CHUNK), targets.split(CE_CHUNK))
    return torch.stack([F.cross_entropy(chunk.float(), target, reduction="sum") for chunk, target in pieces]).sum()


def packed_lm_loss(model, inputs: dict, labels: torch.Tensor, targets_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward + summed next-token cross-entropy: `(loss_sum, n_targets)`, device tensors.

    With assistant-only targets most positions predict nothing we score, and on a small model the
    vocabulary head over every position (49k x hidden per token for SmolLM2-135M) plus its softmax is the
    largest single cost of a step. So the model's own `logits_to_keep` (a boolean mask: transformers
    gathers those hidden states before `lm_head`) projects only the positions that predict a target;
    the loss is the same sum as `packed_causal_lm_loss` over full logits. Models whose forward lacks the
    argument (and `targets_only=False`) take the full-head path.
    """
    if not targets_only or not accepts_logits_to_keep(model):
        logits = packed_forward(model, **inputs).logits
        return packed_causal_lm_loss(logits, labels)
    keep = predicting_positions(labels)
    logits = packed_forward(model, **inputs, logits_to_keep=keep).logits  # [n_targets, vocab]
    targets = labels[:, 1:][keep[:, :-1]]
    return _chunked_cross_entropy_sum(logits, targets), targets.new_tensor(targets.shape[0])
