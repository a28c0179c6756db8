"""The chunked linear-attention kernel (Lightning Attention-2 style), one kernel for
the forward pass and for every backward pass.

One program owns one (batch, head) and a BLOCK_E slice of the value dim, and walks
the sequence chunk by chunk (forward, or from the last chunk back when REVERSE),
carrying a [K, BLOCK_E] state in fp32 registers. For a chunk of L <= BLOCK_C rows
(local index i, decay rate s, lambda = exp(-s)):

  intra:  O_i  = scale * sum_{j in chunk, d(i,j) >= 0} lambda^d(i,j) (q_i . k_j) v_j
          (tensor-core dot products; d(i,j) = i - j, or j - i when REVERSE)
  inter:  O_i += out_scale * lambda^e_i * (q_i @ P),   e_i = i + 1  (or L - 1 - i when REVERSE)
  state:  P    = lambda^L * P + upd_scale * sum_j lambda^u_j k_j^T v_j,
          u_j = L - 1 - j  (or j + 1 when REVERSE)

With (Q, K, V) = (q, k, v) this is the causal forward (P is the state S, (K, Dv)).
The backward passes are the same computation on other operands:

  dq       = kernel(dO, v, k,  P0 = S0^T)                         (forward order)
  dv (per q head) = kernel(k, q, dO, P0 = dS_N,   upd_scale=scale, out_scale=1, REVERSE)
  dk (per q head) = kernel(v, dO, q, P0 = dS_N^T, upd_scale=scale, out_scale=1, REVERSE)

and the final P of the dv pass is d initial_state. Head indices of Q, K and V are
``h // g*`` so that GQA (shared k, v) needs no copies.

Packed variable-length batches (VARLEN, B = 1, CU_SEQLENS (S + 1,) int32): program
(e, s * H + h) walks sequence s alone, rows CU_SEQLENS[s] to CU_SEQLENS[s + 1], with
row s of P0 and PN as its states. Its chunks start at the sequence's first row, so no
chunk crosses a boundary; the last one is cut at the sequence's end like the last
chunk of an unpacked sequence, and the decay restarts with each sequence.
"""

import triton
import triton.language as tl


@triton.jit
def linear_chunk_kernel(
    Q, K, V, O, P0, PN, SLOPES, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_p0b, stride_p0h, stride_p0r, stride_p0c,
    stride_pnb, stride_pnh, stride_pnr, stride_pnc,
    num_heads, group_q, group_k, group_v, seqlen,
    scale, out_scale, upd_scale,
    DIM_K: tl.constexpr, DIM_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_P0: tl.constexpr, STORE_PN: tl.constexpr, REVERSE: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)   # batch entry, or packed sequence (its state row)
    off_h = pid_bh % num_heads
    if VARLEN:
        bos = tl.load(CU_SEQLENS + off_b).to(tl.int64)
        seqlen = (tl.load(CU_SEQLENS + off_b + 1) - tl.load(CU_SEQLENS + off_b)).to(tl.int32)
        row0_q, row0_k, row0_v, row0_o = bos * stride_qn, bos * stride_kn, bos * stride_vn, bos * stride_on
    else:
        row0_q, row0_k, row0_v, row0_o = (off_b * stride_qb, off_b * stride_kb, off_b * stride_vb,
                                          off_b * stride_ob)
    q_base = Q + row0_q + (off_h // group_q).to(tl.int64) * stride_qh
    k_base = K + row0_k + (off_h // group_k).to(tl.int64) * stride_kh
    v_base = V + row0_v + (off_h // group_v).to(tl.int64) * stride_vh
    o_base = O + row0_o + off_h.to(tl.int64) * stride_oh

    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_k = offs_k < DIM_K
    mask_e = offs_e < DIM_E

    if HAS_DECAY:
        slope = tl.load(SLOPES + off_h).to(tl.float32)
    else:
        slope = 0.0

    p_mask = mask_k[:, None] & mask_e[None, :]
    if HAS_P0:
        p0_ptrs = (P0 + off_b * stride_p0b + off_h.to(tl.int64) * stride_p0h
                   + offs_k[:, None] * stride_p0r + offs_e[None, :] * stride_p0c)
        state = tl.load(p0_ptrs, mask=p_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_K, BLOCK_E], dtype=tl.float32)

    # distance between row i and column j inside a chunk (>= 0 where j is visible to i)
    if REVERSE:
        dist = offs_c[None, :] - offs_c[:, None]
    else:
        dist = offs_c[:, None] - offs_c[None, :]
    visible = dist >= 0
    if HAS_DECAY:
        intra = tl.where(visible, tl.exp(-slope * tl.maximum(dist, 0).to(tl.float32)), 0.0) * scale
    else:
        intra = tl.where(visible, scale, 0.0)

    n_chunks = tl.cdiv(seqlen, BLOCK_C)
    for it in range(n_chunks):
        if REVERSE:
            chunk = n_chunks - 1 - it
        else:
            chunk = it
        start = chunk * BLOCK_C
        length = tl.minimum(seqlen - start, BLOCK_C)
        rows = start + offs_c
        valid = rows < seqlen
        rows64 = rows.to(tl.int64)
        q = tl.load(q_base + rows64[:, None] * stride_qn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        k = tl.load(k_base + rows64[:, None] * stride_kn + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_base + rows64[:, None] * stride_vn + offs_e[None, :],
                    mask=valid[:, None] & mask_e[None, :], other=0.0)

        # intra-chunk: masked, decayed (Q K^T) V on tensor cores
        a = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * intra
        out = tl.dot(a.to(v.dtype), v, input_precision=DOT_PRECISION)

        # inter-chunk: the carried state, decayed to each row (exponents clamped >= 0:
        # rows past the end are zero and must not meet an overflowing factor)
        if REVERSE:
            e_out = tl.maximum(length - 1 - offs_c, 0)
            e_upd = offs_c + 1
        else:
            e_out = offs_c + 1
            e_upd = tl.maximum(length - 1 - offs_c, 0)
        if HAS_DECAY:
            f_out = tl.exp(-slope * e_out.to(tl.float32)) * out_scale
            f_upd = tl.exp(-slope * e_upd.to(tl.float32)) * upd_scale
            f_state = tl.exp(-slope * length.to(tl.float32))
        else:
            f_out = tl.zeros([BLOCK_C], dtype=tl.float32) + out_scale
            f_upd = tl.zeros([BLOCK_C], dtype=tl.float32) + upd_scale
            f_state = 1.0
        q_dec = q.to(tl.float32) * f_out[:, None]
        out += tl.dot(q_dec, state, input_precision=STATE_PRECISION)
        tl.store(o_base + rows64[:, None] * stride_on + offs_e[None, :], out.to(O.dtype.element_ty),
                 mask=valid[:, None] & mask_e[None, :])

        k_dec = k.to(tl.float32) * f_upd[:, None]
        state = state * f_state + tl.dot(tl.trans(k_dec), v.to(tl.float32), input_precision=STATE_PRECISION)

    if STORE_PN:
        pn_ptrs = (PN + off_b * stride_pnb + off_h.to(tl.int64) * stride_pnh
                   + offs_k[:, None] * stride_pnr + offs_e[None, :] * stride_pnc)
        tl.store(pn_ptrs, state, mask=p_mask)


@triton.jit
def linear_recurrent_kernel(
    Q, K, V, O, S0, SN, SLOPES, CU_SEQLENS,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_sb, stride_sh, stride_sr,
    num_heads, groups, seqlen, scale,
    DIM_K: tl.constexpr, DIM_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, VARLEN: tl.constexpr,
):
    """Token-by-token recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale q_t S_t:
    the decoding step (N = 1), with no padding to a chunk. S0 and SN are fp32
    (B, H, K, E) with the same strides (last one 1); (S, H, K, E) for a packed batch
    (VARLEN: program s * H + h runs sequence s, as in ``linear_chunk_kernel``)."""
    pid_e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = pid_bh % num_heads
    off_hk = (off_h // groups).to(tl.int64)
    if VARLEN:
        bos = tl.load(CU_SEQLENS + off_b).to(tl.int64)
        seqlen = (tl.load(CU_SEQLENS + off_b + 1) - tl.load(CU_SEQLENS + off_b)).to(tl.int32)
        row0_q, row0_k, row0_v, row0_o = bos * stride_qn, bos * stride_kn, bos * stride_vn, bos * stride_on
    else:
        row0_q, row0_k, row0_v, row0_o = (off_b * stride_qb, off_b * stride_kb, off_b * stride_vb,
                                          off_b * stride_ob)
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
    if HAS_DECAY:
        lam = tl.exp(-tl.load(SLOPES + off_h).to(tl.float32))
    else:
        lam = 1.0
    for t in range(seqlen):
        q = tl.load(q_base + t * stride_qn + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * stride_kn + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * stride_vn + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        state = state * lam + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * state, axis=0) * scale
        tl.store(o_base + t * stride_on + offs_e, o.to(O.dtype.element_ty), mask=mask_e)
    tl.store(SN + s_off, state, mask=s_mask)
