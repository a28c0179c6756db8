"""Autograd wrapper of the fused softmax engine, shared by every softmax variant.

A variant builds an ``attnkit.kernels.engine.Schedule`` (its block schedule and
token mask) and calls :func:`fused_attention`; GQA, softcap, sink logits and packed
variable-length batches are handled here and in the engine, once for all variants.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch


def _kernels():
    from . import kernels  # imported lazily: importing it imports triton

    return kernels


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink_logits, schedule, sm_scale, softcap, cu_q, cu_k, max_q, max_k):
        engine = _kernels().engine
        o, lse = engine.attention_forward(
            q, k, v, schedule, sm_scale=sm_scale, softcap=softcap,
            sink_logits=None if sink_logits is None else sink_logits.detach().float().contiguous(),
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        ctx.save_for_backward(q, k, v, o, lse, sink_logits)
        ctx.params = (schedule, sm_scale, softcap, cu_q, cu_k, max_q, max_k)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, sink_logits = ctx.saved_tensors
        schedule, sm_scale, softcap, cu_q, cu_k, max_q, max_k = ctx.params
        dq, dk, dv, delta = _kernels().engine.attention_backward(
            do, q, k, v, o, lse, schedule, sm_scale=sm_scale, softcap=softcap,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        d_sink = None
        if sink_logits is not None and ctx.needs_input_grad[3]:
            # d sink_h = -sum_rows P_sink * rowsum(dO * O), with P_sink = exp(sink_h - lse)
            p_sink = torch.exp(sink_logits.float().view(1, -1, 1) - lse)
            d_sink = -(p_sink * delta).sum(dim=(0, 2)).to(sink_logits.dtype)
        return dq, dk, dv, d_sink, None, None, None, None, None, None, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Any, *, sm_scale: float,
                    softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
                    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fused attention with a variant's schedule.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); packed varlen with B = 1
    and cu_seqlens_q/k (S + 1,) int32. ``sink_logits`` (Hq,) is differentiable.
    Returns out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) float32 (not differentiable).
    """
    max_q = max_k = None
    if cu_seqlens_q is not None:
        max_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        max_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FusedAttention.apply(q, k, v, sink_logits, schedule, sm_scale, softcap, cu_seqlens_q, cu_seqlens_k,
                                 max_q, max_k)
