"""Tree-reduction decoding (Tree Attention, Shyam et al. 2024).

The KV cache is split along the sequence across ranks; the query (a few new tokens)
is replicated. Each rank attends to its shard and gets (o_r, lse_r); the exact
result over the whole cache is

    m = max_r lse_r,   out = sum_r exp(lse_r - m) o_r / sum_r exp(lse_r - m)

computed with two all-reduces (max, then one packed sum of numerator and
denominator). An all-reduce takes O(log W) steps (tree / recursive doubling,
NCCL's tree algorithm for small messages) instead of the W - 1 steps of passing
partial results around a ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..checks import check_qkv, check_scale
from ._blocks import LocalAttention
from ._comm import AllReduceSumReplicated, Field, agree, input_fields, world


def tree_decode(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor, *, group=None,
                scale: float | None = None) -> torch.Tensor:
    """Attention of replicated queries over a KV cache split across ranks.

    Args:
        q: (B, Hq, Nq, D), the same on every rank (Nq = 1 for one decoding step; every
            query sees every cached key: no mask).
        k_shard: (B, Hkv, Nk_r, D), v_shard: (B, Hkv, Nk_r, Dv): this rank's part of
            the cache; Nk_r may differ between ranks (any split, any order: attention
            without a mask does not depend on the order of keys). Hkv divides Hq.
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: plain attention).
        scale: score scale, default 1/sqrt(D), the same on every rank.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, the same on every rank.

    Raises ValueError/TypeError on every rank, before any transfer, when a rank's input
    is invalid (naming the rank) or when the ranks' shapes (all but Nk_r), dtypes or
    scales differ.

    Differentiable: ``out`` is one replicated value (compute the same loss from it on
    every rank); k_shard/v_shard get their gradients, and q, being replicated, gets
    this rank's share: the sum of q.grad over the ranks is the gradient.
    """
    _, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_qkv(q, k_shard, v_shard)
        sm_scale = check_scale(scale, shapes.head_dim)
        sizes = (shapes.batch, shapes.heads_q, shapes.seqlen_q, shapes.head_dim, shapes.heads_kv, shapes.head_dim_v)
        fields = input_fields("the shape of q and of the cache heads (B, Hq, Nq, D, Hkv, Dv)", sizes,
                              "q, k_shard and v_shard", q)
        return sm_scale, [*fields, Field("scale", sm_scale)]

    sm_scale = agree("tree_decode", check, group, size)
    out, lse = LocalAttention.apply(q, k_shard, v_shard, False, sm_scale, None)
    if size == 1:
        return out
    return tree_merge(out, lse, group).to(q.dtype)


def tree_merge(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """Merge every rank's partial attention over its own keys into attention over all of
    them, by two all-reduces (see the module docstring). Collective over ``group``.

    out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) (-inf where this rank saw no key) of the same
    queries on every rank -> (B, Hq, Nq, Dv) in lse's dtype, the same on every rank, a
    replicated value for autograd (each rank's inputs get their share of the gradient).
    """
    # contiguous: an all-reduce combines memory, and ranks' partials may have different strides
    m = lse.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)   # no key anywhere: weights 0, not NaN
    w = torch.exp(lse - m).unsqueeze(-1)                       # (B, Hq, Nq, 1)
    packed = AllReduceSumReplicated.apply(torch.cat([w * out.to(w.dtype), w], dim=-1), group)
    num, den = packed[..., :-1], packed[..., -1:]
    return num / torch.where(den == 0, torch.ones_like(den), den)
