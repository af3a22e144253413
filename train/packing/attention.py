"""Guard rails that keep packed samples from attending to each other, and the start-of-training canary.

transformers 5.x (masking_utils.find_packed_sequence_indices) builds a block-diagonal causal mask from
position_ids that restart at 0 — but only when the 2-D attention_mask is None and there is no KV cache.
An all-ones 2-D mask or a cache silently turns the row back into one long sequence, so both are errors.

That block-diagonal mask still costs attention over the whole row: sdpa computes every (query, key) pair
of the row and masks most of them away. `PACKED_SDPA` ("sdpa_packed_segments", registered with
transformers' attention interface) runs sdpa on each packed sample alone with `is_causal`, from host
segment bounds the packer already has (`PackedBatch.segments`), so a row of k samples costs about
1/k of the masked row's attention, with half of each segment's pairs skipped by causality. Without
segment bounds (generation, a 4-D DPO mask, plain forwards) it is transformers' sdpa unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed_segments"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, packed_segments=None, **kwargs):
    """transformers attention function: `query` `[rows, heads, width, dim]`, key/value `[rows, kv_heads, width,
    dim]`; `packed_segments[r]` lists the (start, stop) columns of row r's samples (host ints, in order)."""
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, width, dim = query.shape
    gqa = key.shape[1] != heads
    out_rows = []
    for r, bounds in enumerate(packed_segments):
        pieces, filled = [], 0
        for start, stop in bounds:
            q, k, v = query[r : r + 1, :, start:stop], key[r : r + 1, :, start:stop], value[r : r + 1, :, start:stop]
            pieces.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa))
            filled = stop
        if filled < width:  # the padding tail: no loss reads it, and no sample attends to it
            pieces.append(query.new_zeros(1, heads, width - filled, value.shape[-1]))
        out_rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(out_rows, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the fallback path masks exactly as sdpa does


def use_packed_sdpa(model) -> bool:
    """Switch a model running transformers' sdpa to `PACKED_SDPA` (others, e.g. flash-attention, keep
    theirs); returns whether it now runs it. Call `packing_canary` after (`prepare_packed_attention`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) == "sdpa":
        inner.set_attn_implementation(PACKED_SDPA)
    return inner.config._attn_implementation == PACKED_SDPA


def prepare_packed_attention(model) -> bool:
    """Before a model sees packed rows (training, and evaluation that must measure what training did):
    attention per packed sample where it runs sdpa, then the canary (packed samples must not see each
    other). Returns whether it runs `PACKED_SDPA`."""
    packed = use_packed_sdpa(model)
    packing_canary(model)
    return packed


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
    inputs = dict(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False)
    if _attn_implementation(model) == PACKED_SDPA:  # the path training takes: per-segment attention
        ends = torch.tensor(lengths).cumsum(0).tolist()
        inputs["packed_segments"] = (tuple(zip([0, *ends[:-1]], ends)),)
    was_training = model.training
    model.eval()
    try:
        packed = model(**check_packed_forward_kwargs(inputs)).logits[0].float()
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
