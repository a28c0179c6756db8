"""Token mask of the block_sparse variant (list mode of the fused engine).

Which tiles are visited is data: ``attnkit.BlockMask`` builds the engine's
``BlockLists`` (full tiles skip the mask; partial tiles are those a causal diagonal
crosses). Inside a partial tile the only token mask is the bottom-right causal one:
query row i sits at key position i + seqlen_k - seqlen_q and sees keys j <= that.
"""

import triton
import triton.language as tl


@triton.jit
def block_sparse_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k, MASK_PTR, mask_sb, mask_sh, mask_a0,
                      mask_a1, MASK_CFG: tl.constexpr):
    return k_pos <= q_pos + (seqlen_k - seqlen_q)
