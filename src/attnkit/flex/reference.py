"""PyTorch reference of the flex variant: the flash or block-sparse reference with mods."""

from __future__ import annotations

import torch

from .._reference import lse_dtype, map_sequences
from ..block_sparse.block_mask import BlockMask
from ..block_sparse.reference import block_sparse_reference
from ..checks import check_scale
from ..dropout import Dropout
from ..flash.reference import dense_attention
from ..mods import MaskMod, Problem, ScoreMod
from ..mods.core import check_mask_mod, check_score_mod


def flex_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: ScoreMod | None = None,
                   mask_mod: MaskMod | None = None, block_mask: BlockMask | None = None,
                   scale: float | None = None, softcap: float | None = None,
                   cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                   dropout_p: float = 0.0, return_lse: bool = False):
    """FlexAttention semantics, in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. With a block mask: :func:`block_sparse_reference` (listed
    tiles only, its mask_mod in partial tiles, ``mask_mod`` everywhere); without one:
    dense attention with ``mask_mod`` as the token mask. Memory O(chunk x keys). Packed
    sequences (B = 1, ``cu_seqlens_q/k`` (S + 1,), no block mask) are run one at a time,
    the mods seeing the sequence index as ``b``. Attention dropout (``dropout_p``) as the
    kernel's for the same generator state (attnkit.dropout).
    """
    if block_mask is not None:
        return block_sparse_reference(q, k, v, block_mask=block_mask, scale=scale, softcap=softcap,
                                      score_mod=score_mod, mask_mod=mask_mod, dropout_p=dropout_p,
                                      return_lse=return_lse)
    problem = Problem.of("flex", q, k, cu_seqlens_q, cu_seqlens_k)
    options = {"causal": False, "sm_scale": check_scale(scale, q.shape[-1]), "softcap": softcap,
               "score_mod": check_score_mod("score_mod", score_mod, problem),
               "mask_mod": check_mask_mod("mask_mod", mask_mod, problem),
               "dropout": Dropout.draw(dropout_p, q.device)}

    if cu_seqlens_q is not None:
        out, lse = map_sequences(lambda q_s, k_s, v_s, seq: dense_attention(q_s, k_s, v_s, first_batch=seq, **options),
                                 q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = dense_attention(q, k, v, **options)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
