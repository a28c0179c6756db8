"""LASP-2 (Sun et al. 2025): sequence parallelism for linear and lightning attention.

Contiguous layout: rank r holds chunk r (L = N/W tokens). Per head, with lambda =
exp(-s) (s the decay rate; 0 without decay) and the chunk's memory state

    M_r = sum_t lambda^(L-1-t) k_t^T v_t                 (B, H, D, Dv), float32

the state entering chunk r is a prefix combine over the chunks before it,

    S_r = sum_{j<r} lambda^(L (r-1-j)) M_j     (S_0 = 0, S_{j+1} = lambda^L S_j + M_j),

and the output is the chunk's own causal linear attention (zero initial state) plus
the inter-chunk term scale (lambda^(t+1) q_t) S_r. Communication: ONE all-gather of
the D x Dv states per rank (forward) and one of their gradients (backward), whatever
N is; it is started before the intra-chunk attention is computed and overlaps it.
The backward of the prefix combine is the suffix combine
dM_j = sum_{r>j} lambda^(L (r-1-j)) dS_r.

The intra-chunk part is ``attnkit.linear_attention`` / ``attnkit.lightning_attention``
(issue 5's engine: its kernel on GPUs); the state M_r and the inter-chunk term are
two small matmuls in plain PyTorch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._reference import expand_kv_heads
from ..checks import check_scale
from ..linear import lightning_attention, linear_attention
from ..registry import get_variant
from ._comm import Field, agree, all_gather_async, input_fields, world


class _PrefixCombine(torch.autograd.Function):
    """S_r = sum_{j<r} a^(r-1-j) M_j from the all-gathered M (a = lambda^L, per head).

    Inputs: M (B, H, D, Dv) this rank's state, a (H,), and the all-gather of M already
    in flight (``pending`` = (list of W tensors, work)). Backward: all-gather dS, then
    dM_r = sum_{j>r} a^(j-1-r) dS_j; da gets this rank's share sum <dS_r, dS_r/da>.
    """

    @staticmethod
    def forward(ctx, M, a, pending, group, rank: int, size: int):
        gathered, work = pending
        work.wait()
        av = a.view(1, -1, 1, 1).to(M.dtype)
        S = torch.zeros_like(M)
        for j in range(rank):
            S = av * S + gathered[j]
        ctx.save_for_backward(a, *gathered[:rank])
        ctx.args = (group, rank, size)
        return S

    @staticmethod
    def backward(ctx, dS):
        a, *before = ctx.saved_tensors
        group, rank, size = ctx.args
        dS = dS.contiguous()
        grads, work = all_gather_async(dS, group, size)
        work.wait()
        av = a.view(1, -1, 1, 1).to(dS.dtype)
        dM = torch.zeros_like(dS)
        for j in range(size - 1, rank, -1):     # suffix combine over the ranks after this one
            dM = av * dM + grads[j]
        da = None
        if ctx.needs_input_grad[1] and rank > 1:
            # d/da of S_r = sum_{j<r} (r-1-j) a^(r-2-j) M_j, contracted with dS_r
            dSda = torch.zeros_like(dS)
            for j in range(rank - 1):
                dSda = dSda + (rank - 1 - j) * av ** (rank - 2 - j) * before[j]
            da = (dS * dSda).sum(dim=(0, 2, 3)).to(a.dtype)
        elif ctx.needs_input_grad[1]:
            da = torch.zeros_like(a)
        return dM, da, None, None, None, None


def _lasp2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor | None, scale: float,
           intra: Callable[[], torch.Tensor], group) -> torch.Tensor:
    rank, size = world(group)
    _, H, L, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.zeros(H, dtype=compute, device=q.device) if rates is None else rates.to(compute)
    pos = torch.arange(L, dtype=compute, device=q.device)
    # The chunk's memory state M = sum_t lambda^(L-1-t) k_t^T v_t.
    kd = expand_kv_heads(k, H).to(compute) * torch.exp(-s.view(1, H, 1, 1) * (L - 1 - pos).view(1, 1, L, 1))
    M = torch.matmul(kd.transpose(-1, -2), expand_kv_heads(v, H).to(compute))
    pending = all_gather_async(M.detach(), group, size)   # in flight during the intra-chunk attention
    out_intra = intra()
    S = _PrefixCombine.apply(M, torch.exp(-s * L), pending, group, rank, size)
    qd = q.to(compute) * torch.exp(-s.view(1, H, 1, 1) * (pos + 1).view(1, 1, L, 1))
    return (out_intra.to(compute) + scale * torch.matmul(qd, S)).to(q.dtype)


def _checked(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, variant: str,
             options: dict[str, Any]) -> int:
    """Validate a LASP-2 call as ``variant`` would and make the ranks agree on it (shapes,
    dtypes, and ``options``, the scale as it acts); returns the world size."""
    _, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        spec = get_variant(variant)
        shapes = spec.validate(q, k, v, spec.resolve_options(options))
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        acting = dict(options)
        if "scale" in acting:   # None means 1/sqrt(D): the ranks agree on the scale that acts
            acting["scale"] = check_scale(acting["scale"], shapes.head_dim)
        return None, fields + [Field(name, value) for name, value in acting.items()]

    agree(op, check, group, size)
    return size


def lasp2_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
                           decay: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal linear attention over a sequence sharded across ranks (LASP-2).

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's
            shards in the **contiguous** layout (rank r holds tokens [r N/W, (r+1) N/W)),
            the same shapes and dtype on every rank (checked). Hkv divides Hq.
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: plain ``attnkit.linear_attention``).
        decay: (Hq,) decay rates s_h >= 0 (lambda_h = exp(-s_h)), the same on every
            rank (checked), or None (lambda = 1). Differentiable: each rank's decay.grad
            is its share, their sum (as DDP/FSDP all-reduce it) is the gradient.
        scale: multiplies q_t S_t; None means 1/sqrt(D). The same on every rank (checked).

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype: this rank's shard of
        ``attnkit.linear_attention(q, k, v, causal=True, decay=decay, scale=scale)``
        on the whole sequence. Differentiable in q, k, v and decay.
    """
    size = _checked("lasp2_linear_attention", q, k, v, group, "linear",
                    {"causal": True, "decay": decay, "scale": scale})
    if size == 1:
        return linear_attention(q, k, v, causal=True, decay=decay, scale=scale)
    return _lasp2(q, k, v, decay, check_scale(scale, q.shape[-1]),
                  lambda: linear_attention(q, k, v, causal=True, decay=decay, scale=scale), group)


def lasp2_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                              group=None) -> torch.Tensor:
    """Lightning attention (scale 1, decay = ``slopes``) over a sequence sharded across
    ranks (LASP-2): the sharded form of ``attnkit.lightning_attention``.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): contiguous shards.
        slopes: (Hq,) decay rates >= 0, e.g. ``attnkit.lightning_slopes(Hq, layer, layers)``,
            the same on every rank (checked; gradient: this rank's share, as for ``decay``).
        group: the process group.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype. Differentiable in q, k, v and slopes.
    """
    size = _checked("lasp2_lightning_attention", q, k, v, group, "lightning", {"slopes": slopes})
    if size == 1:
        return lightning_attention(q, k, v, slopes)
    return _lasp2(q, k, v, slopes, 1.0, lambda: lightning_attention(q, k, v, slopes), group)
