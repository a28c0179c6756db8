"""Small @triton.jit helpers shared by the forward and backward kernels.

Notation: a *segment* is a run of key blocks (query blocks in the dK/dV pass) that a
program visits. Segment 0 holds the *full* blocks, visited without any token mask;
every later segment holds *partial* blocks, visited with the variant's mask and the
mask_mod. In range mode the variant's range function returns the segments as
``(lo, hi)`` pairs; in list mode they are the full and partial block lists
(docs/architecture.md, Schedules and hooks).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 and needs no libdevice call.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a [R, C] tile, bounds-checking rows/cols only where the sizes may be ragged."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def head_rows(PTR, b, h, row0, stride_b, stride_h, stride_row):
    """Pointer to row ``row0`` of head ``h`` of batch entry ``b`` of a (B, H, N, ...) tensor,
    with 64-bit offsets (B * H * N * D can pass 2**31)."""
    return PTR + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + row0.to(tl.int64) * stride_row


@triton.jit
def tile_source(base, n_rows, stride_row, N_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                TMA: tl.constexpr):
    """Where row tiles of the (n_rows, N_COLS) matrix at ``base`` (row stride ``stride_row``,
    columns contiguous) are read from: with TMA a tensor descriptor, whose loads are done by
    the copy engine and read rows and columns past the ends as zeros; else ``base`` itself."""
    if TMA:  # (at least one row: an empty sequence's descriptor is made but never read)
        return tl.make_tensor_descriptor(base, shape=[tl.maximum(n_rows, 1), N_COLS], strides=[stride_row, 1],
                                         block_shape=[BLOCK_R, BLOCK_C])
    else:
        return base


@triton.jit
def load_rows(src, first_row, stride_row, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr,
              CHECK_COLS: tl.constexpr, TMA: tl.constexpr):
    """The [R, C] tile of rows ``rows`` (= first_row + arange(R)) of a :func:`tile_source`."""
    if TMA:
        return src.load([first_row, 0])
    else:
        return load_tile(src + rows[:, None] * stride_row + cols[None, :], rows, n_rows, cols, n_cols,
                         CHECK_ROWS, CHECK_COLS)


@triton.jit
def load_resident(base, first_row, stride_row, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, TMA: tl.constexpr):
    """A tile a program reads once and keeps (the backward's K and V, or Q and dO): the rows
    ``rows`` (= first_row + arange(BLOCK_R)) of the (n_rows, N_COLS) matrix at ``base``,
    through its own :func:`tile_source`."""
    return load_rows(tile_source(base, n_rows, stride_row, N_COLS, BLOCK_R, BLOCK_C, TMA), first_row, stride_row,
                     rows, n_rows, cols, N_COLS, CHECK_ROWS, CHECK_COLS, TMA)


@triton.jit
def sequence_bounds(off_b, seqlen_q_arg, seqlen_k_arg, CU_Q, CU_K, VARLEN: tl.constexpr):
    """(tensor batch index, first query row, Nq, first key row, Nk) of sequence ``off_b``:
    a batch entry, or one sequence of a packed (B = 1) batch given by cu_seqlens."""
    if VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        return (off_b * 0, q_start, tl.load(CU_Q + off_b + 1) - q_start,
                k_start, tl.load(CU_K + off_b + 1) - k_start)
    else:
        return off_b, off_b * 0, seqlen_q_arg, off_b * 0, seqlen_k_arg


@triton.jit
def segments(row, start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, seq, RANGE_FN: tl.constexpr, LISTS,
             VARIANT_ARGS, SUB: tl.constexpr):
    """The segments a program visits, as ((lo, hi), ...), and the block-index lists of list mode.

    Range mode (``LISTS`` None): the variant's ``RANGE_FN(start, BLOCK_M, BLOCK_N, b, h,
    seqlen_q, seqlen_k, *VARIANT_ARGS)``. List mode: row ``row`` of the full and partial
    lists, each list entry split into SUB kernel blocks.
    """
    off_b, off_h, seqlen_q, seqlen_k = seq
    if LISTS is None:
        # the second value is a placeholder: range-mode segments have no index lists
        return RANGE_FN(start, BLOCK_M, BLOCK_N, off_b, off_h, seqlen_q, seqlen_k, *VARIANT_ARGS), (0, 0)
    else:
        (CNT_FULL, IDX_FULL, CNT_PART, IDX_PART, cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr,
         cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr) = LISTS
        # every list has its own strides (0 on broadcast dims), so lists may differ in width
        b = off_b.to(tl.int64)
        n_full = tl.load(CNT_FULL + b * cf_sb + off_h * cf_sh + row * cf_sr)
        n_part = tl.load(CNT_PART + b * cp_sb + off_h * cp_sh + row * cp_sr)
        full = IDX_FULL + b * xf_sb + off_h * xf_sh + row * xf_sr
        part = IDX_PART + b * xp_sb + off_h * xp_sh + row * xp_sr
        return ((0, n_full * SUB), (0, n_part * SUB)), (full, part)


@triton.jit
def block_index(it, INDEX, LIST: tl.constexpr, SUB: tl.constexpr):
    """Kernel-block index of iteration ``it`` of a segment: ``it`` itself in range mode;
    in list mode, entry ``it // SUB`` of the list split into SUB kernel blocks."""
    if LIST:
        return tl.load(INDEX + it // SUB) * SUB + it % SUB
    else:
        return it


@triton.jit
def mod_positions(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS: tl.constexpr):
    """(b, h, q_idx, kv_idx) that score and mask mods see for tile positions q_pos, k_pos.

    Padding rows and keys of a ragged tile are clamped to the last valid one, so a mod
    never reads past its tensors (their results are discarded by the engine).
    """
    off_b, off_h, seqlen_q, seqlen_k = seq
    q_pos = tl.maximum(tl.minimum(q_pos, seqlen_q - 1), 0)
    k_pos = tl.maximum(tl.minimum(k_pos, seqlen_k - 1), 0)
    if POSITIONS is None:
        # bottom-right: query row i sits at key position i + Nk - Nq
        return off_b, off_h, q_pos + (seqlen_k - seqlen_q), k_pos
    else:
        return POSITIONS(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, *VARIANT_ARGS)


@triton.jit
def scores(qk, q_pos, k_pos, seq, sm_scale, softcap, VARIANT_ARGS, SCORE_ARGS, POSITIONS: tl.constexpr,
           SCORE_MOD: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores of a tile of q.k products, in log2 units, after the scale, the softcap and the
    score_mod; also the score the mod received (natural units) and tanh of the softcap,
    which the backward needs. Without a score mod the scale folds into one multiply."""
    if SCORE_MOD is None:
        if HAS_SOFTCAP:
            t = tanh(qk * (sm_scale / softcap))
            return t * (softcap * LOG2E), qk, t
        else:
            return qk * (sm_scale * LOG2E), qk, qk
    else:
        if HAS_SOFTCAP:
            t = tanh(qk * (sm_scale / softcap))
            s_in = t * softcap
        else:
            t = qk
            s_in = qk * sm_scale
        b, h, q_idx, kv_idx = mod_positions(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS)
        return SCORE_MOD(s_in, b, h, q_idx, kv_idx, *SCORE_ARGS) * LOG2E, s_in, t


@triton.jit
def token_mask(q_pos, k_pos, seq, VARIANT_ARGS, MASK_ARGS, VARIANT_MASK: tl.constexpr, POSITIONS: tl.constexpr,
               MASK_MOD: tl.constexpr):
    """Which pairs of a partial block attend: the variant's mask and the mask_mod (either may be None)."""
    off_b, off_h, seqlen_q, seqlen_k = seq
    if VARIANT_MASK is None:
        b, h, q_idx, kv_idx = mod_positions(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS)
        return MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS)
    else:
        keep = VARIANT_MASK(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, *VARIANT_ARGS)
        if MASK_MOD is not None:
            b, h, q_idx, kv_idx = mod_positions(q_pos, k_pos, seq, VARIANT_ARGS, POSITIONS)
            keep = keep & MASK_MOD(b, h, q_idx, kv_idx, *MASK_ARGS)
        return keep
