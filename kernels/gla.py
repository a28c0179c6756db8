"""Gated linear attention with per-channel gates (GLA): flash-linear-attention's chunk_gla
scheme in Triton, forward and backward.

Per query head, with log-gates g_t <= 0 of shape (Dk,), the state S (Dk, Dv) follows
S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t and o_t = scale q_t S_t. The sequence is cut
into chunks of BT rows; G is the cumulative gate from the chunk's first row (``gc``, per
channel, fp32) and Gl its value at the chunk's last row. With h_c the state entering
chunk c:

    o_t     = scale [ (q_t * exp(G_t)) h_c + sum_{s <= t in chunk} A_ts v_s ]
    A_ts    = sum_d q_td k_sd exp(G_td - G_sd)
    h_{c+1} = diag(exp(Gl)) h_c + (k * exp(Gl - G))^T V

Every exponent is kept <= 0 so that no factor overflows however strong the decay. The
plain split q * exp(G), k * exp(-G) over a whole chunk would overflow once the gates
sum below about -88; here the chunk is cut into sub-chunks of BC = 16 rows (secondary
chunking): a block of A below the diagonal (sub-chunk i, earlier sub-chunk j) is one
GEMM of q_i * exp(G_i - Gn) and k_j * exp(Gn - G_j), Gn the cumulative gate at the first
row of sub-chunk i; a block on the diagonal is computed exactly, one column at a time.

Passes (one launch each):

* ``gla_cumsum_kernel``: gc, the chunk-local cumulative gate.
* ``gla_states_kernel``: one program per (Dk block, Dv block, sequence x head) walks the
  chunks and stores the state entering each (forward), or, REVERSE, the gradient of the
  state leaving each (dh_{c+1} = diag(exp(Gl)) dh_{c+2} + scale (q * exp(G))^T dO).
* ``gla_intra_kernel``: A, one program per (chunk, head, sub-chunk of rows).
* ``gla_output_kernel``: one program per (chunk, head, Dv block), all chunks in parallel:
  o = scale (q * exp(G)) h_c + scale A V, or, REVERSE, dv = scale A^T dO +
  (k * exp(Gl - G)) dh_{c+1}.
* ``gla_dA_kernel``: dA = scale tril(dO V^T) per chunk.
* ``gla_dqk_intra_kernel``: the intra-chunk parts of dq and dk for one sub-chunk of rows,
  from dA (sub-chunked like A).
* ``gla_dqk_inter_kernel``: adds the states' parts (from h_c and dh_{c+1}) for a whole
  chunk, and stores dG = q * dq - k * dk.
* ``gla_dg_kernel``: dg_t = sum_{u >= t} dG_u + sum_v (S_N * dS_N) (the gate of row t
  scales every later cumulative gate and the final state).
* ``gla_recurrent_kernel``: the decoding step (one token per sequence), token by token.

Packed sequences (VARLEN, B = 1): chunks start at each sequence's first row, so none
crosses a boundary; CHUNK_INDICES (chunks, 2) gives each chunk's (sequence, chunk in the
sequence) and CHUNK_OFFSETS (S + 1,) the first chunk of each sequence in the stored
states. Every tensor is contiguous: (B, H, N, D) for rows, (chunks, H, Dk, Dv) for the
per-chunk states, (B, H, N, BT) fp32 for A and dA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import block_dim, new_output
from .linear.launch import precision
from .sequences import sequence_span

#: rows per chunk and per sub-chunk; Dk and Dv columns per program (at most)
CHUNK = 64
SUB = 16
MAX_BLOCK = 64
#: the largest Dk the recurrent (decoding) kernel holds in one block; above it decoding runs chunked
RECURRENT_MAX_DIM = 256
#: Dk columns of the sub-chunk kernels, whose exact diagonal block is a (SUB, SUB, BK) product
SUB_BLOCK_K = 32


@triton.jit
def _locate(pid_t, pid_bh, num_heads, seqlen, NT, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN: tl.constexpr):
    """The chunk a program owns: (batch entry, head, first row of its sequence, sequence
    length, chunk index in the sequence, row of the per-chunk state storage)."""
    off_h = pid_bh % num_heads
    if VARLEN:
        seq = tl.load(CHUNK_INDICES + pid_t * 2).to(tl.int64)
        c = tl.load(CHUNK_INDICES + pid_t * 2 + 1)
        hidx = tl.load(CHUNK_OFFSETS + seq).to(tl.int64) + c
    else:
        seq = pid_bh // num_heads
        c = pid_t
        hidx = seq.to(tl.int64) * NT + c
    off_b, bos, n = sequence_span(seq, seqlen, CU_SEQLENS, VARLEN)
    return off_b, off_h, bos, n, c, hidx


@triton.jit
def gla_cumsum_kernel(G, GC, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, num_heads, seqlen, NT,
                      DIM_K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, VARLEN: tl.constexpr):
    off_b, off_h, bos, n, c, _ = _locate(tl.program_id(0), tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    rows = c * BT + tl.arange(0, BT)
    cols = tl.program_id(2) * BK + tl.arange(0, BK)
    mask = (rows < n)[:, None] & (cols < DIM_K)[None, :]
    offs = rows.to(tl.int64)[:, None] * DIM_K + cols[None, :]
    g = tl.load(G + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K + offs, mask=mask, other=0.0)
    tl.store(GC + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K + offs,
             tl.cumsum(g.to(tl.float32), axis=0), mask=mask)


@triton.jit
def gla_states_kernel(X, Y, GC, H0, HS, HN, CU_SEQLENS, CHUNK_OFFSETS,
                      num_heads, group_x, group_y, seqlen, NT, scale,
                      DIM_K: tl.constexpr, DIM_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_H0: tl.constexpr, STORE_HN: tl.constexpr, REVERSE: tl.constexpr,
                      VARLEN: tl.constexpr, PRECISION: tl.constexpr, HALF_UPDATE: tl.constexpr):
    """Forward (X, Y) = (k, v): HS[c] = h_c, the state entering chunk c; HN the final state.
    HALF_UPDATE: each chunk's update (X * decay)^T Y on X's dtype's tensor cores (fp32
    accumulation), else on fp32 operands at PRECISION.
    REVERSE (X, Y) = (q, dO), H0 = dS_N: HS[c] = dh_{c+1}, the gradient of the state
    leaving chunk c; HN the gradient of the initial state."""
    pid_k, pid_v, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_h = pid_bh % num_heads
    row = (pid_bh // num_heads).to(tl.int64)                  # batch entry or packed sequence
    off_b, bos, n = sequence_span(row, seqlen, CU_SEQLENS, VARLEN)
    if VARLEN:
        first = tl.load(CHUNK_OFFSETS + row).to(tl.int64)
    else:
        first = row * NT
    x_base = X + ((off_b * (num_heads // group_x) + off_h // group_x) * seqlen + bos) * DIM_K
    y_base = Y + ((off_b * (num_heads // group_y) + off_h // group_y) * seqlen + bos) * DIM_V
    g_base = GC + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DIM_K, offs_v < DIM_V
    s_offs = offs_k[:, None] * DIM_V + offs_v[None, :]
    s_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_H0:
        state = tl.load(H0 + (row * num_heads + off_h) * DIM_K * DIM_V + s_offs, mask=s_mask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(n, BT)
    for it in range(n_chunks):
        if REVERSE:
            c = n_chunks - 1 - it
        else:
            c = it
        tl.store(HS + ((first + c) * num_heads + off_h) * DIM_K * DIM_V + s_offs, state, mask=s_mask)
        rows = c * BT + tl.arange(0, BT)
        valid = rows < n
        rows64 = rows.to(tl.int64)
        x = tl.load(x_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        y = tl.load(y_base + rows64[:, None] * DIM_V + offs_v[None, :], mask=valid[:, None] & mask_v[None, :],
                    other=0.0).to(tl.float32)
        gc = tl.load(g_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=valid[:, None] & mask_k[None, :],
                     other=0.0)
        last = tl.minimum(c * BT + BT, n) - 1
        gl = tl.load(g_base + last.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
        if REVERSE:
            xd = x * tl.exp(gc) * scale
        else:
            xd = x * tl.exp(gl[None, :] - gc)
        if HALF_UPDATE:  # a bounded sum of BT products per chunk: the input dtype's range suffices
            update = tl.dot(tl.trans(xd.to(X.dtype.element_ty)), y.to(X.dtype.element_ty))
        else:
            update = tl.dot(tl.trans(xd), y, input_precision=PRECISION)
        state = state * tl.exp(gl)[:, None] + update
    if STORE_HN:
        tl.store(HN + (row * num_heads + off_h) * DIM_K * DIM_V + s_offs, state, mask=s_mask)


@triton.jit
def gla_intra_kernel(Q, K, GC, A, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS,
                     num_heads, group_k, seqlen, NT,
                     DIM_K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     VARLEN: tl.constexpr, PRECISION: tl.constexpr):
    """A_ts = sum_d q_td k_sd exp(G_td - G_sd), s <= t in a chunk, for the rows t of sub-chunk i
    (A is zero above the diagonal, allocated so)."""
    off_b, off_h, bos, n, c, _ = _locate(tl.program_id(0), tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    i = tl.program_id(2)
    start = c * BT + i * BC
    if start >= n:
        return
    q_base = Q + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    k_base = K + ((off_b * (num_heads // group_k) + off_h // group_k) * seqlen + bos) * DIM_K
    g_base = GC + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    a_base = A + ((off_b * num_heads + off_h) * seqlen + bos) * BT
    offs_c = tl.arange(0, BC)
    rows = start + offs_c
    valid = rows < n
    rows64 = rows.to(tl.int64)
    # earlier sub-chunks j < i: every row precedes every row of sub-chunk i, one GEMM per block,
    # the decay split at Gn (the first row of sub-chunk i): both factors <= 1
    for j in range(i):
        cols64 = (c * BT + j * BC + offs_c).to(tl.int64)
        acc = tl.zeros([BC, BC], dtype=tl.float32)
        for kb in range(tl.cdiv(DIM_K, BK)):
            offs_k = kb * BK + tl.arange(0, BK)
            mask_k = offs_k < DIM_K
            m_rows = valid[:, None] & mask_k[None, :]
            q = tl.load(q_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=m_rows, other=0.0)
            gq = tl.load(g_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=m_rows, other=0.0)
            gn = tl.load(g_base + start.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
            k = tl.load(k_base + cols64[:, None] * DIM_K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            gk = tl.load(g_base + cols64[:, None] * DIM_K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
            qg = tl.where(m_rows, q * tl.exp(tl.minimum(gq - gn[None, :], 0.0)), 0.0).to(q.dtype)
            kg = (k * tl.exp(tl.minimum(gn[None, :] - gk, 0.0))).to(k.dtype)
            acc += tl.dot(qg, tl.trans(kg), input_precision=PRECISION)
        tl.store(a_base + rows64[:, None] * BT + (j * BC + offs_c)[None, :], acc, mask=valid[:, None])
    # the diagonal block, exactly: the (BC, BC, BK) products, every exponent clamped <= 0
    # (it is <= 0 wherever s <= t; the rest is masked)
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for kb in range(tl.cdiv(DIM_K, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        m_rows = valid[:, None] & (offs_k < DIM_K)[None, :]
        p_rows = rows64[:, None] * DIM_K + offs_k[None, :]
        q = tl.load(q_base + p_rows, mask=m_rows, other=0.0).to(tl.float32)
        k = tl.load(k_base + p_rows, mask=m_rows, other=0.0).to(tl.float32)
        gq = tl.load(g_base + p_rows, mask=m_rows, other=0.0)
        e = tl.exp(tl.minimum(gq[:, None, :] - gq[None, :, :], 0.0))
        acc += tl.sum(q[:, None, :] * k[None, :, :] * e, axis=2)
    seen = valid[:, None] & (offs_c[:, None] >= offs_c[None, :])
    tl.store(a_base + rows64[:, None] * BT + (i * BC + offs_c)[None, :], tl.where(seen, acc, 0.0),
             mask=valid[:, None])


@triton.jit
def gla_output_kernel(X, A, Y, GC, HS, O, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS,
                      num_heads, group_x, group_y, seqlen, NT, inter_scale, intra_scale,
                      DIM_K: tl.constexpr, DIM_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, HALF_STATE: tl.constexpr):
    """Forward (X, Y, HS) = (q, v, h): o = inter_scale (q * exp(G)) h_c + intra_scale A V.
    HALF_STATE: the state product on X's dtype's tensor cores, the state cast to it (fp32
    accumulation), else on fp32 operands at STATE_PRECISION.
    REVERSE (X, Y, HS) = (k, dO, dh): dv = intra_scale A^T dO + (k * exp(Gl - G)) dh_{c+1}."""
    off_b, off_h, bos, n, c, hidx = _locate(tl.program_id(0), tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    offs_t = tl.arange(0, BT)
    rows = c * BT + offs_t
    valid = rows < n
    rows64 = rows.to(tl.int64)
    offs_v = tl.program_id(2) * BV + tl.arange(0, BV)
    mask_v = offs_v < DIM_V
    x_base = X + ((off_b * (num_heads // group_x) + off_h // group_x) * seqlen + bos) * DIM_K
    y_base = Y + ((off_b * (num_heads // group_y) + off_h // group_y) * seqlen + bos) * DIM_V
    g_base = GC + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    a_base = A + ((off_b * num_heads + off_h) * seqlen + bos + c * BT) * BT
    y = tl.load(y_base + rows64[:, None] * DIM_V + offs_v[None, :], mask=valid[:, None] & mask_v[None, :],
                other=0.0)
    m_a = valid[:, None] & valid[None, :]
    if REVERSE:   # A^T: element (s, t) is A_ts
        a = tl.load(a_base + offs_t[None, :] * BT + offs_t[:, None], mask=m_a, other=0.0)
    else:
        a = tl.load(a_base + offs_t[:, None] * BT + offs_t[None, :], mask=m_a, other=0.0)
    out = tl.dot((a * intra_scale).to(y.dtype), y, input_precision=DOT_PRECISION)
    last = tl.minimum(c * BT + BT, n) - 1
    s_base = HS + (hidx * num_heads + off_h) * DIM_K * DIM_V
    for kb in range(tl.cdiv(DIM_K, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        mask_k = offs_k < DIM_K
        m_rows = valid[:, None] & mask_k[None, :]
        x = tl.load(x_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=m_rows, other=0.0).to(tl.float32)
        gc = tl.load(g_base + rows64[:, None] * DIM_K + offs_k[None, :], mask=m_rows, other=0.0)
        if REVERSE:
            gl = tl.load(g_base + last.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
            xd = x * tl.exp(gl[None, :] - gc)
        else:
            xd = x * tl.exp(gc)
        s = tl.load(s_base + offs_k[:, None] * DIM_V + offs_v[None, :], mask=mask_k[:, None] & mask_v[None, :],
                    other=0.0)
        if HALF_STATE:
            out += tl.dot((xd * inter_scale).to(X.dtype.element_ty), s.to(X.dtype.element_ty))
        else:
            out += tl.dot(xd * inter_scale, s, input_precision=STATE_PRECISION)
    o_base = O + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_V
    tl.store(o_base + rows64[:, None] * DIM_V + offs_v[None, :], out.to(O.dtype.element_ty),
             mask=valid[:, None] & mask_v[None, :])


@triton.jit
def gla_dA_kernel(DO, V, DA, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, num_heads, group_v, seqlen, NT, scale,
                  DIM_V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr,
                  PRECISION: tl.constexpr):
    """dA_ts = scale dO_t . v_s for s <= t in a chunk (0 above the diagonal)."""
    off_b, off_h, bos, n, c, _ = _locate(tl.program_id(0), tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    offs_t = tl.arange(0, BT)
    rows = c * BT + offs_t
    valid = rows < n
    rows64 = rows.to(tl.int64)
    do_base = DO + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_V
    v_base = V + ((off_b * (num_heads // group_v) + off_h // group_v) * seqlen + bos) * DIM_V
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for vb in range(tl.cdiv(DIM_V, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        m = valid[:, None] & (offs_v < DIM_V)[None, :]
        do = tl.load(do_base + rows64[:, None] * DIM_V + offs_v[None, :], mask=m, other=0.0)
        v = tl.load(v_base + rows64[:, None] * DIM_V + offs_v[None, :], mask=m, other=0.0)
        acc += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    acc = tl.where(offs_t[:, None] >= offs_t[None, :], acc * scale, 0.0)
    da_base = DA + ((off_b * num_heads + off_h) * seqlen + bos) * BT
    tl.store(da_base + rows64[:, None] * BT + offs_t[None, :], acc, mask=valid[:, None])


@triton.jit
def gla_dqk_intra_kernel(Q, K, GC, DA, DQ, DK, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS,
                         num_heads, group_k, seqlen, NT,
                         DIM_K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                         VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The parts of dq, dk (per query head) from inside the chunk, for the rows of sub-chunk i:

        dq_t = sum_{s <= t} dA_ts k_s exp(G_t - G_s),   dk_s = sum_{t >= s} dA_ts q_t exp(G_t - G_s)

    The sums over earlier (later) sub-chunks are GEMMs split at the first (last) row of
    sub-chunk i; the diagonal block is exact."""
    NC: tl.constexpr = BT // BC
    off_b, off_h, bos, n, c, _ = _locate(tl.program_id(0) // NC, tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    i = tl.program_id(0) % NC
    start = c * BT + i * BC
    if start >= n:
        return
    q_base = Q + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    k_base = K + ((off_b * (num_heads // group_k) + off_h // group_k) * seqlen + bos) * DIM_K
    g_base = GC + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    da_base = DA + ((off_b * num_heads + off_h) * seqlen + bos + c * BT) * BT   # rows from the chunk's first
    offs_c = tl.arange(0, BC)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    mask_k = offs_k < DIM_K
    rows = start + offs_c
    valid = rows < n
    rows64 = rows.to(tl.int64)
    m_rows = valid[:, None] & mask_k[None, :]
    p_rows = rows64[:, None] * DIM_K + offs_k[None, :]
    q = tl.load(q_base + p_rows, mask=m_rows, other=0.0)
    k = tl.load(k_base + p_rows, mask=m_rows, other=0.0)
    gc = tl.load(g_base + p_rows, mask=m_rows, other=0.0)
    chunk_end = tl.minimum(c * BT + BT, n)
    n_sub = tl.cdiv(chunk_end - c * BT, BC)
    local = (i * BC + offs_c).to(tl.int64)                                     # rows of dA

    # dq from earlier sub-chunks j < i, split at Gn (first row of sub-chunk i)
    gn = tl.load(g_base + start.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
    dq = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(i):
        cols = c * BT + j * BC + offs_c
        p_cols = cols.to(tl.int64)[:, None] * DIM_K + offs_k[None, :]
        kj = tl.load(k_base + p_cols, mask=mask_k[None, :], other=0.0)
        gj = tl.load(g_base + p_cols, mask=mask_k[None, :], other=0.0)
        kg = (kj * tl.exp(tl.minimum(gn[None, :] - gj, 0.0))).to(kj.dtype)
        da = tl.load(da_base + local[:, None] * BT + (j * BC + offs_c)[None, :], mask=valid[:, None], other=0.0)
        dq += tl.dot(da.to(kj.dtype), kg, input_precision=DOT_PRECISION)
    dq = tl.where(m_rows, dq * tl.exp(tl.minimum(gc - gn[None, :], 0.0)), 0.0)
    # dk from later sub-chunks j > i, split at Gm (last row of sub-chunk i)
    last_i = tl.minimum(start + BC, n) - 1
    gm = tl.load(g_base + last_i.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
    dk = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(i + 1, n_sub):
        rj = c * BT + j * BC + offs_c
        okj = rj < n
        p_rj = rj.to(tl.int64)[:, None] * DIM_K + offs_k[None, :]
        m_rj = okj[:, None] & mask_k[None, :]
        qj = tl.load(q_base + p_rj, mask=m_rj, other=0.0)
        gj = tl.load(g_base + p_rj, mask=m_rj, other=0.0)
        qg = tl.where(m_rj, qj * tl.exp(tl.minimum(gj - gm[None, :], 0.0)), 0.0).to(qj.dtype)
        # dA^T block: element (s, t) = dA_ts, t in sub-chunk j, s in sub-chunk i
        da = tl.load(da_base + (j * BC + offs_c).to(tl.int64)[None, :] * BT + local[:, None],
                     mask=okj[None, :], other=0.0)
        dk += tl.dot(da.to(qj.dtype), qg, input_precision=DOT_PRECISION)
    dk = tl.where(m_rows, dk * tl.exp(tl.minimum(gm[None, :] - gc, 0.0)), 0.0)
    # the diagonal block, exactly: W_tsd = dA_ts exp(G_td - G_sd) for s <= t in sub-chunk i
    # (exponents clamped <= 0: the clamp only touches entries dA zeroes); dq sums over s, dk over t
    da = tl.load(da_base + local[:, None] * BT + (i * BC + offs_c)[None, :], mask=valid[:, None], other=0.0)
    da = tl.where(offs_c[:, None] >= offs_c[None, :], da, 0.0)
    w = da[:, :, None] * tl.exp(tl.minimum(gc[:, None, :] - gc[None, :, :], 0.0))
    dq += tl.sum(w * k.to(tl.float32)[None, :, :], axis=1)
    dk += tl.sum(w * q.to(tl.float32)[:, None, :], axis=0)
    tl.store(DQ + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K + p_rows, dq, mask=m_rows)
    tl.store(DK + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K + p_rows, dk, mask=m_rows)


@triton.jit
def gla_dqk_inter_kernel(Q, K, V, DO, GC, HS, DHS, DQ, DK, DG, CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS,
                         num_heads, group_k, seqlen, NT, scale,
                         DIM_K: tl.constexpr, DIM_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, VARLEN: tl.constexpr, STATE_PRECISION: tl.constexpr):
    """Adds the states' parts to dq, dk (the intra-chunk parts already in DQ, DK) for a whole
    chunk, and stores dG = q * dq - k * dk:

        dq_t += scale (dO_t h_c^T) exp(G_t),   dk_s += (v_s dh_{c+1}^T) exp(Gl - G_s)"""
    off_b, off_h, bos, n, c, hidx = _locate(tl.program_id(0), tl.program_id(1), num_heads, seqlen, NT,
                                            CHUNK_INDICES, CU_SEQLENS, CHUNK_OFFSETS, VARLEN)
    rows = c * BT + tl.arange(0, BT)
    valid = rows < n
    rows64 = rows.to(tl.int64)
    offs_k = tl.program_id(2) * BK + tl.arange(0, BK)
    mask_k = offs_k < DIM_K
    m_rows = valid[:, None] & mask_k[None, :]
    p_rows = rows64[:, None] * DIM_K + offs_k[None, :]
    row_q = ((off_b * num_heads + off_h) * seqlen + bos)
    row_k = ((off_b * (num_heads // group_k) + off_h // group_k) * seqlen + bos)
    s_base = (hidx * num_heads + off_h) * DIM_K * DIM_V
    dq_s = tl.zeros([BT, BK], dtype=tl.float32)
    dk_s = tl.zeros([BT, BK], dtype=tl.float32)
    for vb in range(tl.cdiv(DIM_V, BV)):
        offs_v = vb * BV + tl.arange(0, BV)
        mask_v = offs_v < DIM_V
        m_v = valid[:, None] & mask_v[None, :]
        p_v = rows64[:, None] * DIM_V + offs_v[None, :]
        do = tl.load(DO + row_q * DIM_V + p_v, mask=m_v, other=0.0).to(tl.float32)
        v = tl.load(V + row_k * DIM_V + p_v, mask=m_v, other=0.0).to(tl.float32)
        p_s = offs_k[None, :] * DIM_V + offs_v[:, None]            # (BV, BK): the state transposed
        m_s = mask_k[None, :] & mask_v[:, None]
        h = tl.load(HS + s_base + p_s, mask=m_s, other=0.0)
        dh = tl.load(DHS + s_base + p_s, mask=m_s, other=0.0)
        dq_s += tl.dot(do, h, input_precision=STATE_PRECISION)
        dk_s += tl.dot(v, dh, input_precision=STATE_PRECISION)
    gc = tl.load(GC + row_q * DIM_K + p_rows, mask=m_rows, other=0.0)
    last = tl.minimum(c * BT + BT, n) - 1
    gl = tl.load(GC + row_q * DIM_K + last.to(tl.int64) * DIM_K + offs_k, mask=mask_k, other=0.0)
    dq = tl.load(DQ + row_q * DIM_K + p_rows, mask=m_rows, other=0.0) + dq_s * scale * tl.exp(gc)
    dk = tl.load(DK + row_q * DIM_K + p_rows, mask=m_rows, other=0.0) + dk_s * tl.exp(gl[None, :] - gc)
    tl.store(DQ + row_q * DIM_K + p_rows, dq, mask=m_rows)
    tl.store(DK + row_q * DIM_K + p_rows, dk, mask=m_rows)
    q = tl.load(Q + row_q * DIM_K + p_rows, mask=m_rows, other=0.0).to(tl.float32)
    k = tl.load(K + row_k * DIM_K + p_rows, mask=m_rows, other=0.0).to(tl.float32)
    tl.store(DG + row_q * DIM_K + p_rows, q * dq - k * dk, mask=m_rows)


@triton.jit
def gla_dg_kernel(DG, SDS, OUT, CU_SEQLENS, num_heads, seqlen,
                  DIM_K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, HAS_SDS: tl.constexpr,
                  VARLEN: tl.constexpr):
    """dg_t = sum_{u >= t} dG_u + sum_v (S_N * dS_N): a reverse cumulative sum over each
    sequence, chunk by chunk from the last, starting from the final state's term SDS."""
    pid_k, pid_bh = tl.program_id(0), tl.program_id(1)
    off_h = pid_bh % num_heads
    row = (pid_bh // num_heads).to(tl.int64)
    off_b, bos, n = sequence_span(row, seqlen, CU_SEQLENS, VARLEN)
    offs_k = pid_k * BK + tl.arange(0, BK)
    mask_k = offs_k < DIM_K
    if HAS_SDS:
        carry = tl.load(SDS + (row * num_heads + off_h) * DIM_K + offs_k, mask=mask_k, other=0.0)
    else:
        carry = tl.zeros([BK], dtype=tl.float32)
    in_base = DG + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    out_base = OUT + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    n_chunks = tl.cdiv(n, BT)
    for it in range(n_chunks):
        c = n_chunks - 1 - it
        rows = c * BT + tl.arange(0, BT)
        m = (rows < n)[:, None] & mask_k[None, :]
        p = rows.to(tl.int64)[:, None] * DIM_K + offs_k[None, :]
        x = tl.load(in_base + p, mask=m, other=0.0)
        total = tl.sum(x, axis=0)
        tl.store(out_base + p, carry[None, :] + total[None, :] - tl.cumsum(x, axis=0) + x, mask=m)
        carry += total


@triton.jit
def gla_recurrent_kernel(Q, K, V, G, O, S0, SN, CU_SEQLENS, num_heads, group, seqlen, scale,
                         DIM_K: tl.constexpr, DIM_V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         HAS_S0: tl.constexpr, VARLEN: tl.constexpr):
    """Token-by-token S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t: the decoding
    step (N = 1, or packed sequences of at most one token), with no padding to a chunk. One
    program per (Dv block, sequence x head) holds the whole Dk (BK >= DIM_K)."""
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    off_h = pid_bh % num_heads
    row = (pid_bh // num_heads).to(tl.int64)
    off_b, bos, n = sequence_span(row, seqlen, CU_SEQLENS, VARLEN)
    q_base = Q + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    g_base = G + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_K
    k_base = K + ((off_b * (num_heads // group) + off_h // group) * seqlen + bos) * DIM_K
    v_base = V + ((off_b * (num_heads // group) + off_h // group) * seqlen + bos) * DIM_V
    o_base = O + ((off_b * num_heads + off_h) * seqlen + bos) * DIM_V
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < DIM_K, offs_v < DIM_V
    s_offs = (row * num_heads + off_h) * DIM_K * DIM_V + offs_k[:, None] * DIM_V + offs_v[None, :]
    s_mask = mask_k[:, None] & mask_v[None, :]
    if HAS_S0:
        state = tl.load(S0 + s_offs, mask=s_mask, other=0.0)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(n):
        q = tl.load(q_base + t * DIM_K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * DIM_K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        g = tl.load(g_base + t * DIM_K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * DIM_V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        state = state * tl.exp(g)[:, None] + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_base + t * DIM_V + offs_v, o.to(O.dtype.element_ty), mask=mask_v)
    tl.store(SN + s_offs, state, mask=s_mask)


# --------------------------------------------------------------------------- launchers

_forced_chunk: int | None = None


def set_chunk(chunk: int | None) -> None:
    """Rows per chunk (a power of two, a multiple of 16 and at least 16), None for the default
    (tests cover several). Sub-chunks stay 16 rows."""
    global _forced_chunk
    if chunk is not None and (chunk < SUB or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two >= {SUB}, got {chunk}")
    _forced_chunk = chunk


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    # the linear engine's policy (kernels.linear.launch.precision): fp32 inputs IEEE products
    # everywhere; half inputs the intra-chunk dots in the input dtype, the state updates too
    # (half_update), q . S too for bfloat16 only (half_state), other fp32 state products TF32
    prec = precision(dtype)
    return prec.dot, prec.state


class Layout:
    """The chunks of a (possibly packed) batch: grid extents, and for packed sequences the
    (chunk -> sequence, chunk in sequence) table and each sequence's first chunk."""

    def __init__(self, batch: int, seqlen: int, cu_seqlens: torch.Tensor | None, chunk: int, device):
        self.varlen = cu_seqlens is not None
        self.cu = cu_seqlens
        if cu_seqlens is None:
            self.rows = batch                                 # state rows per head
            self.nt = triton.cdiv(seqlen, chunk)              # chunks per batch entry
            self.chunks = batch * self.nt                     # stored states per head
            self.grid_t, self.grid_b = self.nt, batch
            self.indices = self.offsets = None
        else:
            self.rows = cu_seqlens.shape[0] - 1
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            counts = (lengths + chunk - 1) // chunk
            offsets = torch.zeros(self.rows + 1, dtype=torch.long, device=device)
            offsets[1:] = counts.cumsum(0)
            self.chunks = int(offsets[-1])                    # host read: the grid's extent
            seq = torch.repeat_interleave(torch.arange(self.rows, device=device), counts, output_size=self.chunks)
            within = torch.arange(self.chunks, device=device) - offsets[seq]
            self.indices = torch.stack([seq, within], dim=1).to(torch.int32).contiguous()
            self.offsets = offsets.to(torch.int32)
            self.nt = 0
            self.grid_t, self.grid_b = self.chunks, 1


def _setup(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None):
    B, _, N, Dk = q.shape
    chunk = _forced_chunk or CHUNK
    layout = Layout(B, N, cu_seqlens, chunk, q.device)
    bk, bv = min(MAX_BLOCK, block_dim(Dk)), min(MAX_BLOCK, block_dim(v.shape[-1]))
    return chunk, layout, bk, bv


def _cumsum(g: torch.Tensor, lay: Layout, chunk: int, bk: int) -> torch.Tensor:
    B, H, N, Dk = g.shape
    gc = torch.empty(B, H, N, Dk, dtype=torch.float32, device=g.device)
    grid = (lay.grid_t, lay.grid_b * H, triton.cdiv(Dk, bk))
    gla_cumsum_kernel[grid](g, gc, lay.indices, lay.cu, lay.offsets, H, N, lay.nt,
                            DIM_K=Dk, BT=chunk, BK=bk, VARLEN=lay.varlen)
    return gc


def _states(x, y, gc, h0, lay: Layout, chunk: int, bk: int, bv: int, *, groups: tuple[int, int],
            scale: float, reverse: bool, store_final: bool = True):
    _, H, N, Dk = gc.shape
    Dv = y.shape[-1]
    hs = torch.empty(lay.chunks, H, Dk, Dv, dtype=torch.float32, device=gc.device)
    hn = new_output((lay.rows, H, Dk, Dv), torch.float32, gc.device) if store_final else None
    _, state_precision = _precisions(x.dtype)
    grid = (triton.cdiv(Dk, bk), triton.cdiv(Dv, bv), lay.rows * H)
    y = y if y.dtype == x.dtype else y.to(x.dtype)  # one operand dtype for the half update
    gla_states_kernel[grid](x, y, gc, h0, hs, hn, lay.cu, lay.offsets, H, groups[0], groups[1], N, lay.nt, scale,
                            DIM_K=Dk, DIM_V=Dv, BT=chunk, BK=bk, BV=bv, HAS_H0=h0 is not None,
                            STORE_HN=store_final, REVERSE=reverse, VARLEN=lay.varlen, PRECISION=state_precision,
                            HALF_UPDATE=precision(x.dtype).half_update, num_warps=4)
    return hs, hn


def _intra(q, k, gc, lay: Layout, chunk: int, bk: int) -> torch.Tensor:
    B, H, N, Dk = q.shape
    bk = min(bk, SUB_BLOCK_K)
    a = torch.zeros(B, H, N, chunk, dtype=torch.float32, device=q.device)
    dot_precision, _ = _precisions(q.dtype)
    gla_intra_kernel[(lay.grid_t, lay.grid_b * H, chunk // SUB)](
        q, k, gc, a, lay.indices, lay.cu, lay.offsets, H, H // k.shape[1], N, lay.nt,
        DIM_K=Dk, BT=chunk, BC=SUB, BK=bk, VARLEN=lay.varlen, PRECISION=dot_precision, num_warps=4)
    return a


def _output(x, a, y, gc, hs, out, lay: Layout, chunk: int, bk: int, bv: int, *, groups: tuple[int, int],
            inter_scale: float, intra_scale: float, reverse: bool) -> None:
    _, H, N, Dk = gc.shape
    Dv = y.shape[-1]
    dot_precision, state_precision = _precisions(x.dtype)
    gla_output_kernel[(lay.grid_t, lay.grid_b * H, triton.cdiv(Dv, bv))](
        x, a, y, gc, hs, out, lay.indices, lay.cu, lay.offsets, H, groups[0], groups[1], N, lay.nt,
        inter_scale, intra_scale, DIM_K=Dk, DIM_V=Dv, BT=chunk, BK=bk, BV=bv, REVERSE=reverse, VARLEN=lay.varlen,
        DOT_PRECISION=dot_precision, STATE_PRECISION=state_precision, HALF_STATE=precision(x.dtype).half_state,
        num_warps=4)


def recurrent_fits(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> bool:
    """True for a decoding step the token-by-token kernel runs: at most one token per
    sequence (N <= 1, or packed sequences of length <= 1) and Dk <= RECURRENT_MAX_DIM."""
    if q.shape[-1] > RECURRENT_MAX_DIM:
        return False
    if cu_seqlens is None:
        return q.shape[2] <= 1
    return q.shape[2] <= cu_seqlens.shape[0] - 1 and int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) <= 1


def gla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv) contiguous, one dtype; g
    (B, Hq, N, Dk) contiguous log-gates (any float dtype); initial_state fp32 contiguous
    (B, Hq, Dk, Dv) or None; ``cu_seqlens`` (S + 1,) int32 for S sequences packed along
    N (B = 1; states (S, Hq, Dk, Dv)). Returns out (B, Hq, N, Dv) in q's dtype and the
    final state fp32 (B or S, Hq, Dk, Dv). A decoding step (:func:`recurrent_fits`) runs
    the token-by-token kernel, anything longer the chunked passes."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    group = H // k.shape[1]
    if recurrent_fits(q, cu_seqlens):
        rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        out = new_output((B, H, N, Dv), q.dtype, q.device)
        state = new_output((rows, H, Dk, Dv), torch.float32, q.device)
        bv = min(MAX_BLOCK if Dk <= 128 else 32, block_dim(Dv))   # the (Dk, BV) fp32 state lives in registers
        gla_recurrent_kernel[(triton.cdiv(Dv, bv), rows * H)](
            q, k, v, g, out, initial_state, state, cu_seqlens, H, group, N, scale,
            DIM_K=Dk, DIM_V=Dv, BK=block_dim(Dk), BV=bv, HAS_S0=initial_state is not None,
            VARLEN=cu_seqlens is not None, num_warps=4)
        return out, state
    chunk, lay, bk, bv = _setup(q, v, cu_seqlens)
    gc = _cumsum(g, lay, chunk, bk)
    hs, state = _states(k, v, gc, initial_state, lay, chunk, bk, bv, groups=(group, group), scale=1.0,
                        reverse=False)
    a = _intra(q, k, gc, lay, chunk, bk)
    out = new_output((B, H, N, Dv), q.dtype, q.device)
    _output(q, a, v, gc, hs, out, lay, chunk, bk, bv, groups=(1, group), inter_scale=scale, intra_scale=scale,
            reverse=False)
    return out, state


def gla_backward(do: torch.Tensor, d_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, g: torch.Tensor, scale: float, initial_state: torch.Tensor | None,
                 final_state: torch.Tensor, cu_seqlens: torch.Tensor | None = None, need_dg: bool = True):
    """Backward of :func:`gla_forward`. do (B, Hq, N, Dv) contiguous in q's dtype; d_state
    fp32 contiguous (B or S, Hq, Dk, Dv) or None; final_state the forward's. Returns dq,
    and dk, dv **per query head** (the caller sums each GQA group), (B, Hq, N, D*), dg
    (B, Hq, N, Dk) (None unless ``need_dg``) and d initial_state (B or S, Hq, Dk, Dv),
    all fp32. The chunk states and A are recomputed, not saved."""
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    group = H // k.shape[1]
    chunk, lay, bk, bv = _setup(q, v, cu_seqlens)
    dot_precision, state_precision = _precisions(q.dtype)
    gc = _cumsum(g, lay, chunk, bk)
    hs, _ = _states(k, v, gc, initial_state, lay, chunk, bk, bv, groups=(group, group), scale=1.0,
                    reverse=False, store_final=False)
    dhs, d_s0 = _states(q, do, gc, d_state, lay, chunk, bk, bv, groups=(1, 1), scale=scale, reverse=True)
    a = _intra(q, k, gc, lay, chunk, bk)
    dv = new_output((B, H, N, Dv), torch.float32, q.device)
    _output(k, a, do, gc, dhs, dv, lay, chunk, bk, bv, groups=(group, 1), inter_scale=1.0, intra_scale=scale,
            reverse=True)
    da = torch.zeros(B, H, N, chunk, dtype=torch.float32, device=q.device)
    gla_dA_kernel[(lay.grid_t, lay.grid_b * H)](
        do, v, da, lay.indices, lay.cu, lay.offsets, H, group, N, lay.nt, scale,
        DIM_V=Dv, BT=chunk, BV=bv, VARLEN=lay.varlen, PRECISION=dot_precision,
        num_warps=8 if q.dtype == torch.float32 else 4)   # IEEE fp32 dots spill at 4 warps (Triton 3.6)
    dq = new_output((B, H, N, Dk), torch.float32, q.device)
    dk = new_output((B, H, N, Dk), torch.float32, q.device)
    dG = new_output((B, H, N, Dk), torch.float32, q.device)
    bks = min(bk, SUB_BLOCK_K)
    gla_dqk_intra_kernel[(lay.grid_t * (chunk // SUB), lay.grid_b * H, triton.cdiv(Dk, bks))](
        q, k, gc, da, dq, dk, lay.indices, lay.cu, lay.offsets, H, group, N, lay.nt,
        DIM_K=Dk, BT=chunk, BC=SUB, BK=bks, VARLEN=lay.varlen, DOT_PRECISION=dot_precision, num_warps=4)
    gla_dqk_inter_kernel[(lay.grid_t, lay.grid_b * H, triton.cdiv(Dk, bk))](
        q, k, v, do, gc, hs, dhs, dq, dk, dG, lay.indices, lay.cu, lay.offsets, H, group, N, lay.nt, scale,
        DIM_K=Dk, DIM_V=Dv, BT=chunk, BK=bk, BV=bv, VARLEN=lay.varlen, STATE_PRECISION=state_precision,
        num_warps=8)   # two (BT, BK) fp32 accumulators: 4 warps spill
    dg = None
    if need_dg:
        sds = None if d_state is None else (final_state * d_state).sum(-1).contiguous()   # (rows, Hq, Dk)
        dg = new_output((B, H, N, Dk), torch.float32, q.device)
        gla_dg_kernel[(triton.cdiv(Dk, bk), lay.rows * H)](
            dG, sds, dg, lay.cu, H, N, DIM_K=Dk, BT=chunk, BK=bk, HAS_SDS=sds is not None, VARLEN=lay.varlen,
            num_warps=4)
    return dq, dk, dv, dg, d_s0
