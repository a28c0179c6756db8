"""The chunk-parallel linear-attention engine (flash-linear-attention's two-stage form):
a states pass and an output pass, used for the forward and every backward pass, and a
recurrent kernel for decoding.

Per (batch, head) the recurrence is S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = c q_t S_t
with a SCALAR log-gate g_t <= 0 per token (GATE = 2, a (B, H, N) fp32 tensor), a
constant one per head (GATE = 1: lightning / linear with decay, g_t = -slope[h]) or none
(GATE = 0: plain linear attention; the gate work compiles away). The sequence is cut into
chunks of L <= BLOCK_C rows; b_i is the cumulative gate from the chunk's first row
through row i (local index) and b_L its value at the chunk's last row. Rows past a
sequence's end have gate 0, so b stays at b_L there.

Forward (REVERSE = False), with S_c the state entering chunk c:

  states pass:  S_{c+1} = exp(b_L) S_c + upd_scale sum_j exp(b_L - b_j) k_j^T v_j
  output pass:  O_i = scale sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j + out_scale exp(b_i) q_i S_c

REVERSE walks from the last chunk back, the gates shifted by one token, which is what the
gradient of the state needs (dS_t = exp(g_{t+1}) dS_{t+1} + c q_t^T dO_t):

  states pass:  D_{c-1} = exp(b_L) D_c + upd_scale sum_j exp(b_j) k_j^T v_j
  output pass:  O_i = scale sum_{j >= i} exp(b_j - b_i) (q_i . k_j) v_j + out_scale exp(b_L - b_i) q_i D_c

Every exponent is <= 0, so no factor overflows however strong the decay. The states
pass (one program per (Dk block, Dv block, batch * head), walking the chunks; D x D work
per chunk only) writes the state entering every chunk to HS; the output pass then runs
one program per (chunk, Dv block, batch * head), all chunks in parallel, looping over
Dk in BLOCK_K slices (feature dims above 256 need no special case). With (Q, K, V) =
(q, k, v) this is the causal forward. The backward passes are the same two stages on
other operands (launch.py): dq = output(dO, v, k; S^T) forward, and with D the reverse
states of (q, dO) from dS_N: dv = output(k, q, dO; D) and dk = output(v, dO, q; D^T),
both REVERSE; the last D is d initial_state. HS is read through its strides, so a
transposed state costs nothing. Head indices of Q, K and V are ``h // g*``, so GQA
needs no copies.

Packed variable-length batches (VARLEN, B = 1, CU_SEQLENS (S + 1,) int32): the chunks
of sequence s start at its first row (no chunk crosses a boundary) and its gates
restart. The states pass runs (s, h) as one program and writes its chunks' states at
rows CHUNK_OFFSETS[s]... of HS; the output pass's chunk axis runs over all sequences'
chunks, CHUNK_TABLE[c] = (sequence, chunk within it).
"""

import triton
import triton.language as tl

from ..sequences import sequence_span


@triton.jit
def _chunk_gates(G, SLOPES, row0_g, stride_gh, stride_gn, off_h, rows64, offs_c, valid, length,
                 GATE: tl.constexpr, BLOCK_C: tl.constexpr):
    """(b, b_L): the within-chunk cumulative log-gate of each row (BLOCK_C,) and at the
    chunk's last row, fp32. Rows past the end add 0."""
    if GATE != 0:
        if GATE == 1:
            g = tl.where(valid, -tl.load(SLOPES + off_h).to(tl.float32), 0.0)
        else:
            g = tl.load(G + row0_g + off_h.to(tl.int64) * stride_gh + rows64 * stride_gn, mask=valid,
                        other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
        b_last = 0.0
    return b, b_last


@triton.jit
def linear_states_kernel(
    K, V, G, SLOPES, P0, PN, HS, CU_SEQLENS, CHUNK_OFFSETS,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_p0b, stride_p0h, stride_p0r,
    stride_pnb, stride_pnh, stride_pnr,
    stride_hsc, stride_hsh, stride_hsr,
    num_heads, group_k, group_v, seqlen, n_chunks, upd_scale,
    DIM_K: tl.constexpr, DIM_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    GATE: tl.constexpr, HAS_P0: tl.constexpr, STORE_PN: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, HALF_UPDATE: tl.constexpr, STATE_PRECISION: tl.constexpr,
):
    """Stage 1: the [BLOCK_K, BLOCK_E] slice of the state entering each chunk (in walk
    order) into HS (chunk row, H, DIM_K, DIM_E), the last one into PN. P0, PN and HS have
    unit last stride. HALF_UPDATE: the update k^T v takes the input dtype's tensor cores
    (fp32 accumulation); else fp32 operands at STATE_PRECISION."""
    pid_k = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = (pid_bh // num_heads).to(tl.int64)   # batch entry, or packed sequence (its state row)
    off_h = pid_bh % num_heads
    tb, bos, seqlen = sequence_span(off_b, seqlen, CU_SEQLENS, VARLEN)
    if VARLEN:
        n_chunks = tl.cdiv(seqlen, BLOCK_C)
        hs_row0 = tl.load(CHUNK_OFFSETS + off_b).to(tl.int64)
    else:
        hs_row0 = off_b * n_chunks
    row0_k, row0_v, row0_g = (tb * stride_kb + bos * stride_kn, tb * stride_vb + bos * stride_vn,
                              tb * stride_gb + bos * stride_gn)
    k_base = K + row0_k + (off_h // group_k).to(tl.int64) * stride_kh
    v_base = V + row0_v + (off_h // group_v).to(tl.int64) * stride_vh

    offs_c = tl.arange(0, BLOCK_C)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_k = offs_k < DIM_K
    mask_e = offs_e < DIM_E
    p_mask = mask_k[:, None] & mask_e[None, :]
    p_offs = offs_k[:, None] * stride_p0r + offs_e[None, :]
    if HAS_P0:
        state = tl.load(P0 + off_b * stride_p0b + off_h.to(tl.int64) * stride_p0h + p_offs,
                        mask=p_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_E], dtype=tl.float32)
    hs_base = HS + off_h.to(tl.int64) * stride_hsh + offs_k[:, None] * stride_hsr + offs_e[None, :]

    for it in tl.range(0, n_chunks, num_stages=2):   # the next chunk's loads overlap this chunk's update
        if REVERSE:
            chunk = n_chunks - 1 - it
        else:
            chunk = it
        tl.store(hs_base + (hs_row0 + chunk) * stride_hsc, state.to(HS.dtype.element_ty), mask=p_mask)
        start = chunk * BLOCK_C
        length = tl.minimum(seqlen - start, BLOCK_C)
        rows = start + offs_c
        valid = rows < seqlen
        rows64 = rows.to(tl.int64)
        k = tl.load(k_base + rows64[:, None] * stride_kn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_base + rows64[:, None] * stride_vn + offs_e[None, :],
                    mask=valid[:, None] & mask_e[None, :], other=0.0)
        if GATE == 0:
            if HALF_UPDATE:
                upd = tl.dot(tl.trans(k), v)
            else:
                upd = tl.dot(tl.trans(k.to(tl.float32)), v.to(tl.float32), input_precision=STATE_PRECISION)
            state += upd * upd_scale
        else:
            b, b_last = _chunk_gates(G, SLOPES, row0_g, stride_gh, stride_gn, off_h, rows64, offs_c, valid, length,
                                     GATE, BLOCK_C)
            if REVERSE:
                f_upd = tl.exp(b) * upd_scale
            else:
                f_upd = tl.exp(b_last - b) * upd_scale
            k_dec = k.to(tl.float32) * f_upd[:, None]
            if HALF_UPDATE:
                upd = tl.dot(tl.trans(k_dec.to(k.dtype)), v)
            else:
                upd = tl.dot(tl.trans(k_dec), v.to(tl.float32), input_precision=STATE_PRECISION)
            state = state * tl.exp(b_last) + upd

    if STORE_PN:
        tl.store(PN + off_b * stride_pnb + off_h.to(tl.int64) * stride_pnh + offs_k[:, None] * stride_pnr
                 + offs_e[None, :], state, mask=p_mask)


@triton.jit
def linear_output_kernel(
    Q, K, V, O, G, SLOPES, HS, CU_SEQLENS, CHUNK_TABLE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    stride_hsc, stride_hsh, stride_hsr, stride_hse,
    num_heads, group_q, group_k, group_v, seqlen, n_chunks,
    scale, out_scale,
    DIM_K: tl.constexpr, DIM_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    GATE: tl.constexpr, REVERSE: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HALF_STATE: tl.constexpr, STATE_PRECISION: tl.constexpr,
):
    """Stage 2: one chunk's [BLOCK_C, BLOCK_E] output slice from its rows and the state HS
    entering it (row stride stride_hsr over DIM_K, column stride stride_hse over DIM_E: a
    transposed state is a swap of the two). HALF_STATE: q . S takes the input dtype's tensor
    cores (the state cast to it, fp32 accumulation); else fp32 operands at STATE_PRECISION."""
    pid_c = tl.program_id(0)   # the chunk axis first: it can pass the 65535 limit of axes 1 and 2
    pid_e = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_h = pid_bh % num_heads
    if VARLEN:
        off_b = tl.load(CHUNK_TABLE + 2 * pid_c).to(tl.int64)          # the packed sequence
        chunk = tl.load(CHUNK_TABLE + 2 * pid_c + 1)                    # its chunk
        hs_row = pid_c.to(tl.int64)
    else:
        off_b = (pid_bh // num_heads).to(tl.int64)
        chunk = pid_c
        hs_row = off_b * n_chunks + pid_c
    tb, bos, seqlen = sequence_span(off_b, seqlen, CU_SEQLENS, VARLEN)
    row0_q, row0_k, row0_v, row0_o = (tb * stride_qb + bos * stride_qn, tb * stride_kb + bos * stride_kn,
                                      tb * stride_vb + bos * stride_vn, tb * stride_ob + bos * stride_on)
    row0_g = tb * stride_gb + bos * stride_gn
    q_base = Q + row0_q + (off_h // group_q).to(tl.int64) * stride_qh
    k_base = K + row0_k + (off_h // group_k).to(tl.int64) * stride_kh
    v_base = V + row0_v + (off_h // group_v).to(tl.int64) * stride_vh
    o_base = O + row0_o + off_h.to(tl.int64) * stride_oh
    hs_base = HS + hs_row * stride_hsc + off_h.to(tl.int64) * stride_hsh

    offs_c = tl.arange(0, BLOCK_C)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < DIM_E
    start = chunk * BLOCK_C
    length = tl.minimum(seqlen - start, BLOCK_C)
    rows = start + offs_c
    valid = rows < seqlen
    rows64 = rows.to(tl.int64)

    scores = tl.zeros([BLOCK_C, BLOCK_C], dtype=tl.float32)
    inter = tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32)
    for kb in tl.range(0, tl.cdiv(DIM_K, BLOCK_K), num_stages=2):   # feature dim in slices
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < DIM_K
        q = tl.load(q_base + rows64[:, None] * stride_qn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        k = tl.load(k_base + rows64[:, None] * stride_kn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        s = tl.load(hs_base + offs_k[:, None] * stride_hsr + offs_e[None, :] * stride_hse,
                    mask=mask_k[:, None] & mask_e[None, :], other=0.0)
        scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HALF_STATE:
            inter += tl.dot(q, s.to(q.dtype))
        else:
            inter += tl.dot(q.to(tl.float32), s.to(tl.float32), input_precision=STATE_PRECISION)

    # the causal (or anti-causal) mask and the decay between rows i and j
    if REVERSE:
        visible = offs_c[None, :] >= offs_c[:, None]
    else:
        visible = offs_c[:, None] >= offs_c[None, :]
    if GATE == 0:
        scores = tl.where(visible, scores * scale, 0.0)
        inter = inter * out_scale
    else:
        b, b_last = _chunk_gates(G, SLOPES, row0_g, stride_gh, stride_gn, off_h, rows64, offs_c, valid, length,
                                 GATE, BLOCK_C)
        if REVERSE:
            expo = b[None, :] - b[:, None]
            f_out = tl.exp(b_last - b) * out_scale
        else:
            expo = b[:, None] - b[None, :]
            f_out = tl.exp(b) * out_scale
        scores = scores * tl.exp(tl.where(visible, expo, float("-inf"))) * scale
        inter = inter * f_out[:, None]
    v = tl.load(v_base + rows64[:, None] * stride_vn + offs_e[None, :],
                mask=valid[:, None] & mask_e[None, :], other=0.0)
    out = tl.dot(scores.to(v.dtype), v, input_precision=DOT_PRECISION) + inter
    tl.store(o_base + rows64[:, None] * stride_on + offs_e[None, :], out.to(O.dtype.element_ty),
             mask=valid[:, None] & mask_e[None, :])


@triton.jit
def linear_recurrent_kernel(
    Q, K, V, O, S0, SN, G, SLOPES, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    stride_sb, stride_sh, stride_sr,
    num_heads, groups, seqlen, scale,
    DIM_K: tl.constexpr, DIM_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    GATE: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr,
):
    """Token-by-token recurrence S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t
    (g_t = -slope[h] for GATE = 1, G[b, h, t] for GATE = 2, 0 for GATE = 0): the decoding
    step (N = 1), with no padding to a chunk. S0 and SN are fp32 (B, H, K, E) with the same
    strides (last one 1); (S, H, K, E) for a packed batch (VARLEN: program s * H + h runs
    sequence s)."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = pid_bh % num_heads
    off_hk = (off_h // groups).to(tl.int64)
    tb, bos, seqlen = sequence_span(off_b, seqlen, CU_SEQLENS, VARLEN)
    row0_q, row0_k, row0_v, row0_o = (tb * stride_qb + bos * stride_qn, tb * stride_kb + bos * stride_kn,
                                      tb * stride_vb + bos * stride_vn, tb * stride_ob + bos * stride_on)
    row0_g = tb * stride_gb + bos * stride_gn
    q_base = Q + row0_q + off_h.to(tl.int64) * stride_qh
    k_base = K + row0_k + off_hk * stride_kh
    v_base = V + row0_v + off_hk * stride_vh
    o_base = O + row0_o + off_h.to(tl.int64) * stride_oh
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_k = offs_k < DIM_K
    mask_e = offs_e < DIM_E
    s_off = off_b * stride_sb + off_h.to(tl.int64) * stride_sh + offs_k[:, None] * stride_sr + offs_e[None, :]
    s_mask = mask_k[:, None] & mask_e[None, :]
    if HAS_S0:
        state = tl.load(S0 + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_E], dtype=tl.float32)
    if GATE == 1:
        lam = tl.exp(-tl.load(SLOPES + off_h).to(tl.float32))
    else:
        lam = 1.0
    for t in range(seqlen):
        q = tl.load(q_base + t * stride_qn + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * stride_kn + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * stride_vn + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        if GATE == 2:
            lam = tl.exp(tl.load(G + row0_g + off_h.to(tl.int64) * stride_gh + t * stride_gn).to(tl.float32))
        state = state * lam + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_base + t * stride_on + offs_e, o.to(O.dtype.element_ty), mask=mask_e)
    tl.store(SN + s_off, state, mask=s_mask)
