"""PyTorch reference of gated linear attention (the specification).

Per head, with log-gates g_t <= 0 (a scalar per token, or one per key channel) and
scale c, the state S of shape (Dk, Dv) follows

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t          (S_0 = initial_state)
    o_t = c q_t S_t

(q_t, k_t rows of Dk, v_t a row of Dv; a scalar gate is the same exp(g_t) on every row
of S). :func:`recurrent_form` is that recurrence, one token at a time, in the dtype it
is given. :func:`run_gla` is everything around a core (GQA head mapping, the gate's two
forms, packed sequences, state dtypes), shared with the torch backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._reference import expand_kv_heads
from ..checks import check_scale
from ..linear.reference import per_sequence

#: core(q, k, v, g, scale, state) -> (out, final state): q, k (B, H, N, Dk), v (B, H, N, Dv),
#: g (B, H, N, E) with E = 1 (scalar gates) or Dk, state (B, H, Dk, Dv) or None
GlaCore = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def recurrent_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, Dk), v (B, H, N, Dv), g (B, H, N, 1) or (B, H, N, Dk) log-gates,
    state (B, H, Dk, Dv) or None (zeros) -> out (B, H, N, Dv), final state (B, H, Dk, Dv).
    One token at a time: memory O(N Dk Dv) under autograd (every state is kept)."""
    B, H, N, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state
    outs = []
    for t in range(N):
        S = torch.exp(g[:, :, t, :, None]) * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return out, S


def run_gla(core: GlaCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
            scale: float | None, initial_state: torch.Tensor | None, return_state: bool,
            cu_seqlens: torch.Tensor | None, dtype: torch.dtype):
    """Everything around a core, for both backends (inputs validated already).

    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), g (B, Hq, N) or (B, Hq, N, Dk),
    initial_state (B, Hq, Dk, Dv) or, packed (B = 1, ``cu_seqlens`` (S + 1,)), (S, Hq, Dk, Dv).
    The core runs on q, k, v, g and the state cast to ``dtype``. Returns out (B, Hq, N, Dv)
    in q's dtype [, final state (B or S, Hq, Dk, Dv) float32 (float64 for float64 inputs)].
    """
    c = check_scale(scale, q.shape[-1])
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads, dk = q.shape[1], q.shape[-1]
    k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
    gates = g if g.dim() == 4 else g.unsqueeze(-1)               # a scalar gate: one column, broadcast over Dk
    qc, kc, vc, gc = (x.to(dtype) for x in (q, k, v, gates))
    s0 = None if initial_state is None else initial_state.to(dtype)
    if cu_seqlens is None:
        out, state = core(qc, kc, vc, gc, c, s0)
    else:
        # per_sequence cuts q, k and v only: the gates ride along as extra key columns
        def alone(q_s, kg_s, v_s, s0_s):
            return core(q_s, kg_s[..., :dk], v_s, kg_s[..., dk:], c, s0_s)

        out, state = per_sequence(alone, qc, torch.cat([kc, gc], dim=-1), vc, cu_seqlens, cu_seqlens, s0)
    out = out.to(q.dtype)
    return (out, state.to(state_dtype)) if return_state else out


def gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  return_state: bool = False, cu_seqlens: torch.Tensor | None = None):
    """Reference of :func:`attnkit.gated_linear_attention` (same arguments, the recurrence
    step by step in q's dtype).

    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), g (B, Hq, N) or (B, Hq, N, Dk)
    -> out (B, Hq, N, Dv) [, state (B, Hq, Dk, Dv) float32 (float64 for float64 inputs)];
    packed (B = 1, ``cu_seqlens`` (S + 1,)): each sequence alone with its own state row,
    states (S, Hq, Dk, Dv).
    """
    return run_gla(recurrent_form, q, k, v, g, scale=scale, initial_state=initial_state,
                   return_state=return_state, cu_seqlens=cu_seqlens, dtype=q.dtype)
