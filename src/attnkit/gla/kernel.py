"""The Triton path of gated linear attention with per-channel gates (``kernels/gla.py``,
flash-linear-attention's chunk_gla scheme): a differentiable autograd.Function around the
forward and backward launches, and :func:`gla_vector_kernel`, the variant's kernel for
gates of shape (B, Hq, N, Dk)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..checks import check_scale


def _kernels():
    from ..kernels import gla  # imported lazily: importing it imports triton

    return gla


class _GlaVector(torch.autograd.Function):
    """q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), g (B, Hq, N, Dk), initial_state
    (B or S, Hq, Dk, Dv) or None -> out (B, Hq, N, Dv) in q's dtype, final state fp32."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, cu_seqlens):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        s0 = None if initial_state is None else initial_state.float().contiguous()
        out, state = _kernels().gla_forward(q, k, v, g, scale, s0, cu_seqlens)
        ctx.save_for_backward(q, k, v, g, s0, state, cu_seqlens)
        ctx.scale = scale
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return out, state

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_state):
        q, k, v, g, s0, state, cu_seqlens = ctx.saved_tensors
        B, Hq, N, _ = q.shape
        Hkv = k.shape[1]
        d_out = torch.zeros(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device) if d_out is None else d_out
        ds = None if d_state is None else d_state.float().contiguous()
        dq, dk, dv, dg, d_s0 = _kernels().gla_backward(
            d_out.to(q.dtype).contiguous(), ds, q, k, v, g, ctx.scale, s0, state, cu_seqlens,
            need_dg=ctx.needs_input_grad[3])
        group = Hq // Hkv
        if group > 1:  # the kernels return dk, dv per query head: sum each GQA group
            dk = dk.view(B, Hkv, group, N, -1).sum(2)
            dv = dv.view(B, Hkv, group, N, -1).sum(2)
        d_init = None if ctx.state_dtype is None else d_s0.to(ctx.state_dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if dg is None else dg.to(g.dtype),
                d_init, None, None)


def gla_vector_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                      scale: float | None = None, initial_state: torch.Tensor | None = None,
                      return_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """Gated linear attention with per-channel gates on the Triton kernels (inputs validated
    already, as :func:`attnkit.gated_linear_attention` does).

    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv) (fp32/fp16/bf16, one dtype);
    g (B, Hq, N, Dk) log-gates <= 0; initial_state (B, Hq, Dk, Dv) (float32 or q's dtype)
    or None; ``cu_seqlens`` (S + 1,) int32 for S sequences packed along N (B = 1), each run
    alone from its own state row ((S, Hq, Dk, Dv)). Returns out (B, Hq, N, Dv) in q's dtype
    [, final state (B or S, Hq, Dk, Dv) float32]. Gradients reach q, k, v, g and
    initial_state (first order).
    """
    if g.dim() != 4:
        raise ValueError(f"gla_vector_kernel takes per-channel gates g of shape (B, Hq, N, Dk), got shape "
                         f"{tuple(g.shape)}")
    c = check_scale(scale, q.shape[-1])
    B, Hq, N, Dk = q.shape
    if N == 0:  # nothing to run: the state passes through
        rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        out = q.new_zeros(B, Hq, 0, v.shape[-1])
        state = (q.new_zeros(rows, Hq, Dk, v.shape[-1], dtype=torch.float32) if initial_state is None
                 else initial_state.float().clone())
        return (out, state) if return_state else out
    out, state = _GlaVector.apply(q, k, v, g, initial_state, c, cu_seqlens)
    return (out, state) if return_state else out
