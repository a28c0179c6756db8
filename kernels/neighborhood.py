"""Token mask and mod positions of fused neighborhood attention (FNA) on the shared engine.

The engine runs in list mode over tokens permuted so that every multi-dimensional
tile is contiguous, with the dilation groups folded into the head dimension
(attnkit.neighborhood.fused builds the permutation and the block lists). The
variant's arguments are ``(TABLE, tokens, NDIM, GATHER, heads)``:

* ``TABLE``: int32 (3 * NDIM, tokens). Rows ``2a`` and ``2a + 1``: per permuted query,
  its window [start, end) along axis a (start = end = 0 for a padding query, which then
  sees nothing); row ``2 * NDIM + a``: per permuted key, its coordinate along axis a (a
  padding key has a coordinate >= the axis length on some axis, outside every window).
* ``tokens``: the permuted (tile-padded) token count of a group (the table's row stride);
* ``NDIM``: the number of spatial axes (compile-time);
* ``GATHER``: int32 (groups, tokens): the original flat token of every permuted slot,
  ``heads``: the number of query heads of the call. The engine's head index is
  ``group * heads + h``; score and mask mods see the original ``h`` and flat positions.

A query sees a key when the key's coordinate lies in the query's window on every axis.
"""

import triton
import triton.language as tl


@triton.jit
def _axis_ok(q_pos, k_pos, TABLE, tokens, AXIS: tl.constexpr, NDIM: tl.constexpr):
    start = tl.load(TABLE + (2 * AXIS) * tokens + q_pos)
    end = tl.load(TABLE + (2 * AXIS + 1) * tokens + q_pos)
    coord = tl.load(TABLE + (2 * NDIM + AXIS) * tokens + k_pos)
    return (coord >= start) & (coord < end)


@triton.jit
def neighborhood_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, TABLE, tokens, NDIM: tl.constexpr, GATHER,
                      heads):
    # Positions past the (tile-padded) token count only occur in ragged kernel blocks,
    # which the engine masks itself; clamp them so the table loads stay in bounds.
    qp = tl.minimum(q_pos, seqlen_q - 1)
    kp = tl.minimum(k_pos, seqlen_k - 1)
    keep = _axis_ok(qp, kp, TABLE, tokens, 0, NDIM)
    if NDIM >= 2:
        keep = keep & _axis_ok(qp, kp, TABLE, tokens, 1, NDIM)
    if NDIM >= 3:
        keep = keep & _axis_ok(qp, kp, TABLE, tokens, 2, NDIM)
    return keep & (q_pos < seqlen_q)


@triton.jit
def neighborhood_positions(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, TABLE, tokens, NDIM: tl.constexpr,
                           GATHER, heads):
    """(b, h, q_idx, kv_idx) for mods: the original head and flat row-major token indices."""
    row = GATHER + (off_h // heads).to(tl.int64) * tokens
    return off_b, off_h % heads, tl.load(row + q_pos), tl.load(row + k_pos)
