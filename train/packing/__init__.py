"""Sequence packing for training: planner (host), packing kernel (Triton + torch oracle), attention
guard rails, packed loss, and packed DPO.

Typical SFT use::

    plan = plan_packing(lengths, max_seq_len=2048)
    prepare_packed_model(model)                 # once, at training start: per-sample attention, fused head, canaries
    for rows in plan.batches(rows_per_batch):
        batch = pack_batch(tokens, target_mask, sample_offsets, rows, pad_id=tok.pad_token_id)
        loss_sum, n = packed_lm_loss(model, batch.model_inputs(model.config._attn_implementation), batch.labels)
"""

from .attention import (
    PACKED_SDPA, PackedAttentionError, check_packed_forward_kwargs, packed_forward, packing_canary, prepare_packed_attention, use_packed_sdpa,
)
from .dpo import (
    DpoPackPlan,
    PackedDpoBatch,
    dpo_block_attention_mask,
    dpo_mask_mod,
    pack_dpo_batch,
    packed_dpo_logps,
    plan_dpo_packing,
)
from .kernel import IGNORE_INDEX, PackedBatch, pack_batch, pack_batch_reference, triton_available, without_padding
from .loss import linear_cross_entropy_sum, packed_causal_lm_loss, packed_lm_loss, prepare_packed_model, use_fused_head_loss
from .planner import PackingError, PackPlan, best_fit_decreasing, first_fit_python, plan_packing

__all__ = [
    "IGNORE_INDEX",
    "PACKED_SDPA",
    "DpoPackPlan",
    "PackPlan",
    "PackedAttentionError",
    "PackedBatch",
    "PackedDpoBatch",
    "PackingError",
    "best_fit_decreasing",
    "check_packed_forward_kwargs",
    "dpo_block_attention_mask",
    "dpo_mask_mod",
    "first_fit_python",
    "linear_cross_entropy_sum",
    "pack_batch",
    "pack_batch_reference",
    "pack_dpo_batch",
    "packed_causal_lm_loss",
    "packed_lm_loss",
    "packed_dpo_logps",
    "packed_forward",
    "packing_canary",
    "prepare_packed_attention",
    "prepare_packed_model",
    "plan_dpo_packing",
    "plan_packing",
    "triton_available",
    "use_fused_head_loss",
    "use_packed_sdpa",
    "without_padding",
]
