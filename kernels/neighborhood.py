"""Token mask of fused neighborhood attention (FNA) on the shared engine.

The engine runs in list mode over tokens permuted so that every multi-dimensional
tile is contiguous (attnkit.neighborhood.fused builds the permutation and the block
lists). Inside a partial block the exact neighborhood comes from an int32 table
(``MASK_PTR``, row stride ``mask_a0``, the permuted token count) with
``3 * NDIM`` rows, ``NDIM = MASK_CFG`` the number of spatial axes:

* rows ``2a`` and ``2a + 1``: per permuted query, the window [start, end) along axis a
  (start = end = 0 for a padding query, which then sees nothing);
* row ``2 * NDIM + a``: per permuted key, its coordinate along axis a (a padding key
  has a coordinate >= the axis length on some axis, outside every window).

A query sees a key when the key's coordinate lies in the query's window on every axis.
"""

import triton
import triton.language as tl


@triton.jit
def _axis_ok(q_pos, k_pos, MASK_PTR, row_stride, AXIS: tl.constexpr, NDIM: tl.constexpr):
    start = tl.load(MASK_PTR + (2 * AXIS) * row_stride + q_pos)
    end = tl.load(MASK_PTR + (2 * AXIS + 1) * row_stride + q_pos)
    coord = tl.load(MASK_PTR + (2 * NDIM + AXIS) * row_stride + k_pos)
    return (coord >= start) & (coord < end)


@triton.jit
def neighborhood_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0,
                      mask_a1, MASK_CFG: tl.constexpr):
    # Positions past the (tile-padded) token count only occur in ragged kernel blocks,
    # which the engine masks itself; clamp them so the table loads stay in bounds.
    qp = tl.minimum(q_pos, seqlen_q - 1)
    kp = tl.minimum(k_pos, seqlen_k - 1)
    keep = _axis_ok(qp, kp, MASK_PTR, mask_a0, 0, MASK_CFG)
    if MASK_CFG >= 2:
        keep = keep & _axis_ok(qp, kp, MASK_PTR, mask_a0, 1, MASK_CFG)
    if MASK_CFG >= 3:
        keep = keep & _axis_ok(qp, kp, MASK_PTR, mask_a0, 2, MASK_CFG)
    return keep & (q_pos < seqlen_q)
