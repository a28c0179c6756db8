"""The ``"torch"`` backend of the flash variant: torch's fused SDPA where it is exact,
the blocked form of :mod:`attnkit.torch_backend` otherwise."""

from __future__ import annotations

import torch

from .._reference import lse_dtype, map_sequences
from ..checks import check_scale
from ..dropout import Dropout
from ..mods import ScoreMod
from ..torch_backend import (
    add_sink_logits,
    blocked_attention,
    sdpa_with_lse,
    softcap_attention,
)
from .reference import flash_score_mod


def flash_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                scale: float | None = None, softcap: float | None = None, sink_logits: torch.Tensor | None = None,
                alibi_slopes: torch.Tensor | None = None, score_mod: ScoreMod | None = None,
                cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                dropout_p: float = 0.0, return_lse: bool = False):
    """The torch path of :func:`attnkit.flash_attention` (same arguments and results as
    the reference, computed in the input dtype).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. Without softcap, ALiBi, score mod and dropout it is SDPA with
    its LSE (:func:`attnkit.torch_backend.sdpa_with_lse`: torch's CPU flash kernel,
    bottom-right causal); sink logits are merged into that result by LSE. Softcap alone
    runs :func:`attnkit.torch_backend.softcap_attention` (query chunks, a hand-written
    backward); ALiBi, score mods and dropout (whose mask is the reference's, keyed by
    positions) run the blocked form. Both skip the keys past a causal chunk's diagonal. Packed
    sequences (``cu_seqlens_q/k``) run one at a time, as the reference's.
    """
    sm_scale = check_scale(scale, q.shape[-1])
    mod = flash_score_mod(q, k, alibi_slopes, score_mod, cu_seqlens_q, cu_seqlens_k)
    # drawn once per call like the reference's, so one seed gives the same mask on both
    dropout = Dropout.draw(dropout_p, q.device)
    fused = mod is None and dropout is None

    def one(q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, seq: int = 0):
        if fused and softcap is None:
            out, lse = sdpa_with_lse(q_s, k_s, v_s, causal=causal, scale=sm_scale)
            return add_sink_logits(out, lse, sink_logits)
        if fused:
            out, lse = softcap_attention(q_s, k_s, v_s, scale=sm_scale, softcap=softcap, causal=causal)
            return add_sink_logits(out, lse, sink_logits)
        return blocked_attention(q_s, k_s, v_s, scale=sm_scale, causal=causal, softcap=softcap, score_mod=mod,
                                 sink_logits=sink_logits, dropout=dropout, first_batch=seq)

    if cu_seqlens_q is not None:
        out, lse = map_sequences(one, q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = one(q, k, v)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
