"""Split-KV decoding (flash-decoding) over contiguous and paged KV caches; why decoding has
its own kernels instead of the fused engine's: docs/architecture.md, The decode path.

Three small kernels:

* ``decode_split_kernel``: one program per (split, sequence x kv head, row block). The
  rows of a program are the queries of every query head of the kv head's GQA group,
  packed head-major (row r: group head g = r // Nq, query i = r % Nq), so K and V are
  read once per group. The keys a (sequence, kv head) may see are cut into splits so
  that a batch of one still fills the GPU; each split runs an online softmax over its
  key blocks and writes a normalized partial output and its LSE.
* ``decode_merge_kernel``: merges the splits by their LSEs, and the sink logit as one
  more part with no value (the rule of ``attnkit.merge_attention``).
* ``decode_key_scores_kernel``: with the final LSE, the softmax probability of every
  key, summed over the queries of each head (H2O's accumulated attention).

Key blocks: BLOCK_N keys of a contiguous cache, or one page of a paged cache (the
page size is the block). The blocks of a (sequence, kv head) are the sink blocks and
the blocks from ``KEY_LO`` (the first key some row's window reaches) to the newest
key, or, with page selection, the selected pages. Query row i of a sequence of
length L sits at position L - Nq + i and sees key j iff j <= that position (always
causal), j < L, and, with a window, j >= position - left or j < sinks.
"""

import triton
import triton.language as tl

from .engine.common import LOG2E, tanh


@triton.jit
def _rows(rb, hk, groups, seqlen_q, length, BLOCK_M: tl.constexpr):
    """Packed rows of a program: (valid, query head, query index, query position)."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < groups * seqlen_q
    g = tl.minimum(rows // seqlen_q, groups - 1)
    i = rows % seqlen_q
    return valid, hk * groups + g, i, length - seqlen_q + i


@triton.jit
def _block_count(b, bh, length, KEY_LO, SEL_COUNT, sinks, SELECTED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """(number of key blocks of the (sequence, kv head), first window block, sink blocks)."""
    if SELECTED:
        return tl.load(SEL_COUNT + bh) * SUB, 0, 0
    else:
        blk_hi = (length + BLOCK_N - 1) // BLOCK_N
        if HAS_WINDOW:
            blk_lo = tl.minimum(tl.load(KEY_LO + bh) // BLOCK_N, blk_hi)
            sink_hi = tl.minimum((tl.minimum(sinks, length) + BLOCK_N - 1) // BLOCK_N, blk_lo)
            return sink_hi + blk_hi - blk_lo, blk_lo, sink_hi
        else:
            return blk_hi, 0, 0


@triton.jit
def _block_index(t, bh, blk_lo, sink_hi, SEL, stride_sel, SELECTED: tl.constexpr, SUB: tl.constexpr):
    """Logical key block of the t-th block of a (sequence, kv head); a selected page is SUB blocks."""
    if SELECTED:
        return tl.load(SEL + bh.to(tl.int64) * stride_sel + t // SUB) * SUB + t % SUB
    else:
        return tl.where(t < sink_hi, t, blk_lo + (t - sink_hi))


@triton.jit
def _load_block(X, b, hk, blk, length, BLOCK_TABLE, stride_tb, stride_xp, stride_xh, stride_xn, offs_d,
                HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """Keys (or values) [BLOCK_N, BLOCK_D] of logical block ``blk`` and their positions."""
    pos = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    if PAGED:
        page = tl.load(BLOCK_TABLE + b.to(tl.int64) * stride_tb + blk // SUB).to(tl.int64)
        slots = (blk % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        base = X + page * stride_xp + hk.to(tl.int64) * stride_xh + slots[:, None] * stride_xn
    else:
        base = X + b.to(tl.int64) * stride_xp + hk.to(tl.int64) * stride_xh + pos[:, None].to(tl.int64) * stride_xn
    tile = tl.load(base + offs_d[None, :], mask=(pos[:, None] < length) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return tile, pos


@triton.jit
def _scores(q, k, pos, b, head, qpos, valid, length, sm_scale, softcap, sinks, left, SCORE_ARGS,
            SCORE_MOD: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """Scores [BLOCK_M, BLOCK_N] in log2 units (scale, softcap, score_mod) and the visibility mask."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        t = tanh(qk * (sm_scale / softcap))
        s = t * softcap
    else:
        s = qk * sm_scale
    if SCORE_MOD is not None:
        # positions of padding keys are clamped, so a mod never reads past its tensors
        kv_idx = tl.minimum(pos, length - 1)[None, :]
        s = SCORE_MOD(s, b, head[:, None], qpos[:, None], kv_idx, *SCORE_ARGS)
    keep = valid[:, None] & (pos[None, :] < length) & (pos[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        keep = keep & ((pos[None, :] >= qpos[:, None] - left[:, None]) | (pos[None, :] < sinks))
    return tl.where(keep, s * LOG2E, float("-inf")), keep


@triton.jit
def _load_queries(Q, b, head, i, valid, stride_qb, stride_qh, stride_qm, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh \
        + i[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _left_extents(head, left, WINDOWS, PER_HEAD_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr):
    """The left extent of each row's window (host-bounded: "unbounded" is a large number)."""
    if PER_HEAD_WINDOW:
        return tl.load(WINDOWS + head)
    else:
        return tl.zeros([BLOCK_M], dtype=tl.int32) + left


@triton.jit
def _split_program(Q, SEQLENS, KEY_LO, SEL_COUNT, WINDOWS, stride_qb, stride_qh, stride_qm, num_heads_kv, groups,
                   seqlen_q, num_splits, sinks, left, SELECTED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   PER_HEAD_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr):
    """What a program of the split-KV grid (split, batch x kv head, row block) works on: its
    split, sequence b, kv head hk and the sequence's length; its query rows (valid, head, i,
    qpos), their queries q and window extents; and its key blocks t_lo <= t < t_hi of the
    sequence's (for :func:`_block_index`: blk_lo, sink_hi)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    rb = tl.program_id(2)
    b = bh // num_heads_kv
    hk = bh % num_heads_kv
    length = tl.load(SEQLENS + b)
    valid, head, i, qpos = _rows(rb, hk, groups, seqlen_q, length, BLOCK_M)
    q = _load_queries(Q, b, head, i, valid, stride_qb, stride_qh, stride_qm, tl.arange(0, BLOCK_D), HEAD_DIM)
    lefts = _left_extents(head, left, WINDOWS, PER_HEAD_WINDOW, BLOCK_M)
    n_blocks, blk_lo, sink_hi = _block_count(b, bh, length, KEY_LO, SEL_COUNT, sinks, SELECTED, HAS_WINDOW, BLOCK_N,
                                             SUB)
    per_split = (n_blocks + num_splits - 1) // num_splits
    t_lo = split * per_split
    t_hi = tl.minimum(n_blocks, t_lo + per_split)
    return split, bh, rb, b, hk, length, valid, head, i, qpos, q, lefts, blk_lo, sink_hi, t_lo, t_hi


@triton.jit
def decode_split_kernel(
    Q, K, V, O_PART, LSE_PART, SEQLENS, BLOCK_TABLE, KEY_LO, SEL, SEL_COUNT, WINDOWS,
    stride_qb, stride_qh, stride_qm,
    stride_kp, stride_kh, stride_kn,
    stride_vp, stride_vh, stride_vn,
    stride_tb, stride_sel,
    stride_ob, stride_oh, stride_os, stride_or,
    stride_lb, stride_lh, stride_ls,
    num_heads_kv, groups, seqlen_q, num_splits, sm_scale, softcap, sinks, left,
    SCORE_ARGS,
    SCORE_MOD: tl.constexpr, PAGED: tl.constexpr, SELECTED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PER_HEAD_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
):
    split, bh, rb, b, hk, length, valid, head, i, qpos, q, lefts, blk_lo, sink_hi, t_lo, t_hi = _split_program(
        Q, SEQLENS, KEY_LO, SEL_COUNT, WINDOWS, stride_qb, stride_qh, stride_qm, num_heads_kv, groups, seqlen_q,
        num_splits, sinks, left, SELECTED, HAS_WINDOW, PER_HEAD_WINDOW, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        blk = _block_index(t, bh, blk_lo, sink_hi, SEL, stride_sel, SELECTED, SUB)
        k, pos = _load_block(K, b, hk, blk, length, BLOCK_TABLE, stride_tb, stride_kp, stride_kh, stride_kn,
                             offs_d, HEAD_DIM, PAGED, BLOCK_N, SUB)
        s, _ = _scores(q, k, pos, b, head, qpos, valid, length, sm_scale, softcap, sinks, lefts, SCORE_ARGS,
                       SCORE_MOD, HAS_SOFTCAP, HAS_WINDOW, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing stay NaN-free
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v, _ = _load_block(V, b, hk, blk, length, BLOCK_TABLE, stride_tb, stride_vp, stride_vh, stride_vn,
                           offs_dv, HEAD_DIM_V, PAGED, BLOCK_N, SUB)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ptrs = O_PART + b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + split.to(tl.int64) * stride_os \
        + rows[:, None].to(tl.int64) * stride_or + offs_dv[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None], mask=valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / LOG2E)
    l_ptrs = LSE_PART + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + split.to(tl.int64) * stride_ls \
        + rows
    tl.store(l_ptrs, lse, mask=valid)


@triton.jit
def decode_merge_kernel(
    O_PART, LSE_PART, OUT, LSE, SINK,
    stride_ob, stride_oh, stride_os, stride_or,
    stride_lb, stride_lh, stride_ls,
    stride_outb, stride_outh, stride_outm,
    stride_lseb, stride_lseh,
    num_heads_kv, groups, seqlen_q, num_splits,
    HAS_SINK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) out_s, lse = log(sum_s exp(lse_s) + exp(sink)) per row."""
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // num_heads_kv
    hk = bh % num_heads_kv
    valid, head, i, _ = _rows(rb, hk, groups, seqlen_q, 0, BLOCK_M)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_SINK:  # one more part with no value: mass exp(sink)
        m = tl.load(SINK + head, mask=valid, other=0.0).to(tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    o_base = O_PART + b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh + rows[:, None].to(tl.int64) * stride_or
    l_base = LSE_PART + b.to(tl.int64) * stride_lb + hk.to(tl.int64) * stride_lh + rows
    for s in range(0, num_splits):
        lse_s = tl.load(l_base + s * stride_ls, mask=valid, other=float("-inf"))
        o_s = tl.load(o_base + s * stride_os + offs_dv[None, :],
                      mask=valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        m_new = tl.maximum(m, lse_s)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        w = tl.exp(lse_s - shift)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out_ptrs = OUT + b.to(tl.int64) * stride_outb + head[:, None].to(tl.int64) * stride_outh \
        + i[:, None].to(tl.int64) * stride_outm + offs_dv[None, :]
    tl.store(out_ptrs, (acc / l_safe[:, None]).to(OUT.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    lse = tl.where(empty, float("-inf"), m + tl.log(l_safe))
    tl.store(LSE + b.to(tl.int64) * stride_lseb + head.to(tl.int64) * stride_lseh + i, lse, mask=valid)


@triton.jit
def decode_key_scores_kernel(
    Q, K, LSE, SCORES, SEQLENS, BLOCK_TABLE, KEY_LO, SEL, SEL_COUNT, WINDOWS,
    stride_qb, stride_qh, stride_qm,
    stride_kp, stride_kh, stride_kn,
    stride_tb, stride_sel,
    stride_lseb, stride_lseh,
    stride_sb, stride_sh,
    num_heads_kv, groups, seqlen_q, num_splits, sm_scale, softcap, sinks, left,
    SCORE_ARGS,
    SCORE_MOD: tl.constexpr, PAGED: tl.constexpr, SELECTED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PER_HEAD_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
):
    """SCORES[b, h, j] += sum over the queries of head h of exp(s - lse) (zero-filled before)."""
    split, bh, rb, b, hk, length, valid, head, i, qpos, q, lefts, blk_lo, sink_hi, t_lo, t_hi = _split_program(
        Q, SEQLENS, KEY_LO, SEL_COUNT, WINDOWS, stride_qb, stride_qh, stride_qm, num_heads_kv, groups, seqlen_q,
        num_splits, sinks, left, SELECTED, HAS_WINDOW, PER_HEAD_WINDOW, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, SUB)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE + b.to(tl.int64) * stride_lseb + head.to(tl.int64) * stride_lseh + i, mask=valid,
                  other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E  # rows that saw nothing add nothing
    for t in range(t_lo, t_hi):
        blk = _block_index(t, bh, blk_lo, sink_hi, SEL, stride_sel, SELECTED, SUB)
        k, pos = _load_block(K, b, hk, blk, length, BLOCK_TABLE, stride_tb, stride_kp, stride_kh, stride_kn,
                             offs_d, HEAD_DIM, PAGED, BLOCK_N, SUB)
        s, keep = _scores(q, k, pos, b, head, qpos, valid, length, sm_scale, softcap, sinks, lefts, SCORE_ARGS,
                          SCORE_MOD, HAS_SOFTCAP, HAS_WINDOW, DOT_PRECISION)
        p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        ptrs = SCORES + b.to(tl.int64) * stride_sb + head[:, None].to(tl.int64) * stride_sh + pos[None, :]
        tl.atomic_add(ptrs, p, mask=keep)
