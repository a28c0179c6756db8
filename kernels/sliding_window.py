"""Block schedule and token mask of the sliding_window variant (range mode of the fused engine).

Semantics (docs/sliding_window.md): with ``offset = seqlen_k - seqlen_q`` query row i sits at key
position p = i + offset and sees key j iff

    j <= p + right  and  (j >= p - left  or  j < sinks).

``left`` and ``right`` arrive here already non-negative: the host replaces -1
(unbounded) and anything larger than ``seqlen_q + seqlen_k`` by ``seqlen_q + seqlen_k``,
which is unbounded in effect and keeps every sum below in int32.

The variant's arguments: ``(sinks, left, right, WINDOWS)``. With one window for all
heads ``WINDOWS`` is None and ``left``/``right`` hold it; with per-head windows
``WINDOWS`` points at an int32 (Hq, 2) tensor of (left, right) rows (contiguous) and
``left``/``right`` are unused.

Schedule: a query tile visits the key blocks that intersect the union of its rows'
windows, plus the sink blocks [0, ceil(sinks / BLOCK_N)) that lie left of them: cost
O(N * (W + S)). The blocks every row of the tile sees whole run without the mask
(the ``full`` range); the window's two ragged edges and the detached sink blocks are
the three partial ranges. The transposed schedule (for dK/dV) is built the same way.
"""

import triton
import triton.language as tl


@triton.jit
def _window(off_h, left, right, WINDOWS):
    """(left, right) of query head ``off_h``, both >= 0."""
    if WINDOWS is not None:
        return tl.load(WINDOWS + 2 * off_h), tl.load(WINDOWS + 2 * off_h + 1)
    else:
        return off_h * 0 + left, off_h * 0 + right


@triton.jit
def sliding_window_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, sinks, left, right, WINDOWS):
    left, right = _window(off_h, left, right, WINDOWS)
    pos = q_pos + (seqlen_k - seqlen_q)
    return (k_pos <= pos + right) & ((k_pos >= pos - left) | (k_pos < sinks))


@triton.jit
def sliding_window_kv_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q,
                            seqlen_k, sinks, left, right, WINDOWS):
    """Key blocks for the query rows [start_m, start_m + BLOCK_M) of head ``off_h``: the full
    blocks, then the window's two ragged edges and the detached sink blocks (partial)."""
    left, right = _window(off_h, left, right, WINDOWS)
    n_blocks = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    offset = seqlen_k - seqlen_q
    p0 = start_m + offset                                     # first row's key position
    p1 = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1 + offset  # last row's key position
    # keys some row sees through its window: [lo, hi) (clamped to the sequence)
    hi = tl.minimum(tl.maximum(p1 + right + 1, 0), seqlen_k)
    lo = tl.minimum(tl.maximum(p0 - left, 0), hi)
    w_hi = (hi + BLOCK_N - 1) // BLOCK_N
    w_lo = tl.minimum(lo // BLOCK_N, w_hi)
    # blocks whose keys every row sees: keys in [p1 - left, p0 + right]
    f_lo = (tl.maximum(p1 - left, 0) + BLOCK_N - 1) // BLOCK_N
    f_lo = tl.minimum(tl.maximum(f_lo, w_lo), w_hi)
    end = p0 + right + 1
    f_hi = tl.where(end >= seqlen_k, n_blocks, tl.maximum(end, 0) // BLOCK_N)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), w_hi)
    # sink keys some row sees lie in [0, min(sinks, hi)), never right of the window's blocks
    s_hi = (tl.minimum(hi, sinks) + BLOCK_N - 1) // BLOCK_N
    s_hi = tl.minimum(s_hi, w_lo)
    return (f_lo, f_hi), (w_lo, f_lo), (f_hi, w_hi), (0 * s_hi, s_hi)


@triton.jit
def sliding_window_q_range(start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q,
                           seqlen_k, sinks, left, right, WINDOWS):
    """Query blocks of head ``off_h`` that see a key in [start_n, start_n + BLOCK_N) (transposed)."""
    left, right = _window(off_h, left, right, WINDOWS)
    n_blocks = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    offset = seqlen_k - seqlen_q
    k0 = start_n
    k1 = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    # row i (position i + offset) sees key j through the window iff j - right <= i + offset <= j + left;
    # a sink key j is seen by every row with i + offset >= j - right.
    has_sink = k0 < sinks
    all_sink = k1 < sinks
    # rows some key of the block is seen by: [lo, hi)
    hi_w = tl.minimum(tl.maximum(k1 + left - offset + 1, 0), seqlen_q)
    hi = tl.where(has_sink, seqlen_q, hi_w)
    lo = tl.minimum(tl.maximum(k0 - right - offset, 0), hi)
    q_hi = (hi + BLOCK_M - 1) // BLOCK_M
    q_lo = tl.minimum(lo // BLOCK_M, q_hi)
    # rows that see every key of the block: [k1 - right, k0 + left] (- offset); unbounded above for sinks
    f_lo = (tl.maximum(k1 - right - offset, 0) + BLOCK_M - 1) // BLOCK_M
    f_lo = tl.minimum(tl.maximum(f_lo, q_lo), q_hi)
    end = k0 + left - offset + 1
    f_hi = tl.where((end >= seqlen_q) | all_sink, n_blocks, tl.maximum(end, 0) // BLOCK_M)
    f_hi = tl.minimum(tl.maximum(f_hi, f_lo), q_hi)
    return (f_lo, f_hi), (q_lo, f_lo), (f_hi, q_hi)
