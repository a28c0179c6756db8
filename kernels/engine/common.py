"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


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
