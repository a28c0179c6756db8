"""The Triton path of the ``delta_rule`` variant (``backend="triton"``).

flash-linear-attention's chunked scheme in Triton (``attnkit.kernels.delta_rule``): forward,
the WY/UT factors per chunk, one sequential pass for the chunk states, the outputs of all
chunks in parallel; backward, the factors and states recomputed, one reverse pass for the
states' gradients, every gradient of all chunks in parallel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..linear.torch_backend import chunk_layout
from .reference import run_delta_rule

#: largest key and value head dim the kernel takes: the state passes hold a (Dk, BLOCK_V) fp32
#: state in registers
MAX_KERNEL_DIM = 256
#: largest key head dim of the backward kernels: their reverse state pass keeps Q, K and W chunks
#: (C, Dk) as dot operands in shared memory, which at Dk = 256 needs more than an sm_90 SM has
MAX_BACKWARD_KEY_DIM = 128


def _kernels():
    from ..kernels import delta_rule  # imported lazily: importing it imports triton

    return delta_rule


def _packing(cu_seqlens: torch.Tensor | None):
    """The kernels' description of packed sequences (``Packing``), or None; reads the lengths
    on the host (the grid needs the number of chunks)."""
    if cu_seqlens is None:
        return None
    kernels = _kernels()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    first, counts = chunk_layout(lengths, kernels.CHUNK)
    table = [(s, i) for s, n in enumerate(counts) for i in range(n)]
    dev = cu_seqlens.device
    return kernels.Packing(cu_seqlens.to(torch.int32).contiguous(),
                           torch.tensor(table, dtype=torch.int32, device=dev).view(-1, 2),
                           torch.tensor(first, dtype=torch.int32, device=dev), len(table))


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


class DeltaRuleFunction(torch.autograd.Function):
    """(q, k, v, beta, g, scale, initial_state, cu_seqlens) -> (out, final state) on the Triton
    kernels, heads already expanded: q, k (B, H, N, Dk), v (B, H, N, Dv), beta and g (B, H, N),
    initial_state (B or S, H, Dk, Dv) -> out (B, H, N, Dv) in q's dtype, state fp32."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        beta, g = beta.contiguous(), _contiguous(g)
        s0 = None if initial_state is None else initial_state.float().contiguous()
        packing = _packing(cu_seqlens)
        out, state = _kernels().delta_rule_forward(q, k, v, beta, g, scale, s0, packing)
        ctx.save_for_backward(q, k, v, beta, g, s0)
        ctx.packing, ctx.scale = packing, scale
        ctx.dtypes = (beta.dtype, None if g is None else g.dtype, None if initial_state is None else initial_state.dtype)
        return out, state

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_out: torch.Tensor | None, d_state: torch.Tensor | None):
        q, k, v, beta, g, s0 = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
        d_out = d_out.to(q.dtype).contiguous()
        d_state = None if d_state is None else d_state.float().contiguous()
        dq, dk, dv, d_beta, d_g, d_s0 = _kernels().delta_rule_backward(d_out, d_state, q, k, v, beta, g, ctx.scale,
                                                                       s0, ctx.packing)
        beta_dtype, g_dtype, s0_dtype = ctx.dtypes
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_beta.to(beta_dtype),
                None if d_g is None else d_g.to(g_dtype), None, None if s0 is None else d_s0.to(s0_dtype), None)


def _kernel_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                 scale: float, state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``run_delta_rule``'s core on the kernel: heads already expanded, q, k (B, H, N, Dk),
    v (B, H, N, Dv), beta and g (B, H, N) -> out (B, H, N, Dv), final state fp32."""
    return DeltaRuleFunction.apply(q, k, v, beta, g, float(scale), state, cu_seqlens)


def delta_rule_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                      g: torch.Tensor | None = None, scale: float | None = None, qk_l2norm: bool = False,
                      initial_state: torch.Tensor | None = None, return_state: bool = False,
                      cu_seqlens: torch.Tensor | None = None):
    """The Triton path of :func:`attnkit.delta_rule_attention` (same arguments, no dispatch):
    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), beta and g (B, Hq, N) -> out
    (B, Hq, N, Dv) in q's dtype [, state (B or S, Hq, Dk, Dv) float32]."""
    return run_delta_rule(_kernel_core, q, k, v, beta=beta, g=g, scale=scale, qk_l2norm=qk_l2norm,
                          initial_state=initial_state, return_state=return_state, cu_seqlens=cu_seqlens)


def kernel_support_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]
                              ) -> list[str]:
    """Why the kernel cannot take these inputs (empty if it can)."""
    reasons = []
    if q.shape[-1] > MAX_KERNEL_DIM:
        reasons.append(f"key head dim {q.shape[-1]} > {MAX_KERNEL_DIM} is not supported by the delta rule kernel")
    if v.shape[-1] > MAX_KERNEL_DIM:
        reasons.append(f"value head dim {v.shape[-1]} > {MAX_KERNEL_DIM} is not supported by the delta rule kernel")
    differentiable = [q, k, v, options["beta"], options["g"], options["initial_state"]]
    if q.shape[-1] > MAX_BACKWARD_KEY_DIM and torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in differentiable):
        reasons.append(f"key head dim {q.shape[-1]} > {MAX_BACKWARD_KEY_DIM} with inputs that require grad: the delta "
                       f"rule's backward kernel takes key head dims up to {MAX_BACKWARD_KEY_DIM} (the forward up to "
                       f"{MAX_KERNEL_DIM})")
    return reasons
