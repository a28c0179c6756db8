"""Block schedule and mask of the flash variant: dense, or bottom-right causal.

The variant's one argument is ``CAUSAL`` (a compile-time flag). With
``offset = seqlen_k - seqlen_q`` query row i sits at key position i + offset and,
when causal, sees keys j <= i + offset.
"""

import triton
import triton.language as tl


@triton.jit
def flash_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    return k_pos <= q_pos + (seqlen_k - seqlen_q)


@triton.jit
def flash_kv_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q, seqlen_k,
                   CAUSAL: tl.constexpr):
    """Key blocks for the query rows [start_m, start_m + BLOCK_M): all of them unless causal;
    causal: blocks wholly left of the diagonal unmasked, the diagonal band masked."""
    n_blocks = (seqlen_k + BLOCK_N - 1) // BLOCK_N
    if CAUSAL:
        offset = seqlen_k - seqlen_q
        # every row of the tile sees keys j <= start_m + offset
        full_hi = tl.minimum(tl.maximum(start_m + offset + 1, 0) // BLOCK_N, n_blocks)
        last_row = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        hi = tl.minimum((tl.maximum(last_row + offset + 1, 0) + BLOCK_N - 1) // BLOCK_N, n_blocks)
        hi = tl.maximum(hi, full_hi)
        return (0, full_hi), (full_hi, hi)
    else:
        return ((0, n_blocks),)


@triton.jit
def flash_q_range(start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q, seqlen_k,
                  CAUSAL: tl.constexpr):
    """Query blocks that see the keys [start_n, start_n + BLOCK_N) (transposed schedule)."""
    n_blocks = (seqlen_q + BLOCK_M - 1) // BLOCK_M
    if CAUSAL:
        offset = seqlen_k - seqlen_q
        # row i sees key j iff i >= j - offset
        lo = tl.minimum(tl.maximum(start_n - offset, 0) // BLOCK_M, n_blocks)
        last_key = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
        full_lo = tl.minimum((tl.maximum(last_key - offset, 0) + BLOCK_M - 1) // BLOCK_M, n_blocks)
        full_lo = tl.maximum(full_lo, lo)
        return (full_lo, n_blocks), (lo, full_lo)
    else:
        return ((0, n_blocks),)


@triton.jit
def masked_kv_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q, seqlen_k,
                    CAUSAL: tl.constexpr):
    """Every key block as a partial block (dense attention with a mask_mod, no block mask)."""
    return (0, 0), (0, (seqlen_k + BLOCK_N - 1) // BLOCK_N)


@triton.jit
def masked_q_range(start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, off_b, off_h, seqlen_q, seqlen_k,
                   CAUSAL: tl.constexpr):
    """Every query block as a partial block (transposed :func:`masked_kv_range`)."""
    return (0, 0), (0, (seqlen_q + BLOCK_M - 1) // BLOCK_M)
