"""PyTorch reference of the flash variant: exact softmax attention, chunked over queries."""

from __future__ import annotations

from typing import Optional

import torch

from .._reference import (
    bind_score_mod,
    bottom_right,
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    map_sequences,
    mod_positions,
    query_chunk_rows,
    softmax_attend,
)
from ..checks import check_scale
from ..dropout import Dropout, bind_dropout
from ..mods import MaskMod, Problem, ScoreMod, alibi, chain_score_mods
from ..mods.core import check_score_mod


def alibi_then_score_mod(problem: Problem, q: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                         score_mod: Optional[ScoreMod]) -> Optional[ScoreMod]:
    """ALiBi (from ``alibi_slopes``), then ``score_mod``, specialized to ``problem``; None when
    neither is given. Raises on bad input. Shared by flash and decode attention."""
    if alibi_slopes is None and score_mod is None:
        return None
    parts = []
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.is_floating_point():
            got = alibi_slopes.dtype if isinstance(alibi_slopes, torch.Tensor) else type(alibi_slopes).__name__
            raise TypeError(f"alibi_slopes must be a floating tensor (Hq,) or (B, Hq), got {got}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        if alibi_slopes.dim() not in (1, 2):
            raise ValueError(f"alibi_slopes must have shape (Hq,) or (B, Hq), got {tuple(alibi_slopes.shape)}")
        parts.append(check_score_mod("alibi_slopes", alibi(alibi_slopes), problem))
    if score_mod is not None:
        parts.append(check_score_mod("score_mod", score_mod, problem))
    return chain_score_mods(*parts)


def flash_score_mod(q: torch.Tensor, k: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
                    score_mod: Optional[ScoreMod], cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None) -> Optional[ScoreMod]:
    """The score mod a flash call runs: ALiBi (from ``alibi_slopes``), then ``score_mod``,
    specialized to the call; None when neither is given. Raises on bad input."""
    if alibi_slopes is None and score_mod is None:
        return None
    return alibi_then_score_mod(Problem.of("flash", q, k, cu_seqlens_q, cu_seqlens_k), q, alibi_slopes, score_mod)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, sm_scale: float,
                    softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
                    score_mod: Optional[ScoreMod] = None, mask_mod: Optional[MaskMod] = None, first_batch: int = 0,
                    dropout: Dropout | None = None):
    """Dense softmax attention of one (B, H, N, D) problem, chunked over queries: -> (out, lse).

    Optional bottom-right ``causal`` mask, already specialized mods and attention
    ``dropout`` (keyed by the mods' positions); ``first_batch`` is the index mods see for
    batch entry 0 (a packed sequence's index).
    """
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    key_pos = torch.arange(Nk, device=q.device)

    def attend(q_chunk: torch.Tensor, first_row: int):
        query_pos = bottom_right(first_row, q_chunk.shape[2], Nq, Nk, q.device)
        positions = mod_positions(B, Hq, query_pos, key_pos, first_batch=first_batch)
        mask = key_pos[None, :] <= query_pos[:, None] if causal else None
        if mask_mod is not None:
            keep = mask_mod.apply(*positions)
            mask = keep if mask is None else keep & mask
        return softmax_attend(q_chunk, k, v, scale=sm_scale, mask=mask, softcap=softcap, sink_logits=sink_logits,
                              score_mod=bind_score_mod(score_mod, positions), dropout=bind_dropout(dropout, positions))

    return map_query_chunks(attend, q, query_chunk_rows(B * Hq, Nk))


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    sink_logits: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                    score_mod: Optional[ScoreMod] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None, dropout_p: float = 0.0, return_lse: bool = False):
    """Softmax attention computed in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. Causal is bottom-right aligned. Scores: scale, softcap, then
    ALiBi and the score mod. Packed sequences (B = 1, ``cu_seqlens_q/k``) are run one
    at a time. With ``dropout_p`` > 0 the probabilities are dropped by the same mask as
    the kernel's for the same generator state (attnkit.dropout). Memory: O(chunk * Nk)
    per step.
    """
    sm_scale = check_scale(scale, q.shape[-1])
    mod = flash_score_mod(q, k, alibi_slopes, score_mod, cu_seqlens_q, cu_seqlens_k)
    options = dict(causal=causal, sm_scale=sm_scale, softcap=softcap, sink_logits=sink_logits, score_mod=mod,
                   dropout=Dropout.draw(dropout_p, q.device))
    if cu_seqlens_q is not None:
        out, lse = map_sequences(lambda q_s, k_s, v_s, seq: dense_attention(q_s, k_s, v_s, first_batch=seq, **options),
                                 q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = dense_attention(q, k, v, **options)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
