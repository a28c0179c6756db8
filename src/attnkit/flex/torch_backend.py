"""The ``"torch"`` backend of the flex variant: SDPA without mods, the blocked form of
:mod:`attnkit.torch_backend` with them, the block_sparse variant's torch backend with a
block mask."""

from __future__ import annotations

import torch

from .._reference import lse_dtype, map_sequences
from ..block_sparse.block_mask import BlockMask
from ..checks import check_scale
from ..dropout import Dropout
from ..mods import MaskMod, Problem, ScoreMod
from ..mods.core import check_mask_mod, check_score_mod
from ..registry import get_variant
from ..torch_backend import blocked_attention, sdpa_with_lse, softcap_attention


def flex_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: ScoreMod | None = None,
               mask_mod: MaskMod | None = None, block_mask: BlockMask | None = None, scale: float | None = None,
               softcap: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
               cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False):
    """The torch path of :func:`attnkit.flex_attention` (same arguments and results as the
    reference, computed in the input dtype).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. With a block mask: the block_sparse variant's torch backend
    (only the listed tiles). Without one: with no mod, softcap or dropout, SDPA with its
    LSE; with softcap alone :func:`attnkit.torch_backend.softcap_attention`; otherwise query chunks that score only the span of keys the mask_mod keeps for
    them (fully masked key blocks are skipped), the mods and dropout keyed by the
    reference's positions. Packed sequences run one at a time, as the reference's.
    """
    if block_mask is not None:  # never packed: validation refuses a block mask with cu_seqlens
        sparse = get_variant("block_sparse")
        run = sparse.torch_impl if sparse.torch_impl is not None else sparse.reference
        return run(q, k, v, block_mask=block_mask, scale=scale, softcap=softcap, score_mod=score_mod,
                   mask_mod=mask_mod, dropout_p=dropout_p, return_lse=return_lse)
    problem = Problem.of("flex", q, k, cu_seqlens_q, cu_seqlens_k)
    sm_scale = check_scale(scale, q.shape[-1])
    score = check_score_mod("score_mod", score_mod, problem)
    mask = check_mask_mod("mask_mod", mask_mod, problem)
    # drawn once per call like the reference's, so one seed gives the same mask on both
    dropout = Dropout.draw(dropout_p, q.device)
    fused = softcap is None and score is None and mask is None and dropout is None

    softcap_only = softcap is not None and score is None and mask is None and dropout is None

    def one(q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, seq: int = 0):
        if fused:
            return sdpa_with_lse(q_s, k_s, v_s, scale=sm_scale)
        if softcap_only:
            return softcap_attention(q_s, k_s, v_s, scale=sm_scale, softcap=softcap)
        return blocked_attention(q_s, k_s, v_s, scale=sm_scale, softcap=softcap, score_mod=score, mask_mod=mask,
                                 dropout=dropout, first_batch=seq)

    if cu_seqlens_q is not None:
        out, lse = map_sequences(one, q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = one(q, k, v)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
