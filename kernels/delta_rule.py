"""The (gated) delta rule in chunks: flash-linear-attention's ``chunk_gated_delta_rule``
scheme in three forward and two backward kernels (the math: ``attnkit.delta_rule.torch_backend`` and docs/linear.md).

Per (sequence, head), chunks of C = BLOCK_C rows; inside a chunk G_i = g_1 + ... + g_i
(cumulative log-gate, 0 without gates), gamma_i = exp(G_i):

1. ``delta_rule_prep_kernel``, one program per (chunk, batch x head): the WY/UT factors
   A_ij = beta_i exp(G_i - G_j) k_i . k_j (j < i), T = (I + A)^-1 by forward substitution,
   W = T diag(beta gamma) K (C, Dk) and U = T diag(beta) V (C, Dv).
2. ``delta_rule_state_kernel``, one program per (Dv block, sequence x head), walks the
   chunks in order with the state S (Dk, BLOCK_V) in fp32 registers: it stores S (the
   chunk's incoming state), V_new = U - W S (the values each row really writes), and
   steps S <- gamma_C S + (exp(G_C - G_j) k_j)^T V_new. Only this pass is sequential.
3. ``delta_rule_out_kernel``, one program per (Dv block, chunk, batch x head), all chunks
   at once: O = scale (gamma Q S_in + (Q K^T o exp(G_i - G_j), j <= i) V_new).

The backward reruns 1 and 2 (1 also storing T), then:

4. ``delta_rule_dstate_kernel``, the reverse of 2: from the last chunk back, with dS (the
   gradient of the chunk's outgoing state) in fp32 registers, it stores dS and
   dV_new = scale P^T dO + K~ dS, and steps dS <- gamma_C dS + scale (gamma Q)^T dO - W^T dV_new;
   the last dS is d initial_state.
5. ``delta_rule_bwd_chunk_kernel``, one program per chunk, all chunks at once: dq, dk, dv,
   dbeta and dg from S, dS, V_new and dV_new (through dA = -T^T dT T^T for the inverse).

Every exponent is a difference G_i - G_j <= 0 or a G_i <= 0, so nothing overflows. Rows
past a sequence's end load as zeros with g = 0, beta = 0: they write nothing and their
(padded) rows of W, U and V_new are zero.

Packed sequences (VARLEN, B = 1, CU_SEQLENS (S + 1,) int32): chunks are cut per sequence;
CHUNKS (NT, 2) int32 holds each chunk's (sequence, index in the sequence) and FIRST (S,)
each sequence's first chunk, so a chunk never crosses a sequence boundary.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import block_dim, new_output
from .sequences import sequence_span

#: rows per chunk (flash-linear-attention's chunk size)
CHUNK = 64


@triton.jit
def _chunk_rows(pid_c, off_b, CHUNKS, CU_SEQLENS, seqlen, BLOCK_C: tl.constexpr, VARLEN: tl.constexpr):
    """Token rows of chunk ``pid_c`` of batch row ``off_b``: (first token row, end row)."""
    if VARLEN:
        seq = tl.load(CHUNKS + 2 * pid_c)
        idx = tl.load(CHUNKS + 2 * pid_c + 1)
        bos = tl.load(CU_SEQLENS + seq).to(tl.int64)
        eos = tl.load(CU_SEQLENS + seq + 1).to(tl.int64)
        start = bos + idx.to(tl.int64) * BLOCK_C
    else:
        start = pid_c.to(tl.int64) * BLOCK_C
        eos = seqlen
    return start, eos


@triton.jit
def _cum_gates(G, g_base, rows, valid, HAS_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """G_i = g_1 + ... + g_i inside the chunk (fp32, zeros without gates)."""
    if HAS_G:
        g = tl.load(G + g_base + rows, mask=valid, other=0.0).to(tl.float32)
        return tl.cumsum(g, 0)
    return tl.zeros([BLOCK_C], dtype=tl.float32)


@triton.jit
def delta_rule_prep_kernel(
    K, V, BETA, G, W, U, TT, CHUNKS, CU_SEQLENS,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh,
    stride_wb, stride_wh, stride_wn,
    stride_ub, stride_uh, stride_un,
    num_heads, seqlen,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_T: tl.constexpr,
):
    """TT (STORE_T, for the backward): fp32 (B, H, NT * C, C), the chunks' T, laid out like W."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start, end = _chunk_rows(pid_c, off_b, CHUNKS, CU_SEQLENS, seqlen, BLOCK_C, VARLEN)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start + offs_c
    valid = rows < end
    k_base = K + off_b * stride_kb + off_h * stride_kh + rows[:, None] * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + rows[:, None] * stride_vn
    g_base = off_b * stride_gb + off_h * stride_gh
    out_rows = pid_c.to(tl.int64) * BLOCK_C + offs_c   # this chunk's rows in W and U
    w_base = W + off_b * stride_wb + off_h * stride_wh + out_rows[:, None] * stride_wn
    u_base = U + off_b * stride_ub + off_h * stride_uh + out_rows[:, None] * stride_un

    beta = tl.load(BETA + g_base + rows, mask=valid, other=0.0).to(tl.float32)
    gates = _cum_gates(G, g_base, rows, valid, HAS_G, BLOCK_C)

    # K K^T over the key dim in BLOCK_D slices (fp32 accumulation)
    kk = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    for d0 in tl.static_range(0, DIM_K, BLOCK_D):
        cols = d0 + offs_d
        k = tl.load(k_base + cols[None, :], mask=valid[:, None] & (cols[None, :] < DIM_K), other=0.0)
        kk += tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)
    strict = offs_c[:, None] > offs_c[None, :]
    decay = tl.exp(tl.where(strict, gates[:, None] - gates[None, :], float("-inf")))
    # L = -A (strictly lower); T = (I - L)^-1 row by row: T_i = e_i + sum_{j<i} L_ij T_j. When row
    # i is formed, rows j < i of ``t`` hold T_j - e_j (zero from column j on) and L_ij = 0 for
    # j >= i, so sum_j L_ij t_j needs no mask. Rows past the end (beta = 0) stay e_i: the loop
    # stops at the chunk's length.
    t = -(beta[:, None] * kk * decay)
    for i in range(1, tl.minimum(end - start, BLOCK_C)):
        is_i = offs_c[:, None] == i
        row = tl.sum(tl.where(is_i, t, 0.0), 0)
        row = row + tl.sum(row[:, None] * t, 0)
        t = tl.where(is_i, row[None, :], t)
    t = t + (offs_c[:, None] == offs_c[None, :]).to(tl.float32)
    if STORE_T:
        t_rows = (off_b * num_heads + off_h) * (tl.num_programs(0) * BLOCK_C) + out_rows
        tl.store(TT + t_rows[:, None] * BLOCK_C + offs_c[None, :], t)
    t_op = t.to(W.dtype.element_ty)

    # W = T diag(beta gamma) K, U = T diag(beta) V, written in BLOCK_D column slices
    bk = beta * tl.exp(gates)
    for d0 in tl.static_range(0, DIM_K, BLOCK_D):
        cols = d0 + offs_d
        k = tl.load(k_base + cols[None, :], mask=valid[:, None] & (cols[None, :] < DIM_K), other=0.0)
        w = tl.dot(t_op, (k.to(tl.float32) * bk[:, None]).to(W.dtype.element_ty), input_precision=DOT_PRECISION)
        tl.store(w_base + cols[None, :], w.to(W.dtype.element_ty), mask=cols[None, :] < DIM_K)
    for d0 in tl.static_range(0, DIM_V, BLOCK_D):
        cols = d0 + offs_d
        v = tl.load(v_base + cols[None, :], mask=valid[:, None] & (cols[None, :] < DIM_V), other=0.0)
        u = tl.dot(t_op, (v.to(tl.float32) * beta[:, None]).to(U.dtype.element_ty), input_precision=DOT_PRECISION)
        tl.store(u_base + cols[None, :], u.to(U.dtype.element_ty), mask=cols[None, :] < DIM_V)


@triton.jit
def _walk_start(S_IN, FIRST, CU_SEQLENS, stride_sb, stride_sh, stride_sr, num_heads, seqlen, DIM_K: tl.constexpr,
                DIM_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_S_IN: tl.constexpr,
                VARLEN: tl.constexpr):
    """Where a program of a sequential walk over chunks (the forward state pass, the backward's
    reverse pass; grid (Dv block, sequence x head)) starts: its state row and head, the
    sequence's span (sequence_span) and first chunk, its (Dk, BLOCK_V) state slice (columns,
    masks, offsets into S_IN-shaped tensors) and that slice's starting value, read from S_IN
    (fp32) or zero."""
    off_s = (tl.program_id(1) // num_heads).to(tl.int64)   # batch entry, or packed sequence (its state row)
    off_h = (tl.program_id(1) % num_heads).to(tl.int64)
    off_b, bos, seqlen = sequence_span(off_s, seqlen, CU_SEQLENS, VARLEN)
    if VARLEN:
        first = tl.load(FIRST + off_s).to(tl.int64)
    else:
        first = off_s * 0
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_k = offs_k < DIM_K
    mask_v = offs_v < DIM_V
    s_mask = mask_k[:, None] & mask_v[None, :]
    s_off = off_s * stride_sb + off_h * stride_sh + offs_k[:, None] * stride_sr + offs_v[None, :]
    if HAS_S_IN:
        state = tl.load(S_IN + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    return off_s, off_h, off_b, bos, seqlen, first, offs_k, offs_v, mask_k, mask_v, s_mask, s_off, state


@triton.jit
def delta_rule_state_kernel(
    K, W, U, VNEW, HS, G, S0, SN, FIRST, CU_SEQLENS,
    stride_kb, stride_kh, stride_kn,
    stride_wb, stride_wh, stride_wn,
    stride_ub, stride_uh, stride_un,
    stride_gb, stride_gh,
    stride_hb, stride_hh, stride_hc, stride_hr,
    stride_sb, stride_sh, stride_sr,
    num_heads, seqlen,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_G: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """S0 and SN: fp32 (B or S, H, Dk, Dv), last stride 1. HS: (B, H, NT, Dk, Dv), last stride 1."""
    off_s, off_h, off_b, bos, seqlen, first, offs_k, offs_v, mask_k, mask_v, s_mask, s_off, state = (
        _walk_start(
            S0, FIRST, CU_SEQLENS, stride_sb, stride_sh, stride_sr, num_heads, seqlen, DIM_K, DIM_V, BLOCK_K,
            BLOCK_V, HAS_S0, VARLEN))
    offs_c = tl.arange(0, BLOCK_C)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    w_base = W + off_b * stride_wb + off_h * stride_wh
    u_base = U + off_b * stride_ub + off_h * stride_uh
    n_base = VNEW + off_b * stride_ub + off_h * stride_uh
    h_base = HS + off_b * stride_hb + off_h * stride_hh + offs_k[:, None] * stride_hr + offs_v[None, :]
    g_base = off_b * stride_gb + off_h * stride_gh

    for c in range(tl.cdiv(seqlen, BLOCK_C)):
        chunk = first + c
        tl.store(h_base + chunk * stride_hc, state.to(HS.dtype.element_ty), mask=s_mask)
        rows = bos + c * BLOCK_C + offs_c            # token rows
        valid = rows < bos + seqlen
        buf = chunk * BLOCK_C + offs_c               # rows of W, U and V_new (padded per chunk)
        w = tl.load(w_base + buf[:, None] * stride_wn + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        u = tl.load(u_base + buf[:, None] * stride_un + offs_v[None, :], mask=mask_v[None, :], other=0.0)
        v_new = u.to(tl.float32) - tl.dot(w, state.to(w.dtype), input_precision=DOT_PRECISION)
        tl.store(n_base + buf[:, None] * stride_un + offs_v[None, :], v_new.to(VNEW.dtype.element_ty),
                 mask=mask_v[None, :])
        gates = _cum_gates(G, g_base, rows, valid, HAS_G, BLOCK_C)
        g_last = tl.sum(tl.where(offs_c == BLOCK_C - 1, gates, 0.0), 0)   # padded rows carry the last G
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        k_dec = (k.to(tl.float32) * tl.exp(g_last - gates)[:, None]).to(w.dtype)
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_dec), v_new.to(w.dtype), input_precision=DOT_PRECISION)

    tl.store(SN + s_off, state, mask=s_mask)


@triton.jit
def delta_rule_out_kernel(
    Q, K, VNEW, HS, G, O, CHUNKS, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_ub, stride_uh, stride_un,
    stride_gb, stride_gh,
    stride_hb, stride_hh, stride_hc, stride_hr,
    stride_ob, stride_oh, stride_on,
    num_heads, seqlen, scale,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_G: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start, end = _chunk_rows(pid_c, off_b, CHUNKS, CU_SEQLENS, seqlen, BLOCK_C, VARLEN)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < DIM_V
    rows = start + offs_c
    valid = rows < end
    q_base = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qn
    k_base = K + off_b * stride_kb + off_h * stride_kh + rows[:, None] * stride_kn
    h_base = HS + off_b * stride_hb + off_h * stride_hh + pid_c.to(tl.int64) * stride_hc + offs_v[None, :]

    inter = tl.zeros([BLOCK_C, BLOCK_V], dtype=tl.float32)
    scores = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    for d0 in tl.static_range(0, DIM_K, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < DIM_K
        q = tl.load(q_base + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_base + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        h = tl.load(h_base + cols[:, None] * stride_hr, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        inter += tl.dot(q.to(h.dtype), h, input_precision=DOT_PRECISION)
        scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    gates = _cum_gates(G, off_b * stride_gb + off_h * stride_gh, rows, valid, HAS_G, BLOCK_C)
    causal = offs_c[:, None] >= offs_c[None, :]
    scores = scores * tl.exp(tl.where(causal, gates[:, None] - gates[None, :], float("-inf")))
    buf = pid_c.to(tl.int64) * BLOCK_C + offs_c
    v_new = tl.load(VNEW + off_b * stride_ub + off_h * stride_uh + buf[:, None] * stride_un + offs_v[None, :],
                    mask=mask_v[None, :], other=0.0)
    out = inter * tl.exp(gates)[:, None] + tl.dot(scores.to(v_new.dtype), v_new, input_precision=DOT_PRECISION)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on + offs_v[None, :]
    tl.store(o_ptrs, (out * scale).to(O.dtype.element_ty), mask=valid[:, None] & mask_v[None, :])


@triton.jit
def delta_rule_dstate_kernel(
    Q, K, W, DO, DVNEW, DHS, G, DSN, DS0, FIRST, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_wb, stride_wh, stride_wn,
    stride_ob, stride_oh, stride_on,
    stride_ub, stride_uh, stride_un,
    stride_gb, stride_gh,
    stride_hb, stride_hh, stride_hc, stride_hr,
    stride_sb, stride_sh, stride_sr,
    num_heads, seqlen, scale,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_G: tl.constexpr, HAS_DSN: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The backward's sequential pass, from the last chunk back, with dS (the gradient of the
    chunk's outgoing state) in fp32 registers: stores dS per chunk (DHS) and
    dV_new = scale (Q K^T o decay, j <= i)^T dO + K~ dS (DVNEW), and steps
    dS <- gamma_C dS + scale (gamma Q)^T dO - W^T dV_new. The last dS is d initial_state (DS0).
    DSN and DS0: fp32 (B or S, H, Dk, Dv), last stride 1."""
    off_s, off_h, off_b, bos, seqlen, first, offs_k, offs_v, mask_k, mask_v, s_mask, s_off, d_state = (
        _walk_start(
            DSN, FIRST, CU_SEQLENS, stride_sb, stride_sh, stride_sr, num_heads, seqlen, DIM_K, DIM_V, BLOCK_K,
            BLOCK_V, HAS_DSN, VARLEN))
    offs_c = tl.arange(0, BLOCK_C)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    w_base = W + off_b * stride_wb + off_h * stride_wh
    o_base = DO + off_b * stride_ob + off_h * stride_oh
    n_base = DVNEW + off_b * stride_ub + off_h * stride_uh
    h_base = DHS + off_b * stride_hb + off_h * stride_hh + offs_k[:, None] * stride_hr + offs_v[None, :]
    g_base = off_b * stride_gb + off_h * stride_gh
    visible = offs_c[None, :] >= offs_c[:, None]      # (j, i): row i sees column j

    n_chunks = tl.cdiv(seqlen, BLOCK_C)
    for it in range(n_chunks):
        c = n_chunks - 1 - it
        chunk = first + c
        tl.store(h_base + chunk * stride_hc, d_state.to(DHS.dtype.element_ty), mask=s_mask)
        rows = bos + c * BLOCK_C + offs_c
        valid = rows < bos + seqlen
        buf = chunk * BLOCK_C + offs_c
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0)
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0)
        do = tl.load(o_base + rows[:, None] * stride_on + offs_v[None, :], mask=valid[:, None] & mask_v[None, :],
                     other=0.0)
        gates = _cum_gates(G, g_base, rows, valid, HAS_G, BLOCK_C)
        g_last = tl.sum(tl.where(offs_c == BLOCK_C - 1, gates, 0.0), 0)
        # (K Q^T)_ji exp(G_i - G_j) for i >= j: the transposed intra-chunk scores
        kq = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        kq = kq * tl.exp(tl.where(visible, gates[None, :] - gates[:, None], float("-inf"))) * scale
        # the decays scale rows of the (C, BLOCK_V) products, not the (C, Dk) operands: fewer registers
        dv_new = (tl.dot(kq.to(k.dtype), do, input_precision=DOT_PRECISION)
                  + tl.dot(k, d_state.to(k.dtype), input_precision=DOT_PRECISION) * tl.exp(g_last - gates)[:, None])
        tl.store(n_base + buf[:, None] * stride_un + offs_v[None, :], dv_new.to(DVNEW.dtype.element_ty),
                 mask=mask_v[None, :])
        w = tl.load(w_base + buf[:, None] * stride_wn + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        do_dec = (do.to(tl.float32) * (tl.exp(gates) * scale)[:, None]).to(k.dtype)
        d_state = (d_state * tl.exp(g_last) + tl.dot(tl.trans(q), do_dec, input_precision=DOT_PRECISION)
                   - tl.dot(tl.trans(w), dv_new.to(w.dtype), input_precision=DOT_PRECISION))

    tl.store(DS0 + s_off, d_state, mask=s_mask)


@triton.jit
def delta_rule_bwd_chunk_kernel(
    Q, K, V, BETA, G, TT, HS, DHS, VNEW, DVNEW, DO, DQ, DK, DV, DBETA, DG, CHUNKS, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh,
    stride_hb, stride_hh, stride_hc, stride_hr,
    stride_ub, stride_uh, stride_un,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dvb, stride_dvh, stride_dvn,
    num_heads, seqlen, scale,
    DIM_K: tl.constexpr, DIM_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_G: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Every gradient of one chunk, all chunks at once, from the stored states S (HS), their
    gradients dS (DHS), V_new and dV_new. DQ and DK fp32 (B, H, N, Dk), DV fp32 (B, H, N, Dv),
    DBETA and DG fp32 with BETA's strides. Three sweeps: over value slices (dV, dT from U, dbeta),
    over key slices (dQ; dK but for the K K^T term; dT from W; dG), then over key slices again
    for dK's K K^T term once dT, and so dA = -T^T dT T^T, is complete (K K^T and Q K^T are formed
    there, not kept live through sweep 2). dg is the reverse cumulative sum of dG in the chunk."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start, end = _chunk_rows(pid_c, off_b, CHUNKS, CU_SEQLENS, seqlen, BLOCK_C, VARLEN)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start + offs_c
    valid = rows < end
    buf = pid_c.to(tl.int64) * BLOCK_C + offs_c
    g_base = off_b * stride_gb + off_h * stride_gh
    q_base = Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qn
    k_base = K + off_b * stride_kb + off_h * stride_kh + rows[:, None] * stride_kn
    v_base = V + off_b * stride_vb + off_h * stride_vh + rows[:, None] * stride_vn
    o_base = DO + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_on
    n_base = VNEW + off_b * stride_ub + off_h * stride_uh + buf[:, None] * stride_un
    dn_base = DVNEW + off_b * stride_ub + off_h * stride_uh + buf[:, None] * stride_un
    h_off = off_b * stride_hb + off_h * stride_hh + pid_c.to(tl.int64) * stride_hc
    dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqn
    dk_base = DK + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqn
    dv_base = DV + off_b * stride_dvb + off_h * stride_dvh + rows[:, None] * stride_dvn
    dtype = K.dtype.element_ty

    beta = tl.load(BETA + g_base + rows, mask=valid, other=0.0).to(tl.float32)
    gates = _cum_gates(G, g_base, rows, valid, HAS_G, BLOCK_C)
    gamma = tl.exp(gates)
    g_last = tl.sum(tl.where(offs_c == BLOCK_C - 1, gates, 0.0), 0)
    k_decay = tl.exp(g_last - gates)
    t_rows = (off_b * num_heads + off_h) * (tl.num_programs(0) * BLOCK_C) + buf
    t_ptrs = TT + t_rows[:, None] * BLOCK_C + offs_c[None, :]
    t_op = tl.load(t_ptrs).to(dtype)

    # sweep 1, value slices: dO V_new^T, dT from U = T diag(beta) V, dV = beta T^T dV_new, dbeta
    dov = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    d_t = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    d_beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    for e0 in range(0, DIM_V, BLOCK_D):
        cols = e0 + offs_d
        mask_e = cols < DIM_V
        v_new = tl.load(n_base + cols[None, :], mask=mask_e[None, :], other=0.0)
        dv_new = tl.load(dn_base + cols[None, :], mask=mask_e[None, :], other=0.0)
        do = tl.load(o_base + cols[None, :], mask=valid[:, None] & mask_e[None, :], other=0.0).to(dtype)
        v = tl.load(v_base + cols[None, :], mask=valid[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        dov += tl.dot(do, tl.trans(v_new), input_precision=DOT_PRECISION)
        d_t += tl.dot(dv_new, tl.trans((v * beta[:, None]).to(dtype)), input_precision=DOT_PRECISION)
        tv = tl.dot(tl.trans(t_op), dv_new, input_precision=DOT_PRECISION)
        tl.store(dv_base + cols[None, :], tv * beta[:, None], mask=valid[:, None] & mask_e[None, :])
        d_beta += tl.sum(v * tv, 1)
    # masks and decays are formed where they are used: none stays live through sweep 2
    m = tl.exp(tl.where(offs_c[:, None] >= offs_c[None, :], gates[:, None] - gates[None, :], float("-inf")))
    dov_m = (dov * m).to(dtype)                  # a dot operand below: kept in the input dtype

    # sweep 2, key slices: dQ, dK (the state terms), dT from W = T diag(beta gamma) K, dG
    d_gates = tl.zeros([BLOCK_C], dtype=tl.float32)
    d_last = tl.sum(tl.zeros([BLOCK_C], dtype=tl.float32), 0)   # dL/dG_C, the chunk's last cumulative gate
    bg = beta * gamma
    for d0 in range(0, DIM_K, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < DIM_K
        dq_state = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)     # dO S^T
        dk_state = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)     # V_new dS^T (the gradient of K~)
        d_w = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)          # -dV_new S^T
        for e0 in range(0, DIM_V, BLOCK_D):
            cols_e = e0 + offs_d
            mask_e = cols_e < DIM_V
            hd_off = h_off + cols[:, None] * stride_hr + cols_e[None, :]
            hd_mask = mask_d[:, None] & mask_e[None, :]
            h = tl.load(HS + hd_off, mask=hd_mask, other=0.0)
            dh = tl.load(DHS + hd_off, mask=hd_mask, other=0.0)
            v_new = tl.load(n_base + cols_e[None, :], mask=mask_e[None, :], other=0.0)
            dv_new = tl.load(dn_base + cols_e[None, :], mask=mask_e[None, :], other=0.0)
            do = tl.load(o_base + cols_e[None, :], mask=valid[:, None] & mask_e[None, :], other=0.0).to(dtype)
            dq_state += tl.dot(do, tl.trans(h), input_precision=DOT_PRECISION)
            dk_state += tl.dot(v_new, tl.trans(dh), input_precision=DOT_PRECISION)
            d_w -= tl.dot(dv_new, tl.trans(h), input_precision=DOT_PRECISION)
            d_last += tl.exp(g_last) * tl.sum(tl.sum(h.to(tl.float32) * dh.to(tl.float32), 1), 0)
        q = tl.load(q_base + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_base + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        dq = scale * (gamma[:, None] * dq_state + tl.dot(dov_m, k, input_precision=DOT_PRECISION))
        tl.store(dq_base + cols[None, :], dq, mask=valid[:, None] & mask_d[None, :])
        d_gates += scale * gamma * tl.sum(q.to(tl.float32) * dq_state, 1)
        dk = k_decay[:, None] * dk_state
        k32 = k.to(tl.float32)
        e_j = k_decay * tl.sum(k32 * dk_state, 1)
        d_gates -= e_j
        d_last += tl.sum(e_j, 0)
        tw = tl.dot(tl.trans(t_op), d_w.to(dtype), input_precision=DOT_PRECISION)
        dk += bg[:, None] * tw
        ktw = tl.sum(k32 * tw, 1)
        d_beta += gamma * ktw
        d_gates += bg * ktw
        d_t += tl.dot(d_w.to(dtype), tl.trans((k32 * bg[:, None]).to(dtype)), input_precision=DOT_PRECISION)
        tl.store(dk_base + cols[None, :], dk, mask=valid[:, None] & mask_d[None, :])

    # T = (I + A)^-1: dA = -T^T dT T^T on the strictly lower part, A_ij = beta_i exp(G_i - G_j) k_i . k_j
    t = tl.load(t_ptrs)                                        # fp32 again (not kept live through sweep 2)
    strict = offs_c[:, None] > offs_c[None, :]
    d_a = -tl.dot(tl.dot(tl.trans(t), d_t, input_precision=DOT_PRECISION), tl.trans(t),
                  input_precision=DOT_PRECISION)
    decay = tl.exp(tl.where(strict, gates[:, None] - gates[None, :], float("-inf")))
    d_a = tl.where(strict, d_a, 0.0)
    d_kk = d_a * decay * beta[:, None]
    d_kk_op = d_kk.to(dtype)

    # sweep 3, key slices: dK's K K^T term and its intra-chunk output term (moved here so that sweep 2
    # holds one layout of dO V_new^T, not two), added to what sweep 2 stored; K K^T and Q K^T for dbeta, dG
    tl.debug_barrier()
    kk = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    qk = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, DIM_K, BLOCK_D):
        cols = d0 + offs_d
        mask = valid[:, None] & (cols[None, :] < DIM_K)
        q = tl.load(q_base + cols[None, :], mask=mask, other=0.0)
        k = tl.load(k_base + cols[None, :], mask=mask, other=0.0)
        dk = tl.load(dk_base + cols[None, :], mask=mask, other=0.0)
        dk += (tl.dot(d_kk_op, k, input_precision=DOT_PRECISION)
               + tl.dot(tl.trans(d_kk_op), k, input_precision=DOT_PRECISION)
               + scale * tl.dot(tl.trans(dov_m), q, input_precision=DOT_PRECISION))
        tl.store(dk_base + cols[None, :], dk, mask=mask)
        kk += tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)
        qk += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    d_beta += tl.sum(d_a * decay * kk, 1)
    x = d_kk * kk                                              # dA o A
    d_gates += tl.sum(x, 1) - tl.sum(x, 0)
    x = scale * dov_m.to(tl.float32) * qk                                     # the intra-chunk output's decay
    d_gates += tl.sum(x, 1) - tl.sum(x, 0)
    d_gates += tl.where(offs_c == BLOCK_C - 1, d_last, 0.0)

    tl.store(DBETA + g_base + rows, d_beta, mask=valid)
    if HAS_G:
        # G_i = g_1 + ... + g_i: dg_l = sum_{i >= l} dG_i
        d_g = tl.sum(tl.where(offs_c[:, None] >= offs_c[None, :], d_gates[:, None], 0.0), 0)
        tl.store(DG + g_base + rows, d_g, mask=valid)


def _blocks(dim_k: int, dim_v: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_V): key-dim slice of the chunk-parallel kernels, value columns per program.
    The state passes hold a (Dk, BLOCK_V) fp32 state: narrower value blocks for wide keys."""
    block_d = min(64, block_dim(dim_k))
    block_v = min(32 if block_dim(dim_k) > 128 else 64, block_dim(dim_v))
    return block_d, block_v


class Packing(NamedTuple):
    """Packed sequences for the kernels: ``cu_seqlens`` (S + 1,) int32, ``chunks`` (NT, 2) int32
    (sequence, chunk index in it), ``first`` (S,) int32 (each sequence's first chunk), NT."""
    cu_seqlens: torch.Tensor
    chunks: torch.Tensor
    first: torch.Tensor
    num_chunks: int


def _precision(dtype: torch.dtype) -> str:
    # half inputs: the factors, V_new and the stored states in the input dtype for tensor-core dots
    # (fp32 accumulation); fp32 inputs: everything fp32 with IEEE products
    return "ieee" if dtype == torch.float32 else "tf32"


def _states(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
            initial_state: torch.Tensor | None, packing: Packing | None, store_t: bool) -> dict:
    """Passes 1 and 2 (the WY factors, the chunk states and V_new) -> their buffers and the final state."""
    B, H, N, Dk = k.shape
    Dv = v.shape[-1]
    rows = B if packing is None else packing.first.shape[0]
    nt = triton.cdiv(N, CHUNK) if packing is None else packing.num_chunks
    dtype, dev = k.dtype, k.device
    cu, chunks, first = (None, None, None) if packing is None else packing[:3]
    w = torch.empty(B, H, nt * CHUNK, Dk, dtype=dtype, device=dev)
    u = torch.empty(B, H, nt * CHUNK, Dv, dtype=dtype, device=dev)
    t = torch.empty(B, H, nt * CHUNK, CHUNK, dtype=torch.float32, device=dev) if store_t else None
    v_new = torch.empty_like(u)
    hs = torch.empty(B, H, nt, Dk, Dv, dtype=dtype, device=dev)
    state = new_output((rows, H, Dk, Dv), torch.float32, dev)
    block_d, block_v = _blocks(Dk, Dv)
    block_k = block_dim(Dk)
    if block_k > 128:  # the widest keys: a narrower state keeps the pass within the registers
        block_v = min(block_v, 16)
    gate = beta if g is None else g   # a placeholder pointer when HAS_G is off
    common = {"HAS_G": g is not None, "VARLEN": packing is not None, "DOT_PRECISION": _precision(dtype)}
    if nt > 0:
        delta_rule_prep_kernel[(nt, B * H)](
            k, v, beta, gate, w, u, t, chunks, cu,
            *k.stride()[:3], *v.stride()[:3], *beta.stride()[:2], *w.stride()[:3], *u.stride()[:3],
            H, N, DIM_K=Dk, DIM_V=Dv, BLOCK_C=CHUNK, BLOCK_D=block_d, STORE_T=store_t, **common,
            num_warps=8 if dtype == torch.float32 else 4, num_stages=1)   # IEEE fp32 dots need more registers
    delta_rule_state_kernel[(triton.cdiv(Dv, block_v), rows * H)](
        k, w, u, v_new, hs, gate, initial_state, state, first, cu,
        *k.stride()[:3], *w.stride()[:3], *u.stride()[:3], *beta.stride()[:2], *hs.stride()[:4],
        *state.stride()[:3], H, N,
        DIM_K=Dk, DIM_V=Dv, BLOCK_K=block_k, BLOCK_V=block_v, BLOCK_C=CHUNK, HAS_S0=initial_state is not None,
        # one stage for the widest keys: two would not fit the (C, Dk) tiles in shared memory
        **common, num_warps=8 if block_k * block_v >= 8192 or block_k > 128 else 4,
        num_stages=1 if block_k > 128 else 2)
    return {"w": w, "u": u, "t": t, "v_new": v_new, "hs": hs, "state": state, "nt": nt, "rows": rows,
            "gate": gate, "common": common}


def delta_rule_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                       packing: Packing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked forward. q, k (B, H, N, Dk), v (B, H, N, Dv), last dims contiguous, one dtype
    (heads already expanded); beta, g (B, H, N) contiguous (g None: no gates); initial_state
    fp32 contiguous (B or S, H, Dk, Dv) or None; ``packing`` for S sequences packed along N (B = 1).
    Returns out (B, H, N, Dv) in q's dtype and the final state fp32 (B or S, H, Dk, Dv).
    """
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    p = _states(k, v, beta, g, initial_state, packing, store_t=False)
    out = new_output((B, H, N, Dv), q.dtype, q.device)
    block_d, block_v = _blocks(Dk, Dv)
    if p["nt"] > 0:
        delta_rule_out_kernel[(triton.cdiv(Dv, block_v), p["nt"], B * H)](
            q, k, p["v_new"], p["hs"], p["gate"], out, None if packing is None else packing.chunks,
            None if packing is None else packing.cu_seqlens,
            *q.stride()[:3], *k.stride()[:3], *p["v_new"].stride()[:3], *beta.stride()[:2], *p["hs"].stride()[:4],
            *out.stride()[:3], H, N, scale,
            DIM_K=Dk, DIM_V=Dv, BLOCK_D=block_d, BLOCK_V=block_v, BLOCK_C=CHUNK, **p["common"],
            num_warps=4, num_stages=2)
    return out, p["state"]


def delta_rule_backward(d_out: torch.Tensor, d_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None, scale: float,
                        initial_state: torch.Tensor | None, packing: Packing | None = None):
    """Backward of :func:`delta_rule_forward` (same inputs; d_out (B, H, N, Dv) contiguous in q's
    dtype, d_state fp32 contiguous (B or S, H, Dk, Dv) or None). Recomputes passes 1 and 2, then
    runs the reverse state pass and the chunk-parallel gradient kernel. Returns dq, dk (B, H, N, Dk),
    dv (B, H, N, Dv), dbeta, dg (B, H, N) (None without gates) and d initial_state (B or S, H, Dk, Dv),
    all float32."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    dev = q.device
    p = _states(k, v, beta, g, initial_state, packing, store_t=True)
    nt, rows, common = p["nt"], p["rows"], p["common"]
    cu, chunks, first = (None, None, None) if packing is None else packing[:3]
    dhs = torch.empty_like(p["hs"])
    dv_new = torch.empty_like(p["u"])
    d_s0 = new_output((rows, H, Dk, Dv), torch.float32, dev)
    block_k = block_dim(Dk)
    # narrower tiles than the forward's: the backward passes keep more of them live (at
    # Dk = Dv = 128 these are the widest that compile without register spills for sm_90)
    block_v = min(16 if block_k > 128 else 32, block_dim(Dv))
    block_d = 16
    delta_rule_dstate_kernel[(triton.cdiv(Dv, block_v), rows * H)](
        q, k, p["w"], d_out, dv_new, dhs, p["gate"], d_state, d_s0, first, cu,
        *q.stride()[:3], *k.stride()[:3], *p["w"].stride()[:3], *d_out.stride()[:3], *dv_new.stride()[:3],
        *beta.stride()[:2], *dhs.stride()[:4], *d_s0.stride()[:3], H, N, scale,
        DIM_K=Dk, DIM_V=Dv, BLOCK_K=block_k, BLOCK_V=block_v, BLOCK_C=CHUNK, HAS_DSN=d_state is not None,
        **common, num_warps=8 if block_k >= 128 else 4, num_stages=1 if block_k > 128 else 2)
    dq = new_output((B, H, N, Dk), torch.float32, dev)
    dk = new_output((B, H, N, Dk), torch.float32, dev)
    dv = new_output((B, H, N, Dv), torch.float32, dev)
    d_beta = new_output((B, H, N), torch.float32, dev)
    d_g = new_output((B, H, N), torch.float32, dev) if g is not None else None
    if nt > 0:
        delta_rule_bwd_chunk_kernel[(nt, B * H)](
            q, k, v, beta, p["gate"], p["t"], p["hs"], dhs, p["v_new"], dv_new, d_out, dq, dk, dv, d_beta,
            d_beta if d_g is None else d_g, chunks, cu,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *beta.stride()[:2], *dhs.stride()[:4],
            *dv_new.stride()[:3], *d_out.stride()[:3], *dq.stride()[:3], *dv.stride()[:3], H, N, scale,
            DIM_K=Dk, DIM_V=Dv, BLOCK_C=CHUNK, BLOCK_D=block_d, **common, num_warps=8, num_stages=1)
    return dq, dk, dv, d_beta, d_g, d_s0
