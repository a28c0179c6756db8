"""PyTorch reference of the flex variant: the flash or block-sparse reference with mods."""

from __future__ import annotations

from typing import Optional

import torch

from ..block_sparse.block_mask import BlockMask
from ..block_sparse.reference import block_sparse_reference
from ..checks import check_scale
from ..flash.reference import dense_attention
from .._reference import lse_dtype
from ..mods import MaskMod, Problem, ScoreMod
from ..mods.core import check_mask_mod, check_score_mod


def flex_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: Optional[ScoreMod] = None,
                   mask_mod: Optional[MaskMod] = None, block_mask: Optional[BlockMask] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None, return_lse: bool = False):
    """FlexAttention semantics, in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. With a block mask: :func:`block_sparse_reference` (listed
    tiles only, its mask_mod in partial tiles, ``mask_mod`` everywhere); without one:
    dense attention with ``mask_mod`` as the token mask. Memory O(chunk x keys).
    """
    if block_mask is not None:
        return block_sparse_reference(q, k, v, block_mask=block_mask, scale=scale, softcap=softcap,
                                      score_mod=score_mod, mask_mod=mask_mod, return_lse=return_lse)
    problem = Problem.of("flex", q, k)
    out, lse = dense_attention(q, k, v, causal=False, sm_scale=check_scale(scale, q.shape[-1]), softcap=softcap,
                               score_mod=check_score_mod("score_mod", score_mod, problem),
                               mask_mod=check_mask_mod("mask_mod", mask_mod, problem))
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
