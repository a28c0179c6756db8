"""PyTorch reference of the flash variant: exact softmax attention, chunked over queries."""

from __future__ import annotations

from typing import Optional

import torch

from .._reference import expand_kv_heads, lse_dtype, map_query_chunks, query_chunk_rows, softmax_attend
from ..checks import check_scale


def flash_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    sink_logits: Optional[torch.Tensor] = None, cu_seqlens_q: Optional[torch.Tensor] = None,
                    cu_seqlens_k: Optional[torch.Tensor] = None, return_lse: bool = False):
    """Softmax attention computed in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. Causal is bottom-right aligned. Packed sequences (B = 1,
    ``cu_seqlens_q/k``) are run one at a time. Memory: O(chunk * Nk) per step.
    """
    if cu_seqlens_q is not None:
        outs, lses = [], []
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            o, l = flash_reference(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal=causal, scale=scale,
                                   softcap=softcap, sink_logits=sink_logits, return_lse=True)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        return (out, lse) if return_lse else out

    sm_scale = check_scale(scale, q.shape[-1])
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    key_pos = torch.arange(Nk, device=q.device)

    def attend(q_chunk: torch.Tensor, first_row: int):
        mask = None
        if causal:  # bottom-right: query i sits at key position i + Nk - Nq
            query_pos = torch.arange(first_row, first_row + q_chunk.shape[2], device=q.device) + (Nk - Nq)
            mask = key_pos[None, :] <= query_pos[:, None]
        return softmax_attend(q_chunk, k, v, scale=sm_scale, mask=mask, softcap=softcap, sink_logits=sink_logits)

    out, lse = map_query_chunks(attend, q, query_chunk_rows(q.shape[0] * Hq, Nk))
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
