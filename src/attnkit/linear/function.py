"""The chunked linear-attention engine (``attnkit.kernels.linear``) as differentiable
custom ops (``attnkit::linear_chunked_fwd/bwd``, with fake implementations, so that
``torch.compile(fullgraph=True)`` sees no graph break), and the Triton entry points
of the ``linear``, ``lightning`` and ``gla`` (scalar gates) variants."""

from __future__ import annotations

import torch

from .._reference import expand_kv_heads
from ..checks import check_scale, first_order_only
from .reference import resolve_offsets, run_linear

#: sequences this short take the token-by-token kernel (decoding); longer ones the chunked kernel
RECURRENT_MAX_N = 1


def _kernels():
    from ..kernels import linear  # imported lazily: importing it imports triton

    return linear


def _state_rows(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """States per head: one per batch entry, or one per packed sequence."""
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("attnkit::linear_chunked_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
            gates: torch.Tensor | None, initial_state: torch.Tensor | None, scale: float,
            cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    s32 = None if slopes is None else slopes.float().contiguous()
    g32 = None if gates is None else gates.float().contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return _kernels().linear_forward(q, k, v, s32, scale, s0, recurrent=q.shape[2] <= RECURRENT_MAX_N,
                                     cu_seqlens=cu_seqlens, gates=g32)


@_fwd_op.register_fake
def _(q, k, v, slopes, gates, initial_state, scale, cu_seqlens):
    B, Hq, N, D = q.shape
    return (q.new_empty(B, Hq, N, v.shape[-1]),
            q.new_empty(_state_rows(q, cu_seqlens), Hq, D, v.shape[-1], dtype=torch.float32))


@torch.library.custom_op("attnkit::linear_chunked_bwd", mutates_args=())
def _bwd_op(d_out: torch.Tensor, d_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, slopes: torch.Tensor | None, gates: torch.Tensor | None,
            initial_state: torch.Tensor | None, scale: float, cu_seqlens: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s32 = None if slopes is None else slopes.float().contiguous()
    g32 = None if gates is None else gates.float().contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    ds = None if d_state is None else d_state.float().contiguous()
    return _kernels().linear_backward(d_out.to(q.dtype), ds, q, k, v, s32, scale, s0, cu_seqlens=cu_seqlens,
                                      gates=g32)


@_bwd_op.register_fake
def _(d_out, d_state, q, k, v, slopes, gates, initial_state, scale, cu_seqlens):
    B, Hq, N, D = q.shape
    f32 = {"dtype": torch.float32}
    return (q.new_empty(B, Hq, N, D, **f32), q.new_empty(B, Hq, N, D, **f32),
            q.new_empty(B, Hq, N, v.shape[-1], **f32),
            q.new_empty(_state_rows(q, cu_seqlens), Hq, D, v.shape[-1], **f32))


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, gates, initial_state, scale, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, slopes, gates, initial_state, output[1], cu_seqlens)
    ctx.scale = scale


def _gate_gradient(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk_h: torch.Tensor,
                   d_state: torch.Tensor | None, state: torch.Tensor, cu_seqlens: torch.Tensor | None
                   ) -> torch.Tensor:
    """dL/dg (B, Hq, N) for scalar log-gates g, from the kernel's fp32 gradients.

    With G_t the cumulative gate of row t from its sequence's start, every term of o_t
    carries exp(G_t - G_s) (or exp(G_t) on the initial state) and the final state
    exp(G_n - G_s): so dL/dG_t = q_t . dq_t - k_t . dk_t (dq, dk with the scale, dk per query
    head before the GQA sum), plus <dS_n, S_n> at each sequence's last row n. g_t enters every
    G_u with u >= t of its sequence: dg is the reverse cumulative sum of dL/dG within it.
    """
    B, Hq, N = q.shape[:3]
    k_h = expand_kv_heads(k.float(), Hq)
    d_g = (q.float() * dq).sum(-1) - (k_h * dk_h).sum(-1)                 # dL/dG (B, Hq, N)
    if cu_seqlens is None:
        if d_state is not None and N > 0:
            d_g[:, :, -1] += (d_state.float() * state).sum(dim=(2, 3))
        return d_g.flip(-1).cumsum(-1).flip(-1)
    ends = cu_seqlens[1:].long()
    if d_state is not None:
        final = (d_state.float() * state).sum(dim=(2, 3))                  # (S, Hq)
        nonempty = ends > cu_seqlens[:-1].long()
        d_g[0].index_add_(1, ends[nonempty] - 1, final[nonempty].transpose(0, 1))
    # to the end of the whole pack, minus what lies past each row's own sequence (the sum from its
    # sequence's end); in float64, so that the later sequences' sums cancel exactly enough
    total = d_g.double().flip(-1).cumsum(-1).flip(-1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    tail = torch.cat([total, total.new_zeros(B, Hq, 1)], dim=-1)[..., torch.repeat_interleave(
        ends, lengths, output_size=N)]
    return (total - tail).float()


def _backward(ctx, d_out, d_state):
    q, k, v, slopes, gates, initial_state, state, cu_seqlens = ctx.saved_tensors
    B, Hq, N, _ = q.shape
    Hkv = k.shape[1]
    if d_out is None:
        d_out = torch.zeros(B, Hq, N, v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk_h, dv_h, d_s0 = _bwd_op(d_out, d_state, q, k, v, slopes, gates, initial_state, ctx.scale, cu_seqlens)
    d_slopes = d_gates = None
    if (slopes is not None and ctx.needs_input_grad[3]) or (gates is not None and ctx.needs_input_grad[4]):
        d_g = _gate_gradient(q, k, dq, dk_h, d_state, state, cu_seqlens)
        if slopes is not None:
            d_slopes = (-d_g.sum(dim=(0, 2))).to(slopes.dtype)   # g_t = -slope on every row
        else:
            d_gates = d_g.to(gates.dtype)
    g = Hq // Hkv
    dk = dk_h if g == 1 else dk_h.view(B, Hkv, g, N, -1).sum(2)
    dv = dv_h if g == 1 else dv_h.view(B, Hkv, g, N, -1).sum(2)
    d_init = d_s0.to(initial_state.dtype) if initial_state is not None else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_slopes, d_gates, d_init, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_bwd_op, what="the chunked linear engine")


def chunked_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                   initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                   gates: torch.Tensor | None = None):
    """Differentiable causal linear attention on the Triton engine.

    q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (fp16/bf16/fp32, one dtype);
    slopes (Hq,) decay rates or None; gates (B, Hq, N) scalar log-gates <= 0 (instead of
    slopes: S_t = exp(g_t) S_{t-1} + k_t^T v_t) or None; initial_state (B, Hq, D, Dv) or None. Returns
    out (B, Hq, N, Dv) in q's dtype and the final state (B, Hq, D, Dv) float32;
    gradients reach q, k, v, slopes, gates and initial_state. With ``cu_seqlens`` (S + 1,) int32
    (B = 1, S sequences packed along N) each sequence runs on its own: initial_state and
    the returned state are (S, Hq, D, Dv).
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _fwd_op(q, k, v, slopes, gates, initial_state, float(scale), cu_seqlens)


def linear_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  decay: torch.Tensor | None = None, scale: float | None = None, normalize: bool = False,
                  feature_map=None, initial_state: torch.Tensor | None = None, return_state: bool = False,
                  cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None):
    """The Triton path of :func:`attnkit.linear_attention` (same arguments, no dispatch).
    The non-causal form is two GEMMs (torch.matmul) on either path (per packed sequence)."""
    cu_q, cu_k = resolve_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    return run_linear(chunked_linear, q, k, v, causal=causal, decay=decay, scale=scale, normalize=normalize,
                      feature_map=feature_map, initial_state=initial_state, return_state=return_state,
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def lightning_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, slopes: torch.Tensor,
                     initial_state: torch.Tensor | None = None, return_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                     cu_seqlens_k: torch.Tensor | None = None):
    """The Triton path of :func:`attnkit.lightning_attention`."""
    return linear_kernel(q, k, v, causal=True, decay=slopes, scale=1.0, initial_state=initial_state,
                         return_state=return_state, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k)


def gla_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor, scale: float | None = None,
               initial_state: torch.Tensor | None = None, return_state: bool = False,
               cu_seqlens: torch.Tensor | None = None):
    """The Triton path of :func:`attnkit.gated_linear_attention` (same arguments, no dispatch)
    for SCALAR gates: q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), g (B, Hq, N)
    -> out (B, Hq, N, Dv) in q's dtype [, state (B or S, Hq, Dk, Dv) float32]. GQA reads the
    shared k, v heads in place; a packed batch (``cu_seqlens``) runs each sequence from its
    own state row in one launch per pass.

    Per-channel gates (B, Hq, N, Dk) have their own kernels (``attnkit.gla.kernel``; the variant's
    entry routes them there); here they raise."""
    if g.dim() != 3:
        raise ValueError(f"the linear engine's gla kernel takes scalar gates g of shape (B, Hq, N) only, got shape "
                         f"{tuple(g.shape)}; per-channel gates run on attnkit.gla.kernel.gla_vector_kernel")
    c = check_scale(scale, q.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, state = _fwd_op(q, k, v, None, g, initial_state, c, cu_seqlens)
    return (out, state) if return_state else out
