"""The reference of the ``delta_rule`` variant: the (gated) delta rule one token at a time.

Per (batch, head), with a state S of shape (Dk, Dv) and k_t, q_t, v_t rows:

    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    o_t = scale q_t S_t

(DeltaNet, Yang et al. 2024; gated: GatedDeltaNet, Yang et al. 2025), the semantics of
flash-linear-attention's ``chunk_gated_delta_rule``. :func:`recurrent_delta_rule` is that
loop, written to be read; :func:`run_delta_rule` does what surrounds it on every backend
(the optional L2 normalisation of q and k, GQA, the scale, state dtypes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._reference import expand_kv_heads
from ..checks import check_scale
from ..linear.reference import per_sequence

#: added under the square root of flash-linear-attention's ``l2norm`` (``qk_l2norm=True``)
L2NORM_EPS = 1e-6

#: core(q, k, v, beta, g, scale, state, cu_seqlens) -> (out, final state); heads already expanded
Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as flash-linear-attention's ``l2norm``."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         g: torch.Tensor | None, scale: float, state: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence step by step, in q's dtype.

    q, k (B, H, N, Dk), v (B, H, N, Dv), beta (B, H, N), g (B, H, N) log-gates or None,
    state (B, H, Dk, Dv) or None (zeros) -> out (B, H, N, Dv), final state (B, H, Dk, Dv).
    """
    B, H, N, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state
    outs = []
    for t in range(N):
        k_t, v_t, b_t = k[:, :, t], v[:, :, t], beta[:, :, t, None, None]
        # (I - beta k^T k) S = S - beta k^T (k S): the old value stored under k_t is replaced
        kS = torch.einsum("bhd,bhde->bhe", k_t, S)
        S = S - b_t * k_t[..., :, None] * kS[..., None, :]
        if g is not None:
            S = torch.exp(g[:, :, t, None, None]) * S
        S = S + b_t * k_t[..., :, None] * v_t[..., None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return out, S


def reference_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None,
                   scale: float, state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurrent_delta_rule` with the state in q's dtype; a packed batch (B = 1,
    ``cu_seqlens`` (S + 1,)) sequence by sequence, state (S, H, Dk, Dv)."""
    state = None if state is None else state.to(q.dtype)
    if cu_seqlens is None:
        return recurrent_delta_rule(q, k, v, beta, g, scale, state)
    dk = q.shape[-1]
    # per_sequence cuts q, k and v along N: beta and g ride along as extra columns of q
    gates = [beta[..., None]] + ([] if g is None else [g[..., None]])
    packed_q = torch.cat([q] + [x.to(q.dtype) for x in gates], dim=-1)

    def alone(q_s, k_s, v_s, s0):
        g_s = None if g is None else q_s[..., dk + 1]
        return recurrent_delta_rule(q_s[..., :dk], k_s, v_s, q_s[..., dk], g_s, scale, s0)

    return per_sequence(alone, packed_q, k, v, cu_seqlens, cu_seqlens, state)


def run_delta_rule(core: Core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                   g: torch.Tensor | None, scale: float | None, qk_l2norm: bool,
                   initial_state: torch.Tensor | None, return_state: bool,
                   cu_seqlens: torch.Tensor | None):
    """Everything around the core, shared by the backends (inputs are validated already):
    the scale (None: Dk^-1/2), ``qk_l2norm``, GQA (query head h reads kv head h // (Hq // Hkv);
    beta, g and the state are per query head), the output in q's dtype and the state in
    float32 (float64 for float64 inputs)."""
    c = check_scale(scale, q.shape[-1])
    if qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    heads = q.shape[1]
    k, v = expand_kv_heads(k, heads), expand_kv_heads(v, heads)
    out, state = core(q, k, v, beta, g, c, initial_state, cu_seqlens)
    out = out.to(q.dtype)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (out, state.to(compute)) if return_state else out


def delta_rule_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                         g: torch.Tensor | None = None, scale: float | None = None, qk_l2norm: bool = False,
                         initial_state: torch.Tensor | None = None, return_state: bool = False,
                         cu_seqlens: torch.Tensor | None = None):
    """Reference of :func:`attnkit.delta_rule_attention` (same arguments, computed in q's dtype,
    one token at a time).

    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), beta and g (B, Hq, N) -> out
    (B, Hq, N, Dv) [, state (B, Hq, Dk, Dv), float32 (float64 for float64 inputs); (S, Hq, Dk, Dv)
    for S sequences packed with ``cu_seqlens``].
    """
    return run_delta_rule(reference_core, q, k, v, beta=beta.to(q.dtype), g=None if g is None else g.to(q.dtype),
                          scale=scale, qk_l2norm=qk_l2norm, initial_state=initial_state,
                          return_state=return_state, cu_seqlens=cu_seqlens)
