"""Token-level loss sums, so the trainer can normalize by the targets of a whole optimizer step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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
