"""The torch backend of ``gla`` (``backend="torch"``): the chunked form in batched matmuls.

The sequence is cut into chunks of :data:`CHUNK` rows. With b_t the cumulative log-gate
from the chunk's first row through row t (per channel, or one column for scalar gates)
and S_in the state entering the chunk:

    o_t   = c (q_t * exp(b_t)) S_in + c sum_{s <= t in the chunk} A_ts v_s,
    A_ts  = sum_d q_td k_sd exp(b_td - b_sd),
    S_out = diag(exp(b_last)) S_in + (k * exp(b_last - b))^T V.

Every exponent is <= 0 (the gates are), so no factor overflows however strong the decay
(the usual q * exp(b), k * exp(-b) split would overflow within a chunk once the gates
sum below about -88). A is the masked decayed QK^T for scalar gates. Per channel, the
chunk is cut into sub-chunks of :data:`SUB` rows: exact (SUB, SUB, Dk) products on the
diagonal, one GEMM per block below it (:func:`_per_channel_scores`), a few chunks at a
time, checkpointed under autograd when they do not fit at once; memory stays
O(N (C + SUB Dk + Dv) + N Dk Dv / C). All chunks run at once; only the
(Dk x Dv) state recurrence from chunk to chunk is a Python loop. Computed in float32
(float64 for float64 inputs); gradients come from autograd. Packed sequences run one by
one (:func:`attnkit.gla.reference.run_gla`).
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad
from torch.utils.checkpoint import checkpoint

from .reference import run_gla

#: rows per chunk: the intra-chunk work grows with it, the number of state steps shrinks
CHUNK = 64
#: rows per sub-chunk of the per-channel scores: exact (sub, sub, Dk) products on the diagonal
SUB = 16
#: elements of the per-channel (chunks, C, sub, Dk) products computed at once
PAIR_BUDGET = 1 << 22


def _per_channel_scores(qc: torch.Tensor, kc: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """A_ts = sum_d q_td k_sd exp(b_td - b_sd) for s <= t in a chunk (0 above the diagonal).
    qc, kc, b (P, T, C, Dk) -> (P, T, C, C).

    The chunk is cut into sub-chunks of ``sub`` rows. A block on the diagonal is the exact
    (sub, sub, Dk) product; a block below it (sub-chunk i, earlier sub-chunk j) is one GEMM,
    the decay split at r_j, the cumulative gate at the end of sub-chunk j, and r_{i-1}:
    exp(b_t - b_s) = exp(b_t - r_{i-1}) exp(r_{i-1} - r_j) exp(r_j - b_s), each exponent <= 0.
    """
    P, T, C, Dk = qc.shape
    n = C // sub
    q4, k4, b4 = (x.view(P, T, n, sub, Dk) for x in (qc, kc, b))
    neg_inf = b.new_tensor(float("-inf"))
    rows = torch.arange(sub, device=b.device)
    causal = (rows[:, None] >= rows[None, :])[..., None]                      # (sub, sub, 1): s <= t
    expo = b4.unsqueeze(-2) - b4.unsqueeze(-3)                                 # (P, T, n, sub, sub, Dk)
    diag = (q4.unsqueeze(-2) * k4.unsqueeze(-3) * torch.exp(torch.where(causal, expo, neg_inf))).sum(-1)
    ends = b4[:, :, :, -1]                                                     # r_j (P, T, n, Dk)
    prev = torch.cat([torch.zeros_like(ends[:, :, :1]), ends[:, :, :-1]], dim=2)   # r_{i-1} (r_{-1} = 0)
    qq = q4 * torch.exp(b4 - prev.unsqueeze(-2))                               # (P, T, n, sub, Dk)
    kk = k4 * torch.exp(ends.unsqueeze(-2) - b4)
    blocks = torch.arange(n, device=b.device)
    below = (blocks[:, None] > blocks[None, :])[..., None]                     # (n, n, 1): j < i
    mid = torch.exp(torch.where(below, prev.unsqueeze(-2) - ends.unsqueeze(-3), neg_inf))   # (P, T, n, n, Dk)
    off = torch.matmul(qq.unsqueeze(3) * mid.unsqueeze(-2), kk.unsqueeze(2).transpose(-1, -2))  # (P, T, n, n, s, s)
    eye = torch.eye(n, dtype=b.dtype, device=b.device).view(n, n, 1, 1)
    scores = off + eye * diag.unsqueeze(3)
    return scores.transpose(3, 4).reshape(P, T, C, C)


def chunked_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                state: torch.Tensor | None = None, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention in chunks; the contract of the reference's
    :func:`~attnkit.gla.reference.recurrent_form`, computed in the inputs' dtype.

    q, k (B, H, N, Dk), v (B, H, N, Dv), g (B, H, N, E) log-gates with E = 1 (scalar) or Dk,
    state (B, H, Dk, Dv) or None -> out (B, H, N, Dv), final state (B, H, Dk, Dv).
    """
    B, H, N, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state
    if N == 0:
        return v.new_zeros(B, H, 0, Dv), S
    T = -(-N // chunk)
    extra = T * chunk - N
    # padded rows: zero keys and values (they add nothing), gate 0 (no decay): b_last is the last real row's.
    # reshape, not view: unpadded inputs may be strided views (a block's split projection, a bshd layout)
    qc, kc, vc, gc = ((pad(x, (0, 0, 0, extra)) if extra else x).reshape(B * H, T, chunk, x.shape[-1])
                      for x in (q, k, v, g))
    b = gc.cumsum(2)                                                          # (BH, T, C, E)
    b_last = b[:, :, -1:]                                                     # (BH, T, 1, E)
    if g.shape[-1] == 1:
        rows = torch.arange(chunk, device=q.device)
        causal = rows[:, None] >= rows[None, :]                               # (C, C): s <= t
        expo = b - b.transpose(-1, -2)                                        # (BH, T, C, C): b_t - b_s
        decay = torch.exp(torch.where(causal, expo, expo.new_tensor(float("-inf"))))
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * decay
    else:
        sub = SUB if chunk % SUB == 0 else chunk
        per = max(1, PAIR_BUDGET // (B * H * chunk * sub * Dk))             # chunks per piece
        if per >= T or not torch.is_grad_enabled():
            scores = torch.cat([_per_channel_scores(qp, kp, bp, sub)
                                for qp, kp, bp in zip(qc.split(per, 1), kc.split(per, 1), b.split(per, 1))], dim=1)
        else:  # keep only each piece's inputs for the backward, not its (C, sub, Dk) products
            scores = torch.cat([checkpoint(_per_channel_scores, qp, kp, bp, sub, use_reentrant=False)
                                for qp, kp, bp in zip(qc.split(per, 1), kc.split(per, 1), b.split(per, 1))], dim=1)
    intra = torch.matmul(scores, vc)                                          # (BH, T, C, Dv)
    kv = torch.matmul((kc * torch.exp(b_last - b)).transpose(-1, -2), vc)     # (BH, T, Dk, Dv)
    chunk_decay = torch.exp(b_last).transpose(-1, -2)                         # (BH, T, E, 1): rows of S
    S = S.reshape(B * H, Dk, Dv)
    incoming = []
    for j in range(T):
        incoming.append(S)
        S = chunk_decay[:, j] * S + kv[:, j]
    s_in = torch.stack(incoming, dim=1)                                       # (BH, T, Dk, Dv)
    out = (intra + torch.matmul(qc * torch.exp(b), s_in)) * scale
    return out.view(B, H, T * chunk, Dv)[:, :, :N], S.view(B, H, Dk, Dv)


def gla_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None, return_state: bool = False,
              cu_seqlens: torch.Tensor | None = None):
    """The torch path of :func:`attnkit.gated_linear_attention` (same arguments, no dispatch):
    q (B, Hq, N, Dk), k (B, Hkv, N, Dk), v (B, Hkv, N, Dv), g (B, Hq, N) or (B, Hq, N, Dk)
    -> out (B, Hq, N, Dv) in q's dtype [, state (B or S, Hq, Dk, Dv) float32]."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return run_gla(chunked_gla, q, k, v, g, scale=scale, initial_state=initial_state, return_state=return_state,
                   cu_seqlens=cu_seqlens, dtype=compute)
