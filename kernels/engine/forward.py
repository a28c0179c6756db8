"""Forward kernel of the fused softmax-attention engine (FlashAttention-2 algorithm).

One program owns BLOCK_M query rows of one (batch, query head) and streams the key
blocks its schedule names, keeping an online softmax in registers. A variant plugs
in through three @triton.jit functions passed as constexprs:

* ``KV_RANGE(start_m, BLOCK_M, BLOCK_N, *ctx)`` -> (full_lo, full_hi, p0_lo, p0_hi,
  p1_lo, p1_hi, p2_lo, p2_hi): key-block ranges, ``full`` visited without the mask,
  the three partial ranges with it (range mode);
* or per-query-block lists of key blocks, split into full and partial (list mode);
* ``MASK(q_pos, k_pos, *ctx)`` -> bool: the token mask inside partial blocks.

``ctx`` is always (off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_stride_b,
mask_stride_h, mask_arg0, mask_arg1, MASK_CFG); a variant reads what it needs.
Keys at or past seqlen_k are masked by the engine itself, in every block.
"""

import triton
import triton.language as tl

from .common import LN2, block_index, list_entries, load_tile, scores_log2, sequence_bounds


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
               offs_m, offs_d, offs_dv, lo, hi, IDX_PTR,
               sm_scale, softcap,
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
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
        if APPLY_MASK:
            keep = MASK_FN(offs_m[:, None], offs_n[None, :], off_b, off_h, seqlen_q, seqlen_k,
                           MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
            s = tl.where(keep, s, float("-inf"))
        if CHECK_N:
            s = tl.where(offs_n[None, :] < seqlen_k, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 instead so no NaN appears.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, seqlen_k,
                      offs_dv, HEAD_DIM_V, CHECK_N, PAD_DV)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, SINK,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    num_heads_q, groups, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
    sm_scale, softcap,
    MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
    CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
    cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr,
    MASK_FN: tl.constexpr, MASK_CFG: tl.constexpr, RANGE_FN: tl.constexpr,
    LIST: tl.constexpr, LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
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
        off_hk = off_h // groups
        q_base = Q + tensor_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
        k_base = K + tensor_b.to(tl.int64) * stride_kb + off_hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
        v_base = V + tensor_b.to(tl.int64) * stride_vb + off_hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        CHECK_M: tl.constexpr = not EVEN_M
        CHECK_N: tl.constexpr = not EVEN_N
        PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
        PAD_DV: tl.constexpr = HEAD_DIM_V != BLOCK_DV
        q = load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d, HEAD_DIM,
                      CHECK_M, PAD_D)

        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        if HAS_SINK:
            # The sink is one extra logit with no value: start the running max at it with mass 1.
            sink = tl.load(SINK + off_h).to(tl.float32) * 1.4426950408889634
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        else:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        if LIST:
            SUB: tl.constexpr = LIST_BK // BLOCK_N
            row = start_m // LIST_BQ
            n_full, full_idx, n_part, part_idx = list_entries(
                row, off_b, off_h, CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
                cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                0, n_full * SUB, full_idx, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, False, True, SUB, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                0, n_part * SUB, part_idx, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, True, True, SUB, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)
        else:
            f_lo, f_hi, a_lo, a_hi, b_lo, b_hi, c_lo, c_hi = RANGE_FN(
                start_m, BLOCK_M, BLOCK_N, off_b, off_h, seqlen_q, seqlen_k,
                MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1, MASK_CFG)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                f_lo, f_hi, None, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, False, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                a_lo, a_hi, None, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                b_lo, b_hi, None, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                c_lo, c_hi, None, sm_scale, softcap,
                off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0, mask_a1,
                MASK_FN, MASK_CFG, True, False, 1, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV,
                HAS_SOFTCAP, DOT_PRECISION)

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        o_base = O + tensor_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
        o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :]
        if CHECK_M or PAD_DV:
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty))
        l_ptrs = LSE + tensor_b.to(tl.int64) * stride_lb + off_h.to(tl.int64) * stride_lh + q_start + offs_m
        if CHECK_M:
            tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)
        else:
            tl.store(l_ptrs, lse)
