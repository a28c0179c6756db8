"""Backward kernels of the fused softmax-attention engine (FlashAttention-2 algorithm).

Two passes, neither with atomics: ``attn_bwd_dkdv_kernel`` owns a block of keys of
one kv head and walks the query blocks that see it (the transposed schedule), for
every query head of its GQA group; ``attn_bwd_dq_kernel`` owns a block of queries
and walks its forward schedule. Both recompute P from the saved LSE. Delta =
rowsum(dO * O) is computed beforehand. Schedules, masks and ``ctx`` are those of
the forward kernel (see forward.py); ``Q_RANGE`` is the transposed range function.
"""

import triton
import triton.language as tl

from .common import LOG2E, block_index, list_entries, load_tile, scores_log2, sequence_bounds


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                offs_n, offs_d, offs_dv, lo, hi, IDX_PTR, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN: tl.constexpr, MASK_CFG: tl.constexpr, APPLY_MASK: tl.constexpr,
                LIST: tl.constexpr, SUB: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                CHECK_M: tl.constexpr, CHECK_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for it in range(lo, hi):
        blk = block_index(it, IDX_PTR, LIST, SUB)
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        q = load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM,
                      CHECK_M, PAD_D)
        do = load_tile(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv,
                       HEAD_DIM_V, CHECK_M, PAD_DV)
        if CHECK_M:
            lse = tl.load(lse_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Rows that saw no key have lse = -inf; +inf makes their P exactly 0.
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        s_t, t_t = scores_log2(qk_t, sm_scale, softcap, HAS_SOFTCAP)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if APPLY_MASK:
            keep = MASK_FN(offs_m[None, :], offs_n[:, None], off_b, off_h, seqlen_q, seqlen_k,
                           MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
            p_t = tl.where(keep, p_t, 0.0)
        if CHECK_M:
            p_t = tl.where(offs_m[None, :] < seqlen_q, p_t, 0.0)
        if CHECK_N:
            p_t = tl.where(offs_n[:, None] < seqlen_k, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
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
    MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
    CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
    cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr,
    MASK_FN: tl.constexpr, MASK_CFG: tl.constexpr, RANGE_FN: tl.constexpr,
    LIST: tl.constexpr, LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        tb = tensor_b.to(tl.int64)
        k_row = k_start.to(tl.int64)
        q_row = q_start.to(tl.int64)
        k = load_tile(K + tb * stride_kb + off_hk.to(tl.int64) * stride_kh + (k_row + offs_n[:, None]) * stride_kn
                      + offs_d[None, :], offs_n, seqlen_k, offs_d, HEAD_DIM, CHECK_N, PAD_D)
        v = load_tile(V + tb * stride_vb + off_hk.to(tl.int64) * stride_vh + (k_row + offs_n[:, None]) * stride_vn
                      + offs_dv[None, :], offs_n, seqlen_k, offs_dv, HEAD_DIM_V, CHECK_N, PAD_DV)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for g in range(0, groups):
            off_h = off_hk * groups + g
            q_base = Q + tb * stride_qb + off_h.to(tl.int64) * stride_qh + q_row * stride_qm
            do_base = DO + tb * stride_dob + off_h.to(tl.int64) * stride_doh + q_row * stride_dom
            lse_base = LSE + tb * stride_lb + off_h.to(tl.int64) * stride_lh + q_row
            delta_base = DELTA + tb * stride_lb + off_h.to(tl.int64) * stride_lh + q_row
            if LIST:
                SUB: tl.constexpr = LIST_BQ // BLOCK_M
                col = start_n // LIST_BK
                n_full, full_idx, n_part, part_idx = list_entries(
                    col, off_b, off_h, CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
                    cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, 0, n_full * SUB, full_idx, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, False, True, SUB, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, 0, n_part * SUB, part_idx, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, True, True, SUB, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
            else:
                f_lo, f_hi, a_lo, a_hi, b_lo, b_hi, c_lo, c_hi = RANGE_FN(
                    start_n, BLOCK_M, BLOCK_N, off_b, off_h, seqlen_q, seqlen_k,
                    MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, f_lo, f_hi, None, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, False, False, 1, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, a_lo, a_hi, None, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, True, False, 1, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, b_lo, b_hi, None, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, True, False, 1, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
                dk, dv = _dkdv_inner(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                    offs_n, offs_d, offs_dv, c_lo, c_hi, None, sm_scale, softcap,
                    off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                    MASK_FN, MASK_CFG, True, False, 1, BLOCK_M, HEAD_DIM, HEAD_DIM_V,
                    CHECK_M, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
        dk = dk * sm_scale
        mask_nd = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        mask_ndv = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
        tl.store(DK + tb * stride_dkb + off_hk.to(tl.int64) * stride_dkh + (k_row + offs_n[:, None]) * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + tb * stride_dvb + off_hk.to(tl.int64) * stride_dvh + (k_row + offs_n[:, None]) * stride_dvn
                 + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=mask_ndv)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
              offs_m, offs_d, offs_dv, lo, hi, IDX_PTR, sm_scale, softcap,
              off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
              MASK_FN: tl.constexpr, MASK_CFG: tl.constexpr, APPLY_MASK: tl.constexpr,
              LIST: tl.constexpr, SUB: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              CHECK_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for it in range(lo, hi):
        blk = block_index(it, IDX_PTR, LIST, SUB)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        k = load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, seqlen_k,
                      offs_d, HEAD_DIM, CHECK_N, PAD_D)
        v = load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, seqlen_k,
                      offs_dv, HEAD_DIM_V, CHECK_N, PAD_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, t = scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])
        if APPLY_MASK:
            keep = MASK_FN(offs_m[:, None], offs_n[None, :], off_b, off_h, seqlen_q, seqlen_k,
                           MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
            p = tl.where(keep, p, 0.0)
        if CHECK_N:
            p = tl.where(offs_n[None, :] < seqlen_k, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
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
    MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
    CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
    cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr,
    MASK_FN: tl.constexpr, MASK_CFG: tl.constexpr, RANGE_FN: tl.constexpr,
    LIST: tl.constexpr, LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        off_hk = off_h // groups
        tb = tensor_b.to(tl.int64)
        q_row = q_start.to(tl.int64)
        k_row = k_start.to(tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = load_tile(Q + tb * stride_qb + off_h.to(tl.int64) * stride_qh + (q_row + offs_m[:, None]) * stride_qm
                      + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM, CHECK_M, PAD_D)
        do = load_tile(DO + tb * stride_dob + off_h.to(tl.int64) * stride_doh + (q_row + offs_m[:, None]) * stride_dom
                       + offs_dv[None, :], offs_m, seqlen_q, offs_dv, HEAD_DIM_V, CHECK_M, PAD_DV)
        l_ptrs = tb * stride_lb + off_h.to(tl.int64) * stride_lh + q_row + offs_m
        lse = tl.load(LSE + l_ptrs, mask=offs_m < seqlen_q, other=0.0)
        delta = tl.load(DELTA + l_ptrs, mask=offs_m < seqlen_q, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
        k_base = K + tb * stride_kb + off_hk.to(tl.int64) * stride_kh + k_row * stride_kn
        v_base = V + tb * stride_vb + off_hk.to(tl.int64) * stride_vh + k_row * stride_vn
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if LIST:
            SUB: tl.constexpr = LIST_BK // BLOCK_N
            row = start_m // LIST_BQ
            n_full, full_idx, n_part, part_idx = list_entries(
                row, off_b, off_h, CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
                cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           0, n_full * SUB, full_idx, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, False, True, SUB, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           0, n_part * SUB, part_idx, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, True, True, SUB, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
        else:
            f_lo, f_hi, a_lo, a_hi, b_lo, b_hi, c_lo, c_hi = RANGE_FN(
                start_m, BLOCK_M, BLOCK_N, off_b, off_h, seqlen_q, seqlen_k,
                MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           f_lo, f_hi, None, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, False, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           a_lo, a_hi, None, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           b_lo, b_hi, None, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                           c_lo, c_hi, None, sm_scale, softcap,
                           off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                           MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D,
                           PAD_DV, HAS_SOFTCAP, DOT_PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + tb * stride_dqb + off_h.to(tl.int64) * stride_dqh + (q_row + offs_m[:, None]) * stride_dqm
                 + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
