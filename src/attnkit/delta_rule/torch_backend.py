"""The torch backend of ``delta_rule`` (``backend="torch"``): the chunked WY/UT form.

Within a chunk of C rows entering with state S0, write G_i = g_1 + ... + g_i (cumulative
log-gate in the chunk) and gamma_i = exp(G_i). Unrolling the recurrence gives

    S_i = gamma_i S0 + sum_{j <= i} exp(G_i - G_j) k_j^T u_j,
    u_i = beta_i (v_i - k_i exp(g_i) S_{i-1})               (the "new values")

and the u_i solve one unit lower-triangular system (the UT transform of DeltaNet's
chunkwise form, Yang et al. 2024):

    (I + A) U = beta V - (beta gamma K) S0,  A_ij = beta_i exp(G_i - G_j) k_i . k_j  (j < i)

so with T = (I + A)^-1, U0 = T (beta V) and W = T (beta gamma K) (the WY factors, one
triangular solve for both), U = U0 - W S0. Then, for every chunk at once,

    out = scale ((gamma Q - P W) S0 + P U0),  P_ij = exp(G_i - G_j) q_i . k_j  (j <= i)
    S_C = gamma_C S0 + Kc^T U0 - (Kc^T W) S0,  Kc_j = exp(G_C - G_j) k_j

and only this last affine map from chunk to chunk is a Python loop (one (Dk x Dk) by
(Dk x Dv) product per chunk index). Every exponent is a difference G_i - G_j <= 0, so no
factor overflows. States and products are float32 (float64 for float64 inputs); memory is
O(N D^2 / C). Packed sequences (``cu_seqlens``) are cut into chunks per sequence (zero rows
pad a sequence's last chunk: a zero key and a zero gate change nothing) and the state
restarts at each sequence. Gradients (q, k, v, beta, g, initial_state) come from autograd.
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad

from ..linear.torch_backend import chunk_layout, from_chunks, to_chunks
from .reference import run_delta_rule

#: rows per chunk (flash-linear-attention's chunk size too)
CHUNK = 64


def _chunks(x: torch.Tensor, lengths: list[int] | None, chunk: int) -> torch.Tensor:
    """(P, H, N, E) -> (P, H, T, chunk, E): unpacked (``lengths`` None) as it lies, the end
    padded with zeros; packed (P = 1) cut per sequence of ``lengths``."""
    if lengths is None:
        P, H, N, E = x.shape
        T = -(-N // chunk)
        return pad(x, (0, 0, 0, T * chunk - N)).view(P, H, T, chunk, E)
    return to_chunks(x[0], lengths, chunk).unsqueeze(0)


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       g: torch.Tensor | None, scale: float, initial_state: torch.Tensor | None,
                       cu_seqlens: torch.Tensor | None = None, chunk: int = CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule in chunks (module docstring). Heads already expanded.

    q, k (B, H, N, Dk), v (B, H, N, Dv), beta (B, H, N), g (B, H, N) or None, initial_state
    (B, H, Dk, Dv) or None -> out (B, H, N, Dv) and final state (B, H, Dk, Dv), float32
    (float64 for float64 inputs). Packed (B = 1, ``cu_seqlens`` (S + 1,)): states (S, H, Dk, Dv).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    dev = q.device
    lengths = None if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    gate = torch.zeros_like(beta) if g is None else g
    qc, kc, vc = (_chunks(x.to(compute), lengths, chunk) for x in (q, k, v))
    bc, gc = (_chunks(x.to(compute)[..., None], lengths, chunk)[..., 0] for x in (beta, gate))   # (P, H, T, C)
    T = qc.shape[2]

    G = gc.cumsum(-1)                                                        # (P, H, T, C)
    diff = G[..., :, None] - G[..., None, :]                                 # G_i - G_j
    rows = torch.arange(chunk, device=dev)
    strict, causal = rows[:, None] > rows[None, :], rows[:, None] >= rows[None, :]
    # exp only where j <= i (exponent <= 0); elsewhere exp(-inf) = 0, with a zero gradient
    ninf = torch.full((), float("-inf"), dtype=compute, device=dev)
    decay = torch.exp(torch.where(causal, diff, ninf))
    A = bc[..., :, None] * torch.matmul(kc, kc.transpose(-1, -2)) * torch.where(strict, decay, 0.0)
    gamma = torch.exp(G)[..., None]                                          # (P, H, T, C, 1)
    rhs = torch.cat([bc[..., None] * vc, bc[..., None] * gamma * kc], dim=-1)
    # T (beta V) and T (beta gamma K) in one solve; unitriangular: A's (zero) diagonal is not read
    UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U0, W = UW[..., :Dv], UW[..., Dv:]
    P = torch.matmul(qc, kc.transpose(-1, -2)) * decay                       # (P, H, T, C, C)
    q_read = qc * gamma - torch.matmul(P, W)                                 # reads the incoming state
    local = torch.matmul(P, U0)
    k_write = kc * torch.exp(G[..., -1:] - G)[..., None]                     # exp(G_C - G_j) k_j
    kU = torch.matmul(k_write.transpose(-1, -2), U0)                         # (P, H, T, Dk, Dv)
    kW = torch.matmul(k_write.transpose(-1, -2), W)                          # (P, H, T, Dk, Dk)
    carry = torch.exp(G[..., -1])[..., None, None]                           # gamma_C (P, H, T, 1, 1)

    def step(state: torch.Tensor, j: int) -> torch.Tensor:
        return carry[:, :, j] * state + kU[:, :, j] - torch.matmul(kW[:, :, j], state)

    rows_out = B if lengths is None else len(lengths)
    init = (torch.zeros(rows_out, H, Dk, Dv, dtype=compute, device=dev) if initial_state is None
            else initial_state.to(compute))
    incoming = []
    if lengths is None:
        state = init
        for j in range(T):
            incoming.append(state)
            state = step(state, j)
        final = state
    else:  # one chunk list for all sequences; the state restarts at each sequence's first chunk
        first, counts = chunk_layout(lengths, chunk)
        finals = []
        for s in range(len(lengths)):
            state = init[s:s + 1]
            for j in range(first[s], first[s] + counts[s]):
                incoming.append(state)
                state = step(state, j)
            finals.append(state)
        final = torch.cat(finals, dim=0)
    if T == 0:
        return v.new_zeros(B, H, N, Dv, dtype=compute), final
    s_in = torch.stack(incoming, dim=2)                                      # (P, H, T, Dk, Dv)
    out_c = scale * (torch.matmul(q_read, s_in) + local)
    if lengths is None:
        out = out_c.reshape(B, H, T * chunk, Dv)[:, :, :N]
    else:
        out = from_chunks(out_c[0], lengths, chunk).unsqueeze(0)
    return out, final


def delta_rule_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                     g: torch.Tensor | None = None, scale: float | None = None, qk_l2norm: bool = False,
                     initial_state: torch.Tensor | None = None, return_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None):
    """The torch path of :func:`attnkit.delta_rule_attention` (same arguments, no dispatch):
    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), beta and g (B, Hq, N) -> out
    (B, Hq, N, Dv) in q's dtype [, state (B or S, Hq, Dk, Dv) float32]."""
    return run_delta_rule(chunked_delta_rule, q, k, v, beta=beta, g=g, scale=scale, qk_l2norm=qk_l2norm,
                          initial_state=initial_state, return_state=return_state, cu_seqlens=cu_seqlens)
