"""Guard rails that keep packed samples from attending to each other, and the start-of-training canary.

transformers 5.x (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask from
position_ids that restart at 0 — but only when the 2-D attention_mask is None and there is no KV cache.
An all-ones 2-D mask or a cache silently turns the row back into one long sequence, so both are errors.
"""

from __future__ import annotations

import torch


class PackedAttentionError(RuntimeError):
    """Packed rows would let samples attend to each other (or the canary saw it happen)."""


def check_packed_forward_kwargs(kwargs: dict) -> dict:
    """Raise PackedAttentionError unless `kwargs` keep packed samples isolated; returns `kwargs`.

    Rejected: a 2-D attention_mask (even all ones), use_cache other than an explicit False (HF defaults it
    to config.use_cache=True), a past_key_values/cache object, and missing position_ids. A 4-D mask
    (packed DPO) and attention_mask=None are accepted.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None and getattr(mask, "ndim", 4) == 2:
        raise PackedAttentionError(
            "packed rows with a 2-D attention_mask: transformers then ignores the restarting position_ids and "
            "samples attend to each other; pass attention_mask=None"
        )
    if kwargs.get("use_cache") is not False:
        # Missing counts too: HF models default to config.use_cache (True), build a DynamicCache, and the
        # cache switches packed-sequence detection off — samples then attend to each other.
        raise PackedAttentionError(
            f"packed rows with use_cache={kwargs.get('use_cache')!r}: pass use_cache=False explicitly"
        )
    for key in ("past_key_values", "cache"):
        if kwargs.get(key) is not None:
            raise PackedAttentionError(f"packed rows with {key}: a KV cache disables packed-sequence masking")
    if kwargs.get("position_ids") is None and (mask is None or getattr(mask, "ndim", 4) != 4):
        raise PackedAttentionError("packed rows need position_ids that restart at 0 for every sample")
    return kwargs


def packed_forward(model, **kwargs):
    """`model(**kwargs)` after `check_packed_forward_kwargs`, with use_cache forced off."""
    kwargs.setdefault("use_cache", False)
    kwargs.setdefault("attention_mask", None)
    return model(**check_packed_forward_kwargs(kwargs))


def _attn_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


@torch.no_grad()
def packing_canary(model, lengths=(5, 3, 7), vocab_size: int | None = None, rtol: float | None = None, seed: int = 0):
    """Check once, at training start, that a packed forward equals separate forwards.

    Packs `lengths` random sequences into one row (plus one pad token), runs the model packed (mask None,
    restarting position_ids, no cache) and each sequence alone, and raises PackedAttentionError if any
    sample's logits differ by more than `rtol` relative to the logit scale. Returns the relative error.
    Runs in eval mode (dropout off) and restores the previous mode.
    """
    params = next(model.parameters())
    device, dtype = params.device, params.dtype
    if rtol is None:
        rtol = 1e-4 if dtype == torch.float32 else 3e-2
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    ids = torch.cat(seqs + [torch.zeros(1, dtype=torch.long)])[None].to(device)
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(1, dtype=torch.long)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        packed = model(**check_packed_forward_kwargs(
            dict(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False)
        )).logits[0].float()  # fmt: skip
        worst, start = 0.0, 0
        for s in seqs:
            alone = model(input_ids=s[None].to(device), use_cache=False).logits[0].float()
            got = packed[start : start + s.shape[0]]
            err = ((got - alone).abs().max() / alone.abs().max().clamp(min=1e-6)).item()
            worst = max(worst, err)
            start += s.shape[0]
    finally:
        model.train(was_training)
    if not worst <= rtol:
        raise PackedAttentionError(
            f"packing canary failed for attn_implementation={_attn_implementation(model)!r}: packed logits "
            f"differ from separate forwards by {worst:.3g} (relative, limit {rtol:g}); samples leak across "
            "segment boundaries"
        )
    return worst
