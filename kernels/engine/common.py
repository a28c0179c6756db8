"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 and needs no libdevice call.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def block_index(it, IDX_PTR, LIST: tl.constexpr, SUB: tl.constexpr):
    """Kernel-block index of iteration ``it``: ``it`` itself for an arithmetic range;
    for a block list, entry ``it // SUB`` of the list split into SUB kernel blocks."""
    if LIST:
        return tl.load(IDX_PTR + it // SUB) * SUB + it % SUB
    else:
        return it


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
def scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scaled (and soft-capped) scores in log2 units, plus tanh of the cap (for the gradient)."""
    if HAS_SOFTCAP:
        t = tanh(qk * (sm_scale / softcap))
        return t * (softcap * LOG2E), t
    else:
        return qk * (sm_scale * LOG2E), qk


@triton.jit
def list_entries(row, off_b, off_h, CNT_FULL, IDX_FULL, CNT_PART, IDX_PART,
                 cf_sb, cf_sh, cf_sr, xf_sb, xf_sh, xf_sr, cp_sb, cp_sh, cp_sr, xp_sb, xp_sh, xp_sr):
    """Block-list row ``row`` of (batch, head): (full count, full indices, partial count, partial indices).
    Every tensor has its own strides (0 on broadcast dims), so the lists may differ in width."""
    b = off_b.to(tl.int64)
    n_full = tl.load(CNT_FULL + b * cf_sb + off_h * cf_sh + row * cf_sr)
    n_part = tl.load(CNT_PART + b * cp_sb + off_h * cp_sh + row * cp_sr)
    full = IDX_FULL + b * xf_sb + off_h * xf_sh + row * xf_sr
    part = IDX_PART + b * xp_sb + off_h * xp_sh + row * xp_sr
    return n_full, full, n_part, part


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
