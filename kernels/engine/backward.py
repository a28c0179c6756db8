"""Backward kernels of the fused softmax-attention engine (FlashAttention-2 algorithm).

Two passes, neither with atomics on dQ/dK/dV: ``attn_bwd_dkdv_kernel`` owns a block of
keys of one kv head and walks the query blocks that see it (the transposed schedule),
for every query head of its GQA group; ``attn_bwd_dq_kernel`` owns a block of queries
and walks its forward schedule. Both recompute P from the saved LSE, the scale folded
into the exp2 argument (one FMA per score) when there is no score mod and no softcap;
Delta = rowsum(dO * O) is computed beforehand by ``attn_bwd_delta_kernel``. Hooks and
constexprs are those of the forward kernel (see forward.py); the dK/dV pass takes the
transposed range function and lists. With TMA the tiles of Q, K, V and dO are read
through tensor descriptors (see forward.py).

With s_in the score a score_mod receives and s = score_mod(s_in):
dS = P * (dP - Delta) is d loss / d s; the score mod's ``SCORE_DERIV`` turns it into
d loss / d s_in, the softcap chain rule into d loss / d (scale * q.k). The dK/dV pass
works on transposed tiles (S^T), so hooks get transposed position tiles there. The
gradients of a score mod's tensors are accumulated in the dQ pass only (every
(query tile, key tile, head) is visited exactly once there), by ``SCORE_GRADS_FN``.

Attention dropout (``DROPOUT``): both passes regenerate the forward's keep bits. With
Z the keep mask and r = 1 / (1 - p), out = (P * Z * r) V, so dV = (P * Z)^T dO * r
(r applied once, at the end) and dP = (dO V^T) * Z * r; Delta = rowsum(dO * O) is
rowsum(P * dP) as without dropout, so dS = P * (dP - Delta) keeps its form.
"""

import triton
import triton.language as tl

from .common import (
    LOG2E,
    block_index,
    head_rows,
    load_resident,
    load_rows,
    mod_positions,
    scores,
    segments,
    sequence_bounds,
    tile_source,
    token_mask,
)
from .dropout import dropout_keep


@triton.jit
def attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                          stride_lb, stride_lh, num_heads, seqlen, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """Delta = rowsum(dO * O) in float32 for BLOCK_M rows of one (batch, head): O and dO
    (B, H, N, Dv) with a contiguous last dim, DELTA (B, H, N). One read of each, no
    temporaries (a packed varlen batch is B = 1 and needs nothing else)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_bh = tl.program_id(1)
    off_b = (off_bh // num_heads).to(tl.int64)
    off_h = (off_bh % num_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM_V)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom,
                 offs_n, offs_d, offs_dv, lo, hi, INDEX, seq, sm_scale, qk_scale, softcap, VARIANT_ARGS, SCORE_ARGS,
                 MASK_ARGS,
                 DROPOUT_ARGS, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr, SCORE_MOD: tl.constexpr,
                 SCORE_DERIV: tl.constexpr, MASK_MOD: tl.constexpr, LIST: tl.constexpr, SUB: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One segment of the dK/dV pass: query blocks lo .. hi - 1 against this program's keys."""
    seqlen_q = seq[2]
    seqlen_k = seq[3]
    for it in range(lo, hi):
        start_m = block_index(it, INDEX, LIST, SUB) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_rows(q_src, start_m, stride_qm, offs_m, seqlen_q, offs_d, HEAD_DIM, CHECK_M, PAD_D, TMA)
        do = load_rows(do_src, start_m, stride_dom, offs_m, seqlen_q, offs_dv, HEAD_DIM_V, CHECK_M, PAD_DV, TMA)
        if CHECK_M:
            lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Rows that saw no key have lse = -inf; +inf makes their P exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        if SCORE_MOD is None and not HAS_SOFTCAP:  # the scale folded into the exp2 argument: one FMA
            p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        else:
            s_t, s_in_t, t_t = scores(qk_t, offs_m[None, :], offs_n[:, None], seq, sm_scale, softcap, VARIANT_ARGS,
                                      SCORE_ARGS, POSITIONS, SCORE_MOD, HAS_SOFTCAP)
            p_t = tl.math.exp2(s_t - lse[None, :])
        if VARIANT_MASK is not None or MASK_MOD is not None:
            keep = token_mask(offs_m[None, :], offs_n[:, None], seq, VARIANT_ARGS, MASK_ARGS, VARIANT_MASK,
                              POSITIONS, MASK_MOD)
            p_t = tl.where(keep, p_t, 0.0)
        if CHECK_M:
            p_t = tl.where(offs_m[None, :] < seqlen_q, p_t, 0.0)
        if CHECK_N:
            p_t = tl.where(offs_n[:, None] < seqlen_k, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep_t = dropout_keep(offs_m[None, :], offs_n[:, None], seq, VARIANT_ARGS, POSITIONS, DROPOUT_ARGS)
            dv = tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * DROPOUT_ARGS[2], 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SCORE_DERIV is not None:
            b, h, q_idx, kv_idx = mod_positions(offs_m[None, :], offs_n[:, None], seq, VARIANT_ARGS, POSITIONS)
            # where P is 0 the pair did not attend: keep a derivative that is inf there from making NaN
            ds_t = tl.where(p_t > 0.0, ds_t * SCORE_DERIV(s_in_t, b, h, q_idx, kv_idx, *SCORE_ARGS), 0.0)
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    num_heads_kv, groups, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
    sm_scale, softcap,
    VARIANT_ARGS, LISTS, SCORE_ARGS, MASK_ARGS, DROPOUT_ARGS,
    RANGE_FN: tl.constexpr, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_DERIV: tl.constexpr, MASK_MOD: tl.constexpr, MASK_FULL_BLOCKS: tl.constexpr,
    LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads_kv
    off_hk = off_bh % num_heads_kv
    tensor_b, q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(off_b, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
                                                                     VARLEN)
    if start_n < seqlen_k:
        CHECK_M: tl.constexpr = not EVEN_M
        CHECK_N: tl.constexpr = not EVEN_N
        PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
        PAD_DV: tl.constexpr = HEAD_DIM_V != BLOCK_DV
        LIST: tl.constexpr = LISTS is not None
        SUB: tl.constexpr = LIST_BQ // BLOCK_M
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        tb = tensor_b.to(tl.int64)
        k_row = k_start.to(tl.int64)
        q_row = q_start.to(tl.int64)
        k_base = head_rows(K, tb, off_hk, k_row, stride_kb, stride_kh, stride_kn)
        v_base = head_rows(V, tb, off_hk, k_row, stride_vb, stride_vh, stride_vn)
        k = load_resident(k_base, start_n, stride_kn, offs_n, seqlen_k, offs_d, HEAD_DIM, BLOCK_N, BLOCK_D,
                          CHECK_N, PAD_D, TMA)
        v = load_resident(v_base, start_n, stride_vn, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, BLOCK_N, BLOCK_DV,
                          CHECK_N, PAD_DV, TMA)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for g in range(groups):
            off_h = off_hk * groups + g
            q_src = tile_source(head_rows(Q, tb, off_h, q_row, stride_qb, stride_qh, stride_qm), seqlen_q,
                                stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
            do_src = tile_source(head_rows(DO, tb, off_h, q_row, stride_dob, stride_doh, stride_dom), seqlen_q,
                                 stride_dom, HEAD_DIM_V, BLOCK_M, BLOCK_DV, TMA)
            lse_base = head_rows(LSE, tb, off_h, q_row, stride_lb, stride_lh, 1)
            delta_base = head_rows(DELTA, tb, off_h, q_row, stride_lb, stride_lh, 1)
            seq = (off_b, off_h, seqlen_q, seqlen_k)
            ranges, index = segments(start_n // LIST_BK, start_n, BLOCK_M, BLOCK_N, seq, RANGE_FN, LISTS,
                                     VARIANT_ARGS, SUB)
            for seg in tl.static_range(len(ranges)):
                dk, dv = _dkdv_blocks(
                    dk, dv, k, v, q_src, do_src, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, ranges[seg][0], ranges[seg][1], index[seg if LIST else 0], seq,
                    sm_scale, sm_scale * 1.4426950408889634, softcap, VARIANT_ARGS, SCORE_ARGS, MASK_ARGS, DROPOUT_ARGS,
                    VARIANT_MASK if seg > 0 else None, POSITIONS, SCORE_MOD, SCORE_DERIV,
                    MASK_MOD if seg > 0 or MASK_FULL_BLOCKS else None, LIST, SUB, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DROPOUT, DOT_PRECISION, TMA)
        dk = dk * sm_scale
        if DROPOUT:
            dv = dv * DROPOUT_ARGS[2]
        mask_nd = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        mask_ndv = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
        tl.store(head_rows(DK, tb, off_hk, k_row, stride_dkb, stride_dkh, stride_dkn) + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(head_rows(DV, tb, off_hk, k_row, stride_dvb, stride_dvh, stride_dvn) + offs_n[:, None] * stride_dvn
                 + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=mask_ndv)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
               lo, hi, INDEX, seq, sm_scale, qk_scale, softcap, VARIANT_ARGS, SCORE_ARGS, SCORE_GRADS, MASK_ARGS,
               DROPOUT_ARGS,
               VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr, SCORE_MOD: tl.constexpr,
               SCORE_DERIV: tl.constexpr, SCORE_GRADS_FN: tl.constexpr, MASK_MOD: tl.constexpr,
               LIST: tl.constexpr, SUB: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, CHECK_M: tl.constexpr, CHECK_N: tl.constexpr,
               PAD_D: tl.constexpr, PAD_DV: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    """One segment of the dQ pass: key blocks lo .. hi - 1 against this program's queries."""
    seqlen_q = seq[2]
    seqlen_k = seq[3]
    for it in range(lo, hi):
        start_n = block_index(it, INDEX, LIST, SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_src, start_n, stride_kn, offs_n, seqlen_k, offs_d, HEAD_DIM, CHECK_N, PAD_D, TMA)
        v = load_rows(v_src, start_n, stride_vn, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, CHECK_N, PAD_DV, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SCORE_MOD is None and not HAS_SOFTCAP:  # the scale folded into the exp2 argument: one FMA
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        else:
            s, s_in, t = scores(qk, offs_m[:, None], offs_n[None, :], seq, sm_scale, softcap, VARIANT_ARGS,
                                SCORE_ARGS, POSITIONS, SCORE_MOD, HAS_SOFTCAP)
            p = tl.math.exp2(s - lse[:, None])
        if VARIANT_MASK is not None or MASK_MOD is not None:
            keep = token_mask(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, MASK_ARGS, VARIANT_MASK,
                              POSITIONS, MASK_MOD)
            p = tl.where(keep, p, 0.0)
        if CHECK_N:
            p = tl.where(offs_n[None, :] < seqlen_k, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, POSITIONS, DROPOUT_ARGS)
            dp = tl.where(keep, dp * DROPOUT_ARGS[2], 0.0)
        ds = p * (dp - delta[:, None])
        if SCORE_GRADS_FN is not None:
            if CHECK_M:  # padding rows must add nothing to a tensor's gradient
                ds = tl.where(offs_m[:, None] < seqlen_q, ds, 0.0)
            b, h, q_idx, kv_idx = mod_positions(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, POSITIONS)
            SCORE_GRADS_FN(ds, s_in, b, h, q_idx, kv_idx, *SCORE_ARGS, *SCORE_GRADS)
        if SCORE_DERIV is not None:
            b, h, q_idx, kv_idx = mod_positions(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, POSITIONS)
            ds = tl.where(p > 0.0, ds * SCORE_DERIV(s_in, b, h, q_idx, kv_idx, *SCORE_ARGS), 0.0)
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh,
    num_heads_q, groups, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
    sm_scale, softcap,
    VARIANT_ARGS, LISTS, SCORE_ARGS, SCORE_GRADS, MASK_ARGS, DROPOUT_ARGS,
    RANGE_FN: tl.constexpr, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_DERIV: tl.constexpr, SCORE_GRADS_FN: tl.constexpr, MASK_MOD: tl.constexpr,
    MASK_FULL_BLOCKS: tl.constexpr, LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    tensor_b, q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(off_b, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
                                                                     VARLEN)
    if start_m < seqlen_q:
        CHECK_M: tl.constexpr = not EVEN_M
        CHECK_N: tl.constexpr = not EVEN_N
        PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
        PAD_DV: tl.constexpr = HEAD_DIM_V != BLOCK_DV
        LIST: tl.constexpr = LISTS is not None
        SUB: tl.constexpr = LIST_BK // BLOCK_N
        off_hk = off_h // groups
        tb = tensor_b.to(tl.int64)
        q_row = q_start.to(tl.int64)
        k_row = k_start.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_base = head_rows(Q, tb, off_h, q_row, stride_qb, stride_qh, stride_qm)
        do_base = head_rows(DO, tb, off_h, q_row, stride_dob, stride_doh, stride_dom)
        q = load_resident(q_base, start_m, stride_qm, offs_m, seqlen_q, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D,
                          CHECK_M, PAD_D, TMA)
        do = load_resident(do_base, start_m, stride_dom, offs_m, seqlen_q, offs_dv, HEAD_DIM_V, BLOCK_M, BLOCK_DV,
                           CHECK_M, PAD_DV, TMA)
        lse = tl.load(head_rows(LSE, tb, off_h, q_row, stride_lb, stride_lh, 1) + offs_m, mask=offs_m < seqlen_q,
                      other=0.0)
        delta = tl.load(head_rows(DELTA, tb, off_h, q_row, stride_lb, stride_lh, 1) + offs_m, mask=offs_m < seqlen_q,
                        other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        k_src = tile_source(head_rows(K, tb, off_hk, k_row, stride_kb, stride_kh, stride_kn), seqlen_k,
                            stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
        v_src = tile_source(head_rows(V, tb, off_hk, k_row, stride_vb, stride_vh, stride_vn), seqlen_k,
                            stride_vn, HEAD_DIM_V, BLOCK_N, BLOCK_DV, TMA)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        seq = (off_b, off_h, seqlen_q, seqlen_k)
        ranges, index = segments(start_m // LIST_BQ, start_m, BLOCK_M, BLOCK_N, seq, RANGE_FN, LISTS, VARIANT_ARGS,
                                 SUB)
        for seg in tl.static_range(len(ranges)):
            dq = _dq_blocks(dq, q, do, lse, delta, k_src, v_src, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                            ranges[seg][0], ranges[seg][1], index[seg if LIST else 0], seq, sm_scale,
                            sm_scale * 1.4426950408889634, softcap,
                            VARIANT_ARGS, SCORE_ARGS, SCORE_GRADS, MASK_ARGS, DROPOUT_ARGS,
                            VARIANT_MASK if seg > 0 else None, POSITIONS, SCORE_MOD, SCORE_DERIV, SCORE_GRADS_FN,
                            MASK_MOD if seg > 0 or MASK_FULL_BLOCKS else None, LIST, SUB, BLOCK_N, HEAD_DIM,
                            HEAD_DIM_V, CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DROPOUT, DOT_PRECISION, TMA)
        dq = dq * sm_scale
        tl.store(head_rows(DQ, tb, off_h, q_row, stride_dqb, stride_dqh, stride_dqm) + offs_m[:, None] * stride_dqm
                 + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
