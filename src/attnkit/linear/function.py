"""The chunked linear-attention engine (``attnkit.kernels.linear``) as differentiable
custom ops (``attnkit::linear_chunked_fwd/bwd``, with fake implementations, so that
``torch.compile(fullgraph=True)`` sees no graph break), and the Triton entry points
of the ``linear`` and ``lightning`` variants."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._reference import expand_kv_heads
from ..checks import first_order_only
from .reference import run_linear

#: sequences this short take the token-by-token kernel (decoding); longer ones the chunked kernel
RECURRENT_MAX_N = 1


def _kernels():
    from ..kernels import linear  # imported lazily: importing it imports triton

    return linear


@torch.library.custom_op("attnkit::linear_chunked_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor],
            initial_state: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    s32 = None if slopes is None else slopes.float().contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return _kernels().linear_forward(q, k, v, s32, scale, s0, recurrent=q.shape[2] <= RECURRENT_MAX_N)


@_fwd_op.register_fake
def _(q, k, v, slopes, initial_state, scale):
    B, Hq, N, D = q.shape
    return q.new_empty(B, Hq, N, v.shape[-1]), q.new_empty(B, Hq, D, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("attnkit::linear_chunked_bwd", mutates_args=())
def _bwd_op(d_out: torch.Tensor, d_state: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, slopes: Optional[torch.Tensor], initial_state: Optional[torch.Tensor], scale: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s32 = None if slopes is None else slopes.float().contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    ds = None if d_state is None else d_state.float().contiguous()
    return _kernels().linear_backward(d_out.to(q.dtype), ds, q, k, v, s32, scale, s0)


@_bwd_op.register_fake
def _(d_out, d_state, q, k, v, slopes, initial_state, scale):
    B, Hq, N, D = q.shape
    f32 = dict(dtype=torch.float32)
    return (q.new_empty(B, Hq, N, D, **f32), q.new_empty(B, Hq, N, D, **f32),
            q.new_empty(B, Hq, N, v.shape[-1], **f32), q.new_empty(B, Hq, D, v.shape[-1], **f32))


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, initial_state, scale = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state, output[1])
    ctx.scale = scale


def _backward(ctx, d_out, d_state):
    q, k, v, slopes, initial_state, state = ctx.saved_tensors
    B, Hq, N, _ = q.shape
    Hkv = k.shape[1]
    if d_out is None:
        d_out = torch.zeros(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk_h, dv_h, d_s0 = _bwd_op(d_out, d_state, q, k, v, slopes, initial_state, ctx.scale)
    d_slopes = None
    if slopes is not None and ctx.needs_input_grad[3]:
        # With G_t = -s (t + 1): dL/dG_t = q_t . dq_t - k_t . dk_t (per query head; dk before the
        # GQA sum), and the returned state adds dL/dG_N = <dS_N, S_N>. ds = -sum_t (t + 1) dL/dG_t.
        k_h = expand_kv_heads(k.float(), Hq)
        per_t = (q.float() * dq).sum(-1) - (k_h * dk_h).sum(-1)            # (B, Hq, N)
        weights = torch.arange(1, N + 1, device=q.device, dtype=torch.float32)
        d_g = (per_t * weights).sum(dim=(0, 2))
        if d_state is not None:
            d_g = d_g + N * (d_state.float() * state).sum(dim=(0, 2, 3))
        d_slopes = (-d_g).to(slopes.dtype)
    g = Hq // Hkv
    dk = dk_h if g == 1 else dk_h.view(B, Hkv, g, N, -1).sum(2)
    dv = dv_h if g == 1 else dv_h.view(B, Hkv, g, N, -1).sum(2)
    d_init = d_s0.to(initial_state.dtype) if initial_state is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_slopes, d_init, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_bwd_op, what="the chunked linear engine")


def chunked_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: Optional[torch.Tensor], scale: float,
                   initial_state: Optional[torch.Tensor]):
    """Differentiable causal linear attention on the Triton engine.

    q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (fp16/bf16/fp32, one dtype);
    slopes (Hq,) decay rates or None; initial_state (B, Hq, D, Dv) or None. Returns
    out (B, Hq, N, Dv) in q's dtype and the final state (B, Hq, D, Dv) float32;
    gradients reach q, k, v, slopes and initial_state.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _fwd_op(q, k, v, slopes, initial_state, float(scale))


def linear_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  decay: Optional[torch.Tensor] = None, scale: Optional[float] = None, normalize: bool = False,
                  feature_map=None, initial_state: Optional[torch.Tensor] = None, return_state: bool = False):
    """The Triton path of :func:`attnkit.linear_attention` (same arguments, no dispatch).
    The non-causal form is two GEMMs (torch.matmul) on either path."""
    return run_linear(chunked_linear, q, k, v, causal=causal, decay=decay, scale=scale, normalize=normalize,
                      feature_map=feature_map, initial_state=initial_state, return_state=return_state)


def lightning_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, slopes: torch.Tensor,
                     initial_state: Optional[torch.Tensor] = None, return_state: bool = False):
    """The Triton path of :func:`attnkit.lightning_attention`."""
    return linear_kernel(q, k, v, causal=True, decay=slopes, scale=1.0, initial_state=initial_state,
                         return_state=return_state)
