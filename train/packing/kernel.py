"""Write packed rows from a flat token buffer and a plan: one function, two implementations.

`pack_batch_reference` (pure torch, the CPU path and the test oracle) and the Triton kernel take the
same arguments and must produce identical tensors. Both work from a "segment table": int64
`[8, num_segments]` with rows (row, col, sample, src_offset, length, pos_start, loss_start, seg_val),
built on the host from the plan and copied to the device in one transfer. Padding tails are segments
with sample == -1, so every output position is written exactly once and nothing waits on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .attention import PACKED_SDPA
from .planner import PackPlan, PackingError

IGNORE_INDEX = -100
META_ROWS = 8
BLOCK = 1024


@dataclass
class PackedBatch:
    """Packed rows for one micro-batch.

    input_ids, labels, position_ids: int64 `[rows, width]`; segment_ids: int32 `[rows, width]`,
    1-based index of the segment inside its row, 0 on padding. labels follow the HuggingFace unshifted
    convention (the model shifts): -100 on the first token of every segment, on padding and on
    non-target tokens. `cu_seqlens` (int32, device) is global over the flattened `[rows * width]` tokens,
    padding tails being pseudo-sequences; `max_seqlen` is a host int. `num_target_tokens` is a 0-d device
    tensor (no sync); `num_target_tokens_host` is filled when the caller gave host target counts.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_target_tokens: torch.Tensor
    num_tokens: int  # non-pad tokens, host
    num_target_tokens_host: int | None = None
    segments: tuple = ()  # per row, the (start, stop) columns of its samples: host ints for per-segment attention

    def model_inputs(self, attn_implementation: str | None = None) -> dict:
        """kwargs for a HF causal LM forward that keep packed samples isolated.

        attention_mask is None and use_cache False, so transformers derives a block-diagonal causal mask
        from the restarting position_ids (sdpa, eager, flex). For flash-attention, cu_seqlens are passed
        so transformers neither infers them from position_ids nor syncs with the host.
        """
        kwargs = dict(
            input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=None, use_cache=False
        )
        if attn_implementation == PACKED_SDPA:
            kwargs["packed_segments"] = self.segments
        if attn_implementation and "flash" in attn_implementation:
            kwargs.update(
                cu_seq_lens_q=self.cu_seqlens,
                cu_seq_lens_k=self.cu_seqlens,
                max_length_q=self.max_seqlen,
                max_length_k=self.max_seqlen,
            )
        return kwargs


def without_padding(batch: PackedBatch) -> PackedBatch:
    """The same samples as ONE row holding only their tokens (no padding tails), for per-segment
    attention (`PACKED_SDPA`), where rows no longer matter: every layer then skips the padding's
    compute. Labels stay aligned (the first token of every sample is never a target, so no target
    crosses a sample boundary); the gather index is built on the host, nothing waits on the device."""
    width = batch.input_ids.shape[1]
    pieces = [np.arange(r * width + start, r * width + stop) for r, bounds in enumerate(batch.segments) for start, stop in bounds]
    index_host = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    lengths = [stop - start for bounds in batch.segments for start, stop in bounds]
    ends = np.cumsum(lengths).tolist()
    index = _to_device(index_host, batch.input_ids.device)
    flat = lambda t: t.reshape(-1)[index][None]  # noqa: E731
    return PackedBatch(
        input_ids=flat(batch.input_ids), labels=flat(batch.labels), position_ids=flat(batch.position_ids),
        segment_ids=_to_device(np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)[None], batch.input_ids.device), cu_seqlens=_to_device(np.array([0, *ends], np.int32), batch.input_ids.device),
        max_seqlen=max(lengths, default=0), num_target_tokens=batch.num_target_tokens, num_tokens=batch.num_tokens,
        num_target_tokens_host=batch.num_target_tokens_host, segments=(tuple(zip([0, *ends[:-1]], ends)),),
    )  # fmt: skip


def segment_table(plan: PackPlan, width: int) -> np.ndarray:
    """Host int64 `[8, segments + padding tails]`, sorted by destination."""
    n = plan.num_segments
    fill = np.zeros(plan.num_rows, np.int64)
    np.add.at(fill, plan.row, plan.length)
    if fill.size and fill.max() > width:
        raise PackingError(f"width {width} is smaller than the fullest row ({int(fill.max())} tokens)")
    pad_rows = np.flatnonzero(fill < width)
    m = pad_rows.shape[0]
    meta = np.empty((META_ROWS, n + m), np.int64)
    meta[0, :n], meta[0, n:] = plan.row, pad_rows
    meta[1, :n], meta[1, n:] = plan.col, fill[pad_rows]
    meta[2, :n], meta[2, n:] = plan.sample, -1
    meta[3, :n], meta[3, n:] = plan.src_offset, 0
    meta[4, :n], meta[4, n:] = plan.length, width - fill[pad_rows]
    meta[5, :n], meta[5, n:] = getattr(plan, "pos_start", 0), 0
    meta[6, :n], meta[6, n:] = np.maximum(plan.loss_start, 1), width  # padding is never a label
    counts = np.diff(plan.row_ptr)
    seg_val = np.arange(n, dtype=np.int64) - np.repeat(plan.row_ptr[:-1], counts) + 1
    meta[7, :n], meta[7, n:] = getattr(plan, "seg_val", seg_val), 0
    order = np.argsort(meta[0] * (width + 1) + meta[1], kind="stable")
    return np.ascontiguousarray(meta[:, order])


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(array)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pack_torch(tokens, target_mask, sample_offsets, meta, num_rows, width, pad_id):
    device = tokens.device
    total = num_rows * width
    row, col, sample, src_offset, length, pos_start, loss_start, seg_val = meta.unbind(0)
    nseg = length.shape[0]
    seg = torch.repeat_interleave(torch.arange(nseg, device=device), length, output_size=total)
    seg_start = torch.cumsum(length, 0) - length
    t = torch.arange(total, device=device) - seg_start[seg]
    real = sample[seg] >= 0
    src = (sample_offsets[sample.clamp(min=0)] + src_offset)[seg] + t
    src = torch.where(real, src, torch.zeros_like(src))
    tok = torch.where(real, tokens[src], torch.full_like(src, pad_id))
    is_label = real & (t >= loss_start[seg])
    if target_mask is not None:
        is_label &= target_mask[src].bool()
    out = row[seg] * width + col[seg] + t
    input_ids = torch.empty(total, dtype=torch.int64, device=device)
    labels = torch.empty_like(input_ids)
    position_ids = torch.empty_like(input_ids)
    segment_ids = torch.empty(total, dtype=torch.int32, device=device)
    input_ids[out] = tok
    labels[out] = torch.where(is_label, tok, torch.full_like(tok, IGNORE_INDEX))
    position_ids[out] = pos_start[seg] + t
    segment_ids[out] = seg_val[seg].to(torch.int32)
    shape = (num_rows, width)
    return input_ids.view(shape), labels.view(shape), position_ids.view(shape), segment_ids.view(shape)


_triton_module = None


def triton_available() -> bool:
    try:
        _load_triton()
        return True
    except ImportError:
        return False


def _load_triton():
    global _triton_module
    if _triton_module is None:
        if not torch.cuda.is_available():
            # No GPU: run the kernel in Triton's interpreter (must be set before triton.jit runs).
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from . import _triton_kernel

        _triton_module = _triton_kernel
    return _triton_module


def _pack_triton(tokens, target_mask, sample_offsets, meta, num_rows, width, pad_id):
    mod = _load_triton()
    if not tokens.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise PackingError(
            "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 before triton is imported); "
            "use impl='torch' for CPU tensors"
        )
    device = tokens.device
    total = num_rows * width
    input_ids = torch.empty(total, dtype=torch.int64, device=device)
    labels = torch.empty_like(input_ids)
    position_ids = torch.empty_like(input_ids)
    segment_ids = torch.empty(total, dtype=torch.int32, device=device)
    nseg = meta.shape[1]
    if nseg and total:
        if sample_offsets.numel() == 0:  # the kernel reads offsets[0] for padding-only rows
            sample_offsets = torch.zeros(1, dtype=torch.int64, device=device)
        has_mask = target_mask is not None
        mask_u8 = target_mask.view(torch.uint8) if has_mask else tokens  # dummy pointer when unused
        # A segment never exceeds the row width; sizing the grid by width needs no device read-back.
        block = min(BLOCK, _next_pow2(width))
        grid = (nseg, -(-width // block))
        mod.pack_kernel[grid](
            tokens, mask_u8, sample_offsets, meta, nseg,
            input_ids, labels, position_ids, segment_ids,
            width, pad_id, HAS_MASK=has_mask, BLOCK=block,
        )  # fmt: skip
    shape = (num_rows, width)
    return input_ids.view(shape), labels.view(shape), position_ids.view(shape), segment_ids.view(shape)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


IMPLEMENTATIONS = {"torch": _pack_torch, "triton": _pack_triton}


def _resolve_width(plan: PackPlan, width: int | None, pad_to_multiple_of: int | None) -> int:
    if width is not None:
        return int(width)
    if pad_to_multiple_of:
        fill = int(plan.row_fill.max()) if plan.num_segments else 0
        return max(pad_to_multiple_of, -(-fill // pad_to_multiple_of) * pad_to_multiple_of)
    return plan.max_seq_len


def pack_batch(
    tokens: torch.Tensor,
    target_mask: torch.Tensor | None,
    sample_offsets: torch.Tensor,
    plan: PackPlan,
    rows=None,
    *,
    pad_id: int = 0,
    impl: str = "auto",
    width: int | None = None,
    pad_to_multiple_of: int | None = None,
    target_counts: np.ndarray | None = None,
) -> PackedBatch:
    """Pack the rows `rows` of `plan` (all rows if None) from the flat device buffer `tokens`.

    tokens: int64, all samples concatenated; target_mask: bool, same length (True where a token is a
    training target) or None (every token from `loss_start` on is a target); sample_offsets: int64 start
    of each sample in `tokens`, indexed by the plan's `sample`. Rows are `width` long (default
    `plan.max_seq_len`; `pad_to_multiple_of` shrinks them to the fullest row rounded up).
    impl: "triton" (the kernel; Triton's interpreter on CPU), "torch" (the oracle) or "auto" (triton on
    CUDA when importable, else torch). `target_counts`: optional host per-row counts from
    `PackPlan.target_counts` to fill `num_target_tokens_host`.
    """
    if rows is not None:
        plan = plan.rows(rows)
    if impl == "auto":
        impl = "triton" if tokens.is_cuda and triton_available() else "torch"
    if impl not in IMPLEMENTATIONS:
        raise PackingError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    _check_inputs(tokens, target_mask, sample_offsets)
    w = _resolve_width(plan, width, pad_to_multiple_of)
    meta_host = segment_table(plan, w)
    meta = _to_device(meta_host, tokens.device)
    ids, labels, pos, segs = IMPLEMENTATIONS[impl](
        tokens, target_mask, sample_offsets, meta, plan.num_rows, w, pad_id
    )
    cu = _to_device(_cu_from_meta(meta_host), tokens.device)
    pieces = meta_host[4]
    return PackedBatch(
        input_ids=ids,
        labels=labels,
        position_ids=pos,
        segment_ids=segs,
        cu_seqlens=cu,
        max_seqlen=int(pieces.max()) if pieces.size else 0,
        num_target_tokens=(labels != IGNORE_INDEX).sum(),
        num_tokens=int(plan.length.sum()),
        num_target_tokens_host=None if target_counts is None else int(np.sum(target_counts)),
        segments=_row_segments(meta_host, plan.num_rows),
    )


def pack_batch_reference(tokens, target_mask, sample_offsets, plan, rows=None, **kwargs) -> PackedBatch:
    """The pure-torch oracle: `pack_batch(..., impl="torch")`."""
    kwargs["impl"] = "torch"
    return pack_batch(tokens, target_mask, sample_offsets, plan, rows, **kwargs)


def _row_segments(meta: np.ndarray, num_rows: int) -> tuple:
    """Per row, the (start, stop) columns of its samples (padding tails left out), from the segment table."""
    real = meta[2] >= 0
    rows, starts, stops = meta[0, real].tolist(), meta[1, real].tolist(), (meta[1, real] + meta[4, real]).tolist()
    per_row: list[list] = [[] for _ in range(num_rows)]
    for row, start, stop in zip(rows, starts, stops):
        per_row[row].append((start, stop))
    return tuple(tuple(bounds) for bounds in per_row)


def _cu_from_meta(meta: np.ndarray) -> np.ndarray:
    # meta is sorted by destination and covers every position, so lengths in order are the pieces.
    return np.concatenate([[0], np.cumsum(meta[4])]).astype(np.int32)


def _check_inputs(tokens, target_mask, sample_offsets):
    if tokens.dtype != torch.int64 or tokens.dim() != 1:
        raise PackingError(f"tokens must be a flat int64 tensor, got {tokens.dtype} {tuple(tokens.shape)}")
    if sample_offsets.dtype != torch.int64 or sample_offsets.device != tokens.device:
        raise PackingError("sample_offsets must be int64 on the same device as tokens")
    if target_mask is not None:
        if target_mask.dtype != torch.bool or target_mask.shape != tokens.shape:
            raise PackingError(
                f"target_mask must be bool with the shape of tokens {tuple(tokens.shape)}, "
                f"got {target_mask.dtype} {tuple(target_mask.shape)}"
            )
        if target_mask.device != tokens.device:
            raise PackingError("target_mask must be on the same device as tokens")
