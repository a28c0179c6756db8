"""Token mask of the block_sparse variant (list mode of the fused engine).

Which tiles are visited is data: ``attnkit.BlockMask`` builds the engine's
``BlockLists`` (full tiles skip the mask; partial tiles are those a causal diagonal
crosses, or where the mask's mask_mod cuts the tile). With ``causal`` the variant's
token mask is the bottom-right causal one: query row i sits at key position
i + seqlen_k - seqlen_q and sees keys j <= that. It takes no arguments.
"""

import triton
import triton.language as tl  # noqa: F401  (Triton requires it in a @triton.jit function's globals)


@triton.jit
def block_sparse_causal_mask(q_pos, k_pos, off_b, off_h, seqlen_q, seqlen_k):
    return k_pos <= q_pos + (seqlen_k - seqlen_q)
