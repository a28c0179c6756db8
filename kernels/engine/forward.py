"""Forward kernel of the fused softmax-attention engine (FlashAttention-2 algorithm).

One program owns BLOCK_M query rows of one (batch, query head) and streams the key
blocks its schedule names, keeping an online softmax in registers. What a variant
and a user plug in (all ``@triton.jit`` functions passed as constexprs, each with its
own runtime arguments passed as tuples):

* ``RANGE_FN(start_m, BLOCK_M, BLOCK_N, b, h, seqlen_q, seqlen_k, *VARIANT_ARGS)`` ->
  ((lo, hi), ...): the key-block segments, full first (range mode); or ``LISTS``,
  the full and partial block lists of list mode;
* ``VARIANT_MASK(q_pos, k_pos, b, h, seqlen_q, seqlen_k, *VARIANT_ARGS)`` -> bool: the
  variant's token mask inside partial blocks (or None);
* ``POSITIONS(...)`` -> (b, h, q_idx, kv_idx): the positions mods see (None: bottom-right);
* ``SCORE_MOD(score, b, h, q_idx, kv_idx, *SCORE_ARGS)`` -> score (or None);
* ``MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS)`` -> bool (or None): in partial blocks, and
  in full blocks too unless MASK_FULL_BLOCKS is False (the schedule's full blocks were
  built from this mask_mod, as create_block_mask's are).

Attention dropout (``DROPOUT``, a compile-time flag; off, the kernel is the same as
without it): the probabilities are dropped after they update the softmax sums (the
LSE is the undropped one) and before P.V, by the keep bits of ``dropout_keep``
(dropout.py) read with ``DROPOUT_ARGS``; the output is scaled by 1 / (1 - p) once.

Constexprs: HEAD_DIM/HEAD_DIM_V are the real head dims and BLOCK_D/BLOCK_DV their
power-of-two tiles; EVEN_M/EVEN_N drop row/key bounds checks when the lengths are
multiples of every tile; LIST_BQ/LIST_BK are the list block sizes (multiples of
BLOCK_M/BLOCK_N); DOT_PRECISION is "ieee" for float32 inputs, "tf32" otherwise;
POSITIVE_SCALE (sm_scale > 0) lets a plain launch (no score mod, no softcap) fold the
scale into the exp2 argument. TMA (a config choice, sm_90+ with 16-byte aligned rows)
reads Q, K, V and writes O through tensor descriptors instead of pointer arithmetic;
padding rows and columns then come from the copy engine, not from masks.
Keys at or past seqlen_k are masked by the engine itself, in every block.
"""

import triton
import triton.language as tl

from .common import (
    LN2,
    block_index,
    head_rows,
    load_rows,
    scores,
    segments,
    sequence_bounds,
    tile_source,
    token_mask,
)
from .dropout import dropout_keep


@triton.jit
def _forward_blocks(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                    lo, hi, INDEX, seq, sm_scale, qk_scale, softcap, VARIANT_ARGS, SCORE_ARGS, MASK_ARGS,
                    DROPOUT_ARGS, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr, SCORE_MOD: tl.constexpr,
                    MASK_MOD: tl.constexpr, LIST: tl.constexpr, SUB: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    CHECK_N: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    FOLD_SCALE: tl.constexpr, HAS_SINK: tl.constexpr, TMA: tl.constexpr):
    """One segment: the online-softmax update over key blocks lo .. hi - 1, with the token
    masks this segment needs (None for a hook it does not apply).

    FOLD_SCALE (no score mod, no softcap, scale > 0): the log2 scores are qk * qk_scale, so
    the row max is taken on qk and the scale enters the exp2 argument as one FMA per score.
    """
    seqlen_k = seq[3]
    MASKED: tl.constexpr = VARIANT_MASK is not None or MASK_MOD is not None
    # A row can see only -inf scores in a block only where a mask, a ragged edge or a score
    # mod can produce them; a sink starts every row's max at a finite logit.
    GUARD: tl.constexpr = (MASKED or CHECK_N or SCORE_MOD is not None) and not HAS_SINK
    for it in range(lo, hi):
        start_n = block_index(it, INDEX, LIST, SUB) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_src, start_n, stride_kn, offs_n, seqlen_k, offs_d, HEAD_DIM, CHECK_N, PAD_D, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if FOLD_SCALE:
            s = qk
        else:
            s, _, _ = scores(qk, offs_m[:, None], offs_n[None, :], seq, sm_scale, softcap, VARIANT_ARGS,
                             SCORE_ARGS, POSITIONS, SCORE_MOD, HAS_SOFTCAP)
        if MASKED:
            keep = token_mask(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, MASK_ARGS, VARIANT_MASK,
                              POSITIONS, MASK_MOD)
            s = tl.where(keep, s, float("-inf"))
        if CHECK_N:
            s = tl.where(offs_n[None, :] < seqlen_k, s, float("-inf"))
        if FOLD_SCALE:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if GUARD:
            # A row that has seen only masked keys keeps m = -inf; shift by 0 instead so no NaN appears.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        if FOLD_SCALE:
            p = tl.math.exp2(s * qk_scale - m_shift[:, None])
        else:
            p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # after the sums: the LSE is the undropped softmax's
            p = tl.where(dropout_keep(offs_m[:, None], offs_n[None, :], seq, VARIANT_ARGS, POSITIONS, DROPOUT_ARGS),
                         p, 0.0)
        v = load_rows(v_src, start_n, stride_vn, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, CHECK_N, PAD_DV, TMA)
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
    VARIANT_ARGS, LISTS, SCORE_ARGS, MASK_ARGS, DROPOUT_ARGS,
    RANGE_FN: tl.constexpr, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr, MASK_FULL_BLOCKS: tl.constexpr,
    LIST_BQ: tl.constexpr, LIST_BK: tl.constexpr,
    VARLEN: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, POSITIVE_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // num_heads_q
    off_h = off_bh % num_heads_q
    tensor_b, q_start, seqlen_q, k_start, seqlen_k = sequence_bounds(off_b, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K,
                                                                     VARLEN)
    if start_m < seqlen_q:
        off_hk = off_h // groups
        q_base = head_rows(Q, tensor_b, off_h, q_start, stride_qb, stride_qh, stride_qm)
        k_base = head_rows(K, tensor_b, off_hk, k_start, stride_kb, stride_kh, stride_kn)
        v_base = head_rows(V, tensor_b, off_hk, k_start, stride_vb, stride_vh, stride_vn)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        CHECK_M: tl.constexpr = not EVEN_M
        CHECK_N: tl.constexpr = not EVEN_N
        PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
        PAD_DV: tl.constexpr = HEAD_DIM_V != BLOCK_DV
        LIST: tl.constexpr = LISTS is not None
        SUB: tl.constexpr = LIST_BK // BLOCK_N
        q = load_rows(tile_source(q_base, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D, TMA), start_m, stride_qm,
                      offs_m, seqlen_q, offs_d, HEAD_DIM, CHECK_M, PAD_D, TMA)
        k_src = tile_source(k_base, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
        v_src = tile_source(v_base, seqlen_k, stride_vn, HEAD_DIM_V, BLOCK_N, BLOCK_DV, TMA)

        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        if HAS_SINK:
            # The sink is one extra logit with no value: start the running max at it with mass 1.
            sink = tl.load(SINK + off_h).to(tl.float32) * 1.4426950408889634
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        else:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + float("-inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        seq = (off_b, off_h, seqlen_q, seqlen_k)
        FOLD_SCALE: tl.constexpr = SCORE_MOD is None and not HAS_SOFTCAP and POSITIVE_SCALE
        qk_scale = sm_scale * 1.4426950408889634  # natural-log scores -> log2 units, for exp2
        ranges, index = segments(start_m // LIST_BQ, start_m, BLOCK_M, BLOCK_N, seq, RANGE_FN, LISTS, VARIANT_ARGS,
                                 SUB)
        for seg in tl.static_range(len(ranges)):  # segment 0: full blocks; the others: partial blocks
            acc, l_i, m_i = _forward_blocks(
                acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_d, offs_dv,
                ranges[seg][0], ranges[seg][1], index[seg if LIST else 0], seq, sm_scale, qk_scale, softcap,
                VARIANT_ARGS, SCORE_ARGS, MASK_ARGS, DROPOUT_ARGS, VARIANT_MASK if seg > 0 else None, POSITIONS,
                SCORE_MOD, MASK_MOD if seg > 0 or MASK_FULL_BLOCKS else None,
                LIST, SUB, BLOCK_N, HEAD_DIM, HEAD_DIM_V, CHECK_N, PAD_D, PAD_DV, HAS_SOFTCAP, DROPOUT, DOT_PRECISION,
                FOLD_SCALE, HAS_SINK, TMA)

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        if DROPOUT:  # the kept probabilities' 1 / (1 - p), once per row
            out = acc * (DROPOUT_ARGS[2] / l_safe)[:, None]
        else:
            out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        o_base = head_rows(O, tensor_b, off_h, q_start, stride_ob, stride_oh, stride_om)
        o_ptrs = o_base + offs_m[:, None] * stride_om + offs_dv[None, :]
        if TMA:  # the copy engine drops the rows and columns past the ends
            tile_source(o_base, seqlen_q, stride_om, HEAD_DIM_V, BLOCK_M, BLOCK_DV, TMA).store(
                [start_m, 0], out.to(O.dtype.element_ty))
        elif CHECK_M or PAD_DV:
            tl.store(o_ptrs, out.to(O.dtype.element_ty),
                     mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
        else:
            tl.store(o_ptrs, out.to(O.dtype.element_ty))
        l_ptrs = head_rows(LSE, tensor_b, off_h, q_start, stride_lb, stride_lh, 1) + offs_m
        if CHECK_M:
            tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)
        else:
            tl.store(l_ptrs, lse)
