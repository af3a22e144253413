"""The Triton packing kernel. Imported lazily by `kernel.py` after TRITON_INTERPRET is decided,
because `triton.jit` chooses compiled vs interpreted at decoration time."""

import triton
import triton.language as tl

# Rows of the segment table (int64 [META_ROWS, num_segments]); keep in sync with kernel.py.
ROW, COL, SAMPLE, SRC_OFFSET, LENGTH, POS_START, LOSS_START, SEG_VAL = range(8)


@triton.jit
def pack_kernel(
    tokens_ptr,  # int64 [total source tokens]
    mask_ptr,  # uint8 [total source tokens] (unused unless HAS_MASK)
    offsets_ptr,  # int64 [num_samples] start of each sample in tokens
    meta_ptr,  # int64 [8, num_segments]
    num_segments,
    ids_ptr,  # int64 [rows, width]
    labels_ptr,  # int64 [rows, width]
    pos_ptr,  # int64 [rows, width]
    segid_ptr,  # int32 [rows, width]
    width,
    pad_id,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seg = tl.program_id(0)
    chunk = tl.program_id(1)
    row = tl.load(meta_ptr + 0 * num_segments + seg)
    col = tl.load(meta_ptr + 1 * num_segments + seg)
    sample = tl.load(meta_ptr + 2 * num_segments + seg)
    src_offset = tl.load(meta_ptr + 3 * num_segments + seg)
    length = tl.load(meta_ptr + 4 * num_segments + seg)
    pos_start = tl.load(meta_ptr + 5 * num_segments + seg)
    loss_start = tl.load(meta_ptr + 6 * num_segments + seg)
    seg_val = tl.load(meta_ptr + 7 * num_segments + seg)

    t = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_seg = t < length
    # Built as a block (not a scalar) so masks stay int1 in Triton's CPU interpreter too.
    is_real = (t * 0 + sample) >= 0
    # Padding segments have sample == -1; read offsets[0] for them and mask every source load.
    base = tl.load(offsets_ptr + tl.maximum(sample, 0)) + src_offset
    src = base + t
    load_mask = in_seg & is_real
    tok = tl.load(tokens_ptr + src, mask=load_mask, other=0)
    tok = tl.where(is_real, tok, pad_id)  # pad_id only on padding segments
    is_label = load_mask & (t >= loss_start)
    if HAS_MASK:
        target = tl.load(mask_ptr + src, mask=load_mask, other=0)
        is_label = is_label & (target != 0)
    label = tl.where(is_label, tok, -100)

    out = row * width + col + t
    tl.store(ids_ptr + out, tok, mask=in_seg)
    tl.store(labels_ptr + out, label, mask=in_seg)
    tl.store(pos_ptr + out, pos_start + t, mask=in_seg)
    tl.store(segid_ptr + out, (seg_val + t * 0).to(tl.int32), mask=in_seg)
