"""Sequence packing: planner, Triton kernel vs torch oracle, attention isolation, packed loss, packed DPO.

CPU tests run the Triton kernel in Triton's interpreter (train.packing sets TRITON_INTERPRET=1 when no
CUDA is present). GPU tests are marked `gpu` and skipped with "needs CUDA" elsewhere.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from train.packing import (
    IGNORE_INDEX,
    PACKED_SDPA,
    PackedAttentionError,
    PackingError,
    best_fit_decreasing,
    check_packed_forward_kwargs,
    dpo_block_attention_mask,
    dpo_mask_mod,
    pack_batch,
    pack_batch_reference,
    pack_dpo_batch,
    packed_causal_lm_loss,
    packed_dpo_logps,
    packed_forward,
    packing_canary,
    plan_dpo_packing,
    plan_packing,
    without_padding,
)
from train.packing.attention import packed_sdpa_attention

HAS_CUDA = torch.cuda.is_available()
# The kernel runs where its inputs live: CUDA when present, else Triton's CPU interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
SETTINGS = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("input_ids", "labels", "position_ids", "segment_ids", "cu_seqlens")


# ---------------------------------------------------------------- helpers


def make_samples(lengths, seed=0, vocab=1000, target_p=0.7, device="cpu"):
    """Flat token buffer, target mask and offsets for samples of `lengths` (tokens never equal pad 0)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    tokens = torch.from_numpy(rng.integers(1, vocab, size=total)).to(device)
    target = torch.from_numpy(rng.random(total) < target_p).to(device)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return tokens, target, torch.from_numpy(offsets).to(device), offsets


def python_pack(tokens, target, offsets, plan, width, pad_id):
    """A third, loop-based reading of the spec, to check the oracle itself."""
    rows = plan.num_rows
    ids = [[pad_id] * width for _ in range(rows)]
    labels = [[IGNORE_INDEX] * width for _ in range(rows)]
    pos = [[0] * width for _ in range(rows)]
    seg = [[0] * width for _ in range(rows)]
    fill = [0] * rows
    for i in range(plan.num_segments):
        r, c, s, n, ls = (int(x[i]) for x in (plan.row, plan.col, plan.sample, plan.length, plan.loss_start))
        k = sum(1 for j in range(plan.row_ptr[r], i))
        for t in range(n):
            tok = int(tokens[offsets[s] + t])
            ids[r][c + t] = tok
            labels[r][c + t] = tok if (t >= max(ls, 1) and bool(target[offsets[s] + t])) else IGNORE_INDEX
            pos[r][c + t] = t
            seg[r][c + t] = k + 1
        fill[r] = max(fill[r], c + n)
    for r in range(rows):
        for j in range(fill[r], width):
            pos[r][j] = j - fill[r]
    return [torch.tensor(x) for x in (ids, labels, pos, seg)]


def check_plan_invariants(plan, lengths, max_seq_len, overflow):
    lengths = np.asarray(lengths)
    kept = np.sort(plan.sample)
    expect = np.flatnonzero((lengths > 0) & ((lengths <= max_seq_len) | (overflow == "truncate")))
    assert np.array_equal(kept, expect), "every packable sample appears exactly once"
    assert np.array_equal(plan.length, np.minimum(lengths[plan.sample], max_seq_len))
    assert plan.num_empty == int((lengths == 0).sum())
    over = int((lengths > max_seq_len).sum())
    assert (plan.num_truncated, plan.num_rejected) == ((over, 0) if overflow == "truncate" else (0, over))
    assert plan.num_segments + plan.num_empty + plan.num_rejected == len(lengths), "no sample silently dropped"
    for r in range(plan.num_rows):
        s = slice(plan.row_ptr[r], plan.row_ptr[r + 1])
        assert plan.row_ptr[r + 1] > plan.row_ptr[r], "no empty rows"
        assert np.all(plan.row[s] == r)
        ends = plan.col[s] + plan.length[s]
        assert plan.col[s][0] == 0 and np.array_equal(plan.col[s][1:], ends[:-1]), "segments are contiguous"
        assert ends[-1] <= max_seq_len
    cu = plan.cu_seqlens
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == plan.num_rows * max_seq_len
    assert np.all(np.diff(cu) > 0) and plan.max_seqlen == (np.diff(cu).max() if cu.size > 1 else 0)


def naive_bfd_fills(sizes, capacity):
    free = []
    for s in sorted(sizes, reverse=True):
        fitting = [b for b, f in enumerate(free) if f >= s]
        if fitting:
            best = min(fitting, key=lambda b: free[b])
            free[best] -= s
        else:
            free.append(capacity - s)
    return sorted(free)


lengths_strategy = st.integers(1, 24).flatmap(
    lambda m: st.tuples(
        st.just(m),
        st.lists(st.one_of(st.sampled_from([0, 1, m, m - 1 or 1, m + 3]), st.integers(0, m + 5)), max_size=40),
    )
)


# ---------------------------------------------------------------- planner


@SETTINGS
@given(lengths_strategy, st.sampled_from(["truncate", "reject"]))
def test_planner_invariants_and_counts(case, overflow):
    max_seq_len, lengths = case
    plan = plan_packing(np.array(lengths, np.int64), max_seq_len, overflow=overflow)
    check_plan_invariants(plan, lengths, max_seq_len, overflow)
    again = plan_packing(np.array(lengths, np.int64), max_seq_len, overflow=overflow)
    for name in ("row", "col", "sample", "length", "loss_start", "row_ptr"):
        assert np.array_equal(getattr(plan, name), getattr(again, name)), "deterministic"


@SETTINGS
@given(st.integers(1, 40).flatmap(lambda c: st.tuples(st.just(c), st.lists(st.integers(1, c), max_size=60))))
def test_bfd_matches_textbook_best_fit_decreasing(case):
    capacity, sizes = case
    bins, _, num_bins = best_fit_decreasing(np.array(sizes, np.int64), capacity)
    free = np.full(num_bins, capacity)
    np.subtract.at(free, bins, np.array(sizes, np.int64))
    assert sorted(free.tolist()) == naive_bfd_fills(sizes, capacity)


def test_exactly_full_rows_have_no_padding():
    plan = plan_packing(np.array([8, 3, 5, 5, 3, 8, 2, 6]), 8)
    assert plan.num_rows == 5 and plan.efficiency == 1.0
    assert np.array_equal(plan.row_fill, [8] * 5)
    assert np.array_equal(np.diff(plan.cu_seqlens), plan.length)  # no padding pseudo-sequences


def test_overflow_truncate_and_reject_are_counted():
    lengths = np.array([10, 3, 0, 7, 4])
    t = plan_packing(lengths, 6)
    assert (t.num_truncated, t.truncated_tokens, t.num_empty, t.num_rejected) == (2, 5, 1, 0)
    r = plan_packing(lengths, 6, overflow="reject")
    assert r.num_rejected == 2 and sorted(r.rejected.tolist()) == [0, 3] and r.empty.tolist() == [2]
    with pytest.raises(PackingError):
        plan_packing(lengths, 6, overflow="drop")
    with pytest.raises(PackingError):
        plan_packing(np.array([3, -1]), 6)


def test_rows_subset_renumbers_and_cu_seqlens():
    plan = plan_packing(np.array([5, 4, 3, 2, 7, 1, 6]), 8)
    sub = plan.rows([2, 0])
    assert sub.num_rows == 2 and set(sub.row.tolist()) == {0, 1}
    assert np.array_equal(sub.sample[sub.row == 0], plan.sample[plan.row == 2])
    assert sub.cu_seqlens[-1] == 2 * 8
    assert sum(b.num_rows for b in plan.batches(2)) == plan.num_rows


def test_loss_start_is_carried_and_never_below_one():
    plan = plan_packing(np.array([6, 5]), 16, loss_starts=np.array([3, 0]))
    assert dict(zip(plan.sample.tolist(), plan.loss_start.tolist())) == {0: 3, 1: 1}


# ---------------------------------------------------------------- kernel vs oracle


@settings(SETTINGS, max_examples=25)
@given(lengths_strategy, st.integers(0, 3), st.booleans(), st.booleans())
@example((8, [8, 3, 5, 5, 3, 8]), 0, True, False)  # exactly full rows, no padding at all
@example((7, [0, 1, 7, 13, 6, 2, 0]), 1, True, True)  # empty, one token, exactly a row, too long; odd width
@example((1, [1, 1, 0, 3]), 2, False, False)  # one-token rows
@example((24, []), 0, True, False)  # nothing to pack
def test_triton_kernel_equals_torch_oracle_exactly(case, seed, with_mask, with_loss_starts):
    max_seq_len, lengths = case
    lengths = np.array(lengths, np.int64)
    loss_starts = np.random.default_rng(seed).integers(0, 4, size=len(lengths)) if with_loss_starts else None
    plan = plan_packing(lengths, max_seq_len, loss_starts=loss_starts)
    tokens, target, offsets, _ = make_samples(lengths, seed, device=KERNEL_DEVICE)
    target = target if with_mask else None
    ref = pack_batch_reference(tokens, target, offsets, plan, pad_id=0)
    got = pack_batch(tokens, target, offsets, plan, pad_id=0, impl="triton")
    for name in FIELDS:
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert int(ref.num_target_tokens) == int(got.num_target_tokens)


def test_oracle_matches_loop_reference_and_label_rules():
    lengths = np.array([5, 1, 7, 3, 0, 8, 2, 11])
    plan = plan_packing(lengths, 8, loss_starts=np.array([2, 0, 0, 1, 0, 3, 0, 0]))
    tokens, target, offsets_t, offsets = make_samples(lengths, seed=3)
    out = pack_batch_reference(tokens, target, offsets_t, plan, pad_id=0)
    want = python_pack(tokens, target, offsets, plan, 8, 0)
    for name, w in zip(("input_ids", "labels", "position_ids", "segment_ids"), want):
        assert torch.equal(getattr(out, name).long(), w), name
    starts = out.position_ids == 0
    assert torch.all(out.labels[starts] == IGNORE_INDEX), "no token is trained on a segment's first token"
    assert torch.all(out.labels[out.segment_ids == 0] == IGNORE_INDEX), "padding is never a label"
    assert out.num_target_tokens.item() == plan.target_counts(target.numpy(), offsets).sum()
    assert np.array_equal(out.cu_seqlens.numpy(), plan.cu_seqlens) and out.max_seqlen == plan.max_seqlen


def test_pack_batch_widths_and_input_errors():
    lengths = np.array([3, 2, 4])
    plan = plan_packing(lengths, 16)
    tokens, target, offsets, _ = make_samples(lengths, device=KERNEL_DEVICE)
    b = pack_batch(tokens, target, offsets, plan, pad_to_multiple_of=4, impl="triton", pad_id=7)
    assert b.input_ids.shape == (1, 12) and b.input_ids[0, -3:].tolist() == [7, 7, 7]
    with pytest.raises(PackingError):
        pack_batch(tokens, target, offsets, plan, width=5)
    with pytest.raises(PackingError):
        pack_batch(tokens.int(), target, offsets, plan)
    with pytest.raises(PackingError):
        pack_batch(tokens, target[:-1], offsets, plan)


# ---------------------------------------------------------------- tiny Llama


def tiny_llama(attn_implementation, seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn_implementation,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype)


def tiny_lora(attn_implementation):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(attn_implementation)
    # init_lora_weights=False: random A and B, so every LoRA tensor has a non-zero gradient.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, cfg)


SFT_LENGTHS = np.array([7, 3, 12, 5, 1, 9, 16, 4, 6, 2])


def _sft_batch(max_seq_len=16):
    plan = plan_packing(SFT_LENGTHS, max_seq_len)
    tokens, target, offsets_t, offsets = make_samples(SFT_LENGTHS, seed=1, vocab=97)
    return plan, tokens, target, offsets_t, offsets


@pytest.mark.parametrize("attn", ["eager", "sdpa", PACKED_SDPA])
def test_packed_logits_equal_unpacked(attn):
    model = tiny_llama(attn).eval()
    plan, tokens, target, offsets_t, offsets = _sft_batch()
    batch = pack_batch(tokens, target, offsets_t, plan)
    with torch.no_grad():
        logits = packed_forward(model, **batch.model_inputs(attn)).logits
        for i in range(plan.num_segments):
            r, c, s, n = (int(x[i]) for x in (plan.row, plan.col, plan.sample, plan.length))
            alone = model(input_ids=tokens[offsets[s] : offsets[s] + n][None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[r, c : c + n], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa", PACKED_SDPA, PACKED_SDPA + "/without_padding"])
def test_packed_lora_gradients_equal_unpacked(attn):
    plan, tokens, target, offsets_t, offsets = _sft_batch()
    total_targets = int(plan.target_counts(target.numpy(), offsets).sum())
    attn, flat = attn.split("/")[0], attn.endswith("/without_padding")

    packed_model = tiny_lora(attn)
    for micro in plan.batches(2):  # gradient accumulation over micro-batches, normalized by step targets
        batch = pack_batch(tokens, target, offsets_t, micro, impl="torch")
        if flat:
            batch = without_padding(batch)
            assert batch.input_ids.shape == (1, int(micro.length.sum()))
        logits = packed_forward(packed_model, **batch.model_inputs(attn)).logits
        loss_sum, _ = packed_causal_lm_loss(logits, batch.labels)
        (loss_sum / total_targets).backward()

    ref_model = tiny_lora(attn)
    for s, n in enumerate(SFT_LENGTHS):
        ids = tokens[offsets[s] : offsets[s] + min(n, 16)][None]
        labels = torch.where(target[offsets[s] : offsets[s] + ids.shape[1]], ids[0], IGNORE_INDEX)[None]
        loss_sum, _ = packed_causal_lm_loss(ref_model(input_ids=ids, use_cache=False).logits, labels)
        (loss_sum / total_targets).backward()

    ref = {k: p.grad for k, p in ref_model.named_parameters() if p.requires_grad}
    got = {k: p.grad for k, p in packed_model.named_parameters() if p.requires_grad}
    assert ref and ref.keys() == got.keys()
    for k in ref:
        rel = ((got[k] - ref[k]).norm() / ref[k].norm()).item()
        assert rel <= 1e-6, (k, rel)


def test_loss_normalization_matches_mean_over_all_targets():
    model = tiny_llama("sdpa").eval()
    plan, tokens, target, offsets_t, offsets = _sft_batch()
    total = 0.0
    n_total = 0
    with torch.no_grad():
        for micro in plan.batches(3):
            b = pack_batch(tokens, target, offsets_t, micro)
            loss_sum, n = packed_causal_lm_loss(model(**b.model_inputs()).logits, b.labels)
            total, n_total = total + loss_sum.item(), n_total + int(n)
        per_token = []
        for s, n in enumerate(SFT_LENGTHS):
            ids = tokens[offsets[s] : offsets[s] + min(n, 16)]
            logp = model(input_ids=ids[None], use_cache=False).logits[0].log_softmax(-1)
            for t in range(1, ids.shape[0]):
                if target[offsets[s] + t]:
                    per_token.append(-logp[t - 1, ids[t]].item())
    assert n_total == len(per_token) == plan.target_counts(target.numpy(), offsets).sum()
    assert abs(total / n_total - float(np.mean(per_token))) < 1e-5


# ---------------------------------------------------------------- guard rails


def test_guard_rails_raise_on_2d_mask_and_cache():
    ids = torch.zeros(1, 4, dtype=torch.long)
    ok = dict(input_ids=ids, position_ids=torch.tensor([[0, 1, 0, 1]]), attention_mask=None, use_cache=False)
    assert check_packed_forward_kwargs(dict(ok)) is not None
    with pytest.raises(PackedAttentionError, match="2-D attention_mask"):
        check_packed_forward_kwargs({**ok, "attention_mask": torch.ones(1, 4)})
    with pytest.raises(PackedAttentionError, match="use_cache"):
        check_packed_forward_kwargs({**ok, "use_cache": True})
    with pytest.raises(PackedAttentionError, match="use_cache"):
        check_packed_forward_kwargs({k: v for k, v in ok.items() if k != "use_cache"})
    with pytest.raises(PackedAttentionError, match="past_key_values"):
        check_packed_forward_kwargs({**ok, "past_key_values": object()})
    with pytest.raises(PackedAttentionError, match="position_ids"):
        check_packed_forward_kwargs({**ok, "position_ids": None})
    check_packed_forward_kwargs({**ok, "attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.bool)})  # DPO


def test_the_leaks_the_guard_rails_prevent_are_real():
    """Documents why the guard rails exist: a 2-D all-ones mask or the default cache mixes samples."""
    model = tiny_llama("sdpa").eval()
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 5:], use_cache=False).logits[0]
        isolated = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0, 5:]
        masked = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False)
        cached = model(input_ids=ids, position_ids=pos)  # config.use_cache=True -> DynamicCache
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=0)
    assert (masked.logits[0, 5:] - alone).abs().max() > 1e-2
    assert (cached.logits[0, 5:] - alone).abs().max() > 1e-2


def test_packed_sdpa_attends_within_each_segment_only():
    """The attention function alone, against sdpa with the dense block-causal mask of the same segments:
    no mask is passed, so only the segment bounds can keep the samples apart."""
    gen = torch.Generator().manual_seed(0)
    rows, width = 2, 12
    segments = (((0, 5), (5, 9)), ((0, 7), (7, 10), (10, 12)))
    q, k, v = torch.randn(rows, 4, width, 8, generator=gen), torch.randn(rows, 2, width, 8, generator=gen), torch.randn(rows, 2, width, 8, generator=gen)
    got, _ = packed_sdpa_attention(None, q, k, v, None, scaling=0.5, packed_segments=segments)
    seg = torch.zeros(rows, width, dtype=torch.long)
    for r, bounds in enumerate(segments):
        for i, (start, stop) in enumerate(bounds):
            seg[r, start:stop] = i + 1
    pos = torch.arange(width)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None] >= pos[None, :]) & (seg[:, :, None] > 0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=0.5, enable_gqa=True)
    real = (seg > 0)[:, :, None, None].expand(-1, -1, 4, 8)
    torch.testing.assert_close(got[real], want.transpose(1, 2)[real], atol=1e-6, rtol=0)
    assert got[~real].abs().max() == 0  # the padding tail of row 0


@pytest.mark.parametrize("attn", ["eager", "sdpa", PACKED_SDPA])
def test_canary_passes_and_catches_a_leaking_model(attn):
    model = tiny_llama(attn).train()
    assert packing_canary(model) < 1e-5
    assert model.training, "canary restores the training mode"

    class DropsPositionIds(torch.nn.Module):  # a wrapper that loses position_ids -> samples see each other
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        # Per-segment attention needs no position_ids to isolate samples (RoPE is relative inside each);
        # losing the segment bounds too is its leak.
        def forward(self, position_ids=None, packed_segments=None, **kwargs):
            return self.inner(**kwargs)

    with pytest.raises(PackedAttentionError, match="canary failed"):
        packing_canary(DropsPositionIds(model))


# ---------------------------------------------------------------- packed DPO


def _dpo_case(seed=0, n=7):
    rng = np.random.default_rng(seed)
    p, c, r = rng.integers(0, 7, n), rng.integers(0, 6, n), rng.integers(0, 6, n)
    p[0], c[1], r[2], p[3], c[3], r[3] = 0, 0, 0, 9, 8, 7  # empty prompt / responses, one truncated triple
    parts, offs, off = [], ([], [], []), 0
    for i in range(n):
        for k, m in enumerate((p[i], c[i], r[i])):
            parts.append(rng.integers(1, 97, m))
            offs[k].append(off)
            off += m
    tokens = torch.from_numpy(np.concatenate(parts)).long()
    return p, c, r, tokens, [torch.tensor(o, dtype=torch.long) for o in offs], parts


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_dpo_logps_equal_separate_forwards(attn):
    p, c, r, tokens, offs, parts = _dpo_case()
    plan = plan_dpo_packing(p, c, r, max_seq_len=20)
    assert plan.num_truncated == 1
    model = tiny_llama(attn).eval()
    for micro in plan.batches(2):
        batch = pack_dpo_batch(tokens, *offs, micro)
        with torch.no_grad():
            logits = packed_forward(model, **batch.model_inputs(attn)).logits
            chosen, rejected = packed_dpo_logps(logits, batch)
            for j, s in enumerate(batch.sample):
                k = int(np.flatnonzero(micro.sample == s)[0])
                skip, pl = int(micro.prompt_skip[k]), int(micro.prompt_len[k])
                prompt = torch.from_numpy(parts[3 * s][skip : skip + pl])
                for resp, got, n in ((parts[3 * s + 1], chosen[j], micro.chosen_len[k]),
                                     (parts[3 * s + 2], rejected[j], micro.rejected_len[k])):  # fmt: skip
                    resp = torch.from_numpy(resp[:n])
                    seq = torch.cat([prompt, resp]).long()
                    want = 0.0
                    if seq.numel() > 1:
                        logp = model(input_ids=seq[None], use_cache=False).logits[0].log_softmax(-1)
                        want = sum(logp[pl + t - 1, resp[t]].item() for t in range(len(resp)) if pl + t >= 1)
                    assert abs(got.item() - want) < 1e-5, (s, got.item(), want)


def test_dpo_kernel_equals_oracle_and_flex_mask_equals_dense():
    p, c, r, tokens, offs, _ = _dpo_case(seed=1, n=9)
    plan = plan_dpo_packing(p, c, r, max_seq_len=20)
    dev = [o.to(KERNEL_DEVICE) for o in offs]
    got = pack_dpo_batch(tokens.to(KERNEL_DEVICE), *dev, plan, impl="triton")
    ref = pack_dpo_batch(tokens.to(KERNEL_DEVICE), *dev, plan, impl="torch")
    for name in ("input_ids", "position_ids", "segment_ids"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    from torch.nn.attention.flex_attention import create_mask

    seg = ref.segment_ids.cpu()
    dense = dpo_block_attention_mask(seg, "sdpa")
    assert torch.equal(create_mask(dpo_mask_mod(seg), seg.shape[0], 1, seg.shape[1], seg.shape[1], "cpu"), dense)
    eager = dpo_block_attention_mask(seg, "eager")
    assert torch.equal(eager == 0, dense)
    # rejected tokens never see chosen tokens, and every token sees its own prompt
    for row in range(seg.shape[0]):
        s = seg[row].long()
        for q in range(s.shape[0]):
            for k in range(q + 1):
                if s[q] > 0 and s[k] > 0 and (s[q] - 1) // 3 == (s[k] - 1) // 3:
                    bq, bk = (s[q] - 1) % 3, (s[k] - 1) % 3
                    assert bool(dense[row, 0, q, k]) == (bk == 0 or bq == bk)


def test_dpo_planner_truncates_or_rejects_and_counts():
    p, c, r = np.array([30, 2, 4, 0]), np.array([10, 3, 30, 0]), np.array([12, 1, 2, 0])
    t = plan_dpo_packing(p, c, r, 32)
    assert t.num_truncated == 2 and np.all(t.length <= 32) and t.empty.tolist() == [3]
    k = int(np.flatnonzero(t.sample == 0)[0])
    assert t.prompt_len[k] == 16 and t.prompt_skip[k] == 14  # keep the prompt's end, half the row
    rj = plan_dpo_packing(p, c, r, 32, overflow="reject")
    assert rj.num_rejected == 2 and rj.sample.tolist() == [1]


# ---------------------------------------------------------------- flex attention (where it runs)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_CUDA and os.environ.get("PACKING_FLEX_CPU") != "1",
    reason="flex_attention on CPU compiles for 1-3 min and has no backward; set PACKING_FLEX_CPU=1 to run",
)
def test_flex_attention_packed_logits_equal_unpacked():
    device = "cuda" if HAS_CUDA else "cpu"
    model = tiny_llama("flex_attention").to(device).eval()
    plan, tokens, target, offsets_t, offsets = _sft_batch()
    batch = pack_batch(tokens.to(device), target.to(device), offsets_t.to(device), plan)
    with torch.no_grad():
        logits = packed_forward(model, **batch.model_inputs("flex_attention")).logits
        for i in range(plan.num_segments):
            r, c, s, n = (int(x[i]) for x in (plan.row, plan.col, plan.sample, plan.length))
            ids = tokens[offsets[s] : offsets[s] + n][None].to(device)
            torch.testing.assert_close(logits[r, c : c + n], model(input_ids=ids, use_cache=False).logits[0],
                                       atol=1e-4, rtol=0)  # fmt: skip


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("with_mask", [True, False])
def test_gpu_kernel_equals_oracle_without_host_syncs(with_mask):
    lengths = np.random.default_rng(0).integers(0, 700, size=500)
    plan = plan_packing(lengths, 512)
    tokens, target, offsets, _ = make_samples(lengths, device="cuda")
    target = target if with_mask else None
    ref = pack_batch_reference(tokens, target, offsets, plan)
    pack_batch(tokens, target, offsets, plan, impl="triton")  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = pack_batch(tokens, target, offsets, plan, impl="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in FIELDS:
        assert torch.equal(getattr(ref, name), getattr(got, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_flash_attention_with_cu_seqlens_equals_unpacked():
    pytest.importorskip("flash_attn", reason="flash_attn not installed")
    model = tiny_llama("flash_attention_2", dtype=torch.bfloat16).cuda().eval()
    plan, tokens, target, offsets_t, offsets = _sft_batch()
    batch = pack_batch(tokens.cuda(), target.cuda(), offsets_t.cuda(), plan)
    with torch.no_grad():
        logits = packed_forward(model, **batch.model_inputs("flash_attention_2")).logits.float()
        for i in range(plan.num_segments):
            r, c, s, n = (int(x[i]) for x in (plan.row, plan.col, plan.sample, plan.length))
            ids = tokens[offsets[s] : offsets[s] + n][None].cuda()
            alone = model(input_ids=ids, use_cache=False).logits[0].float()
            assert (logits[r, c : c + n] - alone).abs().max() <= 2e-2 * alone.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_packed_dpo_with_flex_block_mask_equals_sdpa_dense_mask():
    p, c, r, tokens, offs, _ = _dpo_case(seed=2)
    plan = plan_dpo_packing(p, c, r, max_seq_len=32)
    batch = pack_dpo_batch(tokens.cuda(), *[o.cuda() for o in offs], plan)
    results = []
    for attn in ("sdpa", "flex_attention"):
        model = tiny_llama(attn).cuda().eval()
        with torch.no_grad():
            logits = packed_forward(model, **batch.model_inputs(attn)).logits
        results.append(packed_dpo_logps(logits, batch))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
