"""Packed DPO: several `[prompt | chosen | rejected]` triples per row, one forward for both responses.

Chosen and rejected share one copy of the prompt. Position ids alone cannot express that (rejected must
see the prompt but not chosen, and continues the prompt's positions), so the attention mask is 4-D:
query q may attend key k iff k <= q, both are in the same triple, and k is in the prompt or in q's own
branch. Log-probs are gathered per response token from the logits of the token that precedes it in its
own sequence: for the first rejected token that is the prompt's last token, not chosen's last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .kernel import IMPLEMENTATIONS, _check_inputs, _to_device, segment_table, triton_available
from .planner import PackingError, _bfd, _ranges

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass(frozen=True)
class DpoPackPlan:
    """Placement of DPO triples. Per-triple arrays sorted by (row, col):
    row, col, sample, prompt_skip (prompt tokens cut from the left), prompt_len, chosen_len,
    rejected_len (after truncation); `row_ptr` is CSR into them. Triples longer than a row are truncated
    or rejected and counted; all-empty triples are counted in `num_empty`. Truncation keeps the prompt's end
    (at most half the row if responses need room) and shortens the longer response first."""

    max_seq_len: int
    row: np.ndarray
    col: np.ndarray
    sample: np.ndarray
    prompt_skip: np.ndarray
    prompt_len: np.ndarray
    chosen_len: np.ndarray
    rejected_len: np.ndarray
    row_ptr: np.ndarray
    num_samples: int
    num_truncated: int = 0
    num_rejected: int = 0
    rejected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    num_empty: int = 0
    empty: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_rows(self) -> int:
        return int(self.row_ptr.shape[0] - 1)

    @property
    def length(self) -> np.ndarray:
        return self.prompt_len + self.chosen_len + self.rejected_len

    @property
    def efficiency(self) -> float:
        return float(self.length.sum()) / max(1, self.num_rows * self.max_seq_len)

    def rows(self, rows) -> "DpoPackPlan":
        idx = np.arange(self.num_rows)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        counts = self.row_ptr[idx + 1] - self.row_ptr[idx]
        u = _ranges(self.row_ptr[idx], counts)
        return DpoPackPlan(
            max_seq_len=self.max_seq_len,
            row=np.repeat(np.arange(idx.shape[0], dtype=np.int64), counts),
            col=self.col[u], sample=self.sample[u], prompt_skip=self.prompt_skip[u],
            prompt_len=self.prompt_len[u], chosen_len=self.chosen_len[u], rejected_len=self.rejected_len[u],
            row_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            num_samples=self.num_samples,
        )  # fmt: skip

    def batches(self, rows_per_batch: int):
        for start in range(0, self.num_rows, rows_per_batch):
            yield self.rows(slice(start, start + rows_per_batch))


def _truncate_triples(p, c, r, max_seq_len):
    total = p + c + r
    over = total > max_seq_len
    half = max_seq_len // 2
    p2 = np.where(over & (p > half), np.minimum(p, np.maximum(half, max_seq_len - c - r)), p)
    budget = max_seq_len - p2
    lo, hi = np.minimum(c, r), np.maximum(c, r)
    fits = lo + hi <= budget
    lo2 = np.where(fits, lo, np.minimum(lo, budget // 2))
    hi2 = np.where(fits, hi, np.minimum(hi, budget - lo2))
    c2 = np.where(c <= r, lo2, hi2)
    r2 = np.where(c <= r, hi2, lo2)
    return p2, c2, r2, over


def plan_dpo_packing(prompt_lens, chosen_lens, rejected_lens, max_seq_len: int, overflow: str = "truncate"):
    """Best-fit-decreasing packing of DPO triples (prompt + chosen + rejected tokens) into rows."""
    if overflow not in ("truncate", "reject"):
        raise PackingError(f"overflow must be 'truncate' or 'reject', got {overflow!r}")
    p, c, r = (np.asarray(x, np.int64) for x in (prompt_lens, chosen_lens, rejected_lens))
    if not (p.shape == c.shape == r.shape) or p.ndim != 1:
        raise PackingError("prompt_lens, chosen_lens and rejected_lens must be 1-D and the same length")
    if p.size and min(p.min(), c.min(), r.min()) < 0:
        raise PackingError("DPO lengths must be >= 0")
    if max_seq_len < 3:
        raise PackingError(f"max_seq_len must be >= 3 for DPO, got {max_seq_len}")
    over = p + c + r > max_seq_len
    if overflow == "reject":
        keep = ~over & (p + c + r > 0)
        p2, c2, r2 = p, c, r
        num_truncated = 0
    else:
        p2, c2, r2, _ = _truncate_triples(p, c, r, max_seq_len)
        keep = p + c + r > 0
        num_truncated = int(over.sum())
    kept = np.flatnonzero(keep)
    sizes = (p2 + c2 + r2)[kept]
    order, bin_sorted, num_bins = _bfd(sizes, max_seq_len)
    by_row = np.argsort(bin_sorted, kind="stable")
    order = order[by_row]
    row, sizes, sample = bin_sorted[by_row], sizes[order], kept[order]
    counts = np.bincount(row, minlength=num_bins).astype(np.int64)
    row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    excl = np.cumsum(sizes) - sizes
    col = excl - np.repeat(excl[row_ptr[:-1]], counts) if num_bins else np.zeros(0, np.int64)
    rejected = np.flatnonzero(over) if overflow == "reject" else np.zeros(0, np.int64)
    empty = np.flatnonzero(p + c + r == 0)
    return DpoPackPlan(
        max_seq_len=max_seq_len, row=row, col=col, sample=sample,
        prompt_skip=(p - p2)[sample], prompt_len=p2[sample], chosen_len=c2[sample], rejected_len=r2[sample],
        row_ptr=row_ptr, num_samples=int(p.shape[0]), num_truncated=num_truncated,
        num_rejected=int(rejected.shape[0]), rejected=rejected, num_empty=int(empty.shape[0]), empty=empty,
    )  # fmt: skip


@dataclass(frozen=True)
class _SegmentPlan:
    """Generic segments for `segment_table` (3 per triple)."""

    max_seq_len: int
    row: np.ndarray
    col: np.ndarray
    sample: np.ndarray
    src_offset: np.ndarray
    length: np.ndarray
    loss_start: np.ndarray
    pos_start: np.ndarray
    seg_val: np.ndarray
    row_ptr: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.row_ptr.shape[0] - 1)

    @property
    def num_segments(self) -> int:
        return int(self.row.shape[0])


def _segments(plan: DpoPackPlan) -> _SegmentPlan:
    n = plan.row.shape[0]
    unit_in_row = np.arange(n, dtype=np.int64) - np.repeat(plan.row_ptr[:-1], np.diff(plan.row_ptr))
    pl, cl, rl = plan.prompt_len, plan.chosen_len, plan.rejected_len
    # Interleave (prompt, chosen, rejected) per triple so segments stay in destination order.
    stack = lambda a, b, c: np.stack([a, b, c], 1).reshape(-1)  # noqa: E731
    return _SegmentPlan(
        max_seq_len=plan.max_seq_len,
        row=np.repeat(plan.row, 3),
        col=stack(plan.col, plan.col + pl, plan.col + pl + cl),
        # sample indexes the concatenation [prompt_offsets, chosen_offsets, rejected_offsets]
        sample=stack(plan.sample, plan.sample + plan.num_samples, plan.sample + 2 * plan.num_samples),
        src_offset=stack(plan.prompt_skip, np.zeros(n, np.int64), np.zeros(n, np.int64)),
        length=stack(pl, cl, rl),
        loss_start=stack(pl, cl, rl),  # no unshifted labels in DPO: log-probs are gathered explicitly
        pos_start=stack(np.zeros(n, np.int64), pl, pl),
        seg_val=stack(3 * unit_in_row + 1, 3 * unit_in_row + 2, 3 * unit_in_row + 3),
        row_ptr=plan.row_ptr * 3,
    )


@dataclass
class PackedDpoBatch:
    """input_ids/position_ids int64 `[rows, width]`; segment_ids int32 (3*triple + branch + 1, 0 = pad).
    `sample` (host) is the source index of each pair, in the order of `packed_dpo_logps`'s outputs.
    The logp_* tensors list, per scored response token, its row, its column, the column whose logits
    predict it, and its sequence (2*pair + 0 for chosen, + 1 for rejected)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    sample: np.ndarray
    logp_row: torch.Tensor
    logp_col: torch.Tensor
    logp_pred_col: torch.Tensor
    logp_seq: torch.Tensor
    num_pairs: int

    def attention_mask(self, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
        return dpo_block_attention_mask(self.segment_ids, attn_implementation, dtype)

    def model_inputs(self, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> dict:
        return dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            attention_mask=self.attention_mask(attn_implementation, dtype),
            use_cache=False,
        )


def _logp_index(plan: DpoPackPlan):
    """Host arrays for every scored response token: (row, col, pred_col, seq)."""
    n = plan.row.shape[0]
    cstart = plan.col + plan.prompt_len
    rstart = cstart + plan.chosen_len
    prompt_last = plan.col + plan.prompt_len - 1  # -1 relative when the prompt is empty
    has_prompt = plan.prompt_len > 0
    parts = []
    for start, length, branch in ((cstart, plan.chosen_len, 0), (rstart, plan.rejected_len, 1)):
        idx = _ranges(np.zeros(n, np.int64), length)  # position inside the response
        unit = np.repeat(np.arange(n, dtype=np.int64), length)
        col = start[unit] + idx
        pred = np.where(idx == 0, prompt_last[unit], col - 1)
        scored = (idx > 0) | has_prompt[unit]  # an empty prompt leaves the first token unpredicted
        parts.append((plan.row[unit][scored], col[scored], pred[scored], (2 * unit + branch)[scored]))
    return [np.concatenate([a[i] for a in parts]) for i in range(4)]


def pack_dpo_batch(
    tokens: torch.Tensor,
    prompt_offsets: torch.Tensor,
    chosen_offsets: torch.Tensor,
    rejected_offsets: torch.Tensor,
    plan: DpoPackPlan,
    rows=None,
    *,
    pad_id: int = 0,
    impl: str = "auto",
    width: int | None = None,
) -> PackedDpoBatch:
    """Pack DPO triples with the same kernel as SFT. Offsets (int64, on tokens' device) give the start of
    each sample's prompt, chosen and rejected tokens in the flat `tokens` buffer."""
    if rows is not None:
        plan = plan.rows(rows)
    if impl == "auto":
        impl = "triton" if tokens.is_cuda and triton_available() else "torch"
    offsets = torch.cat([prompt_offsets, chosen_offsets, rejected_offsets])
    _check_inputs(tokens, None, offsets)
    w = int(width or plan.max_seq_len)
    seg = _segments(plan)
    meta = _to_device(segment_table(seg, w), tokens.device)
    ids, _labels, pos, segs = IMPLEMENTATIONS[impl](tokens, None, offsets, meta, plan.num_rows, w, pad_id)
    lr, lc, lp, ls = (_to_device(a.astype(np.int64), tokens.device) for a in _logp_index(plan))
    return PackedDpoBatch(
        input_ids=ids, position_ids=pos, segment_ids=segs, sample=plan.sample.copy(),
        logp_row=lr, logp_col=lc, logp_pred_col=lp, logp_seq=ls, num_pairs=int(plan.row.shape[0]),
    )  # fmt: skip


def _unit_and_branch(segment_ids: torch.Tensor):
    seg = segment_ids.long() - 1  # padding -> -1: its own "triple" (-1 // 3 = -1), branch 2
    return torch.div(seg, 3, rounding_mode="floor"), seg % 3


def dpo_mask_mod(segment_ids: torch.Tensor):
    """The packed-DPO rule as a flex-attention `mask_mod(b, h, q, k)`."""
    unit, branch = _unit_and_branch(segment_ids)

    def mask_mod(b, h, q, k):
        same_unit = unit[b, q] == unit[b, k]
        return (k <= q) & same_unit & ((branch[b, k] == PROMPT) | (branch[b, q] == branch[b, k]))

    return mask_mod


def _block_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """Dense `[rows, width, width]` version of `dpo_mask_mod` (True = attend)."""
    unit, branch = _unit_and_branch(segment_ids)
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_unit = unit[:, :, None] == unit[:, None, :]
    visible = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])
    return causal & same_unit & visible


def dpo_block_attention_mask(segment_ids: torch.Tensor, attn_implementation: str = "sdpa", dtype=torch.float32):
    """The 4-D mask `[rows, 1, width, width]` for packed DPO rows, in the form the attention expects:
    bool (True = attend) for sdpa, additive float (0 / dtype min) for eager, a BlockMask for flex.
    Dense masks cost rows x width^2 bytes (bool); flex's BlockMask avoids that on GPU."""
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows, width = segment_ids.shape
        return create_block_mask(dpo_mask_mod(segment_ids), rows, None, width, width, device=str(segment_ids.device))
    allowed = _block_allowed(segment_ids)[:, None]
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    if attn_implementation == "sdpa":
        return allowed
    raise PackingError(
        f"packed DPO needs a 4-D mask; attn_implementation {attn_implementation!r} is not supported "
        "(use sdpa, eager or flex_attention)"
    )


def dpo_predicting_positions(batch: PackedDpoBatch) -> torch.Tensor:
    """Boolean `[rows, width]`: the positions whose logits score a response token (for `logits_to_keep`)."""
    keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)
    keep[batch.logp_row, batch.logp_pred_col] = True
    return keep


def packed_dpo_logps(logits: torch.Tensor, batch: PackedDpoBatch, kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair summed log-probs of the chosen and of the rejected response: two `[num_pairs]` tensors
    (float32), in the order of `batch.sample`.

    `logits` are `[rows, width, vocab]`, or, with `kept` (the mask of `dpo_predicting_positions` given to
    the model as `logits_to_keep`), only the kept positions `[kept.sum(), vocab]` in row-major order.
    """
    tok = batch.input_ids[batch.logp_row, batch.logp_col]
    if kept is None:
        picked = logits[batch.logp_row, batch.logp_pred_col].float()
    else:  # the rank of each predicting position among the kept ones (a prompt's last token scores two)
        rank = kept.flatten().long().cumsum(0) - 1
        picked = logits[rank[batch.logp_row * kept.shape[1] + batch.logp_pred_col]].float()
    lp = picked.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(picked, -1)
    sums = torch.zeros(2 * batch.num_pairs, dtype=torch.float32, device=logits.device)
    sums = sums.index_add(0, batch.logp_seq, lp)
    pairs = sums.view(batch.num_pairs, 2)
    return pairs[:, 0], pairs[:, 1]
