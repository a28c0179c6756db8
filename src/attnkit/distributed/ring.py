"""Ring attention (Liu et al. 2023) with zigzag and striped causal load balancing.

Each of W ranks holds a shard of q, k and v (B, H, N/W, D) in a layout. K/V shards
travel around the ring (rank r sends to r + 1, receives from r - 1) with P2P
``batch_isend_irecv``; the transfer of the next shard is posted before the current
block is computed, so communication hides behind compute once blocks are large.
After W - 1 transfers every query shard has seen every key shard; the partial
results are merged by their log-sum-exp with :func:`attnkit.merge_attention`.

Backward (one autograd.Function): K/V go around the ring once more, each rank adds
its dQ locally and the dK/dV of the block it holds to an accumulator that travels
with the block, and one last transfer brings every dK/dV home (W - 1 + W transfers).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..checks import check_flag, check_qkv, check_scale, check_softcap
from ..merge import merge_attention
from ._blocks import block_backward, block_forward
from ._comm import Field, Ring, agree, input_fields, world
from .layout import block_plan, check_layout, check_length

_KV_TAG, _GRAD_TAG = 0, 1


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, rank: int, size: int, layout: str, causal: bool, scale: float,
                softcap: float | None):
        ctx.set_materialize_grads(False)
        B, Hq, L, _ = q.shape
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(B, Hq, L, v.shape[-1], dtype=compute, device=q.device)
        lse = torch.full((B, Hq, L), float("-inf"), dtype=compute, device=q.device)
        ring = Ring(group, rank, size) if size > 1 else None
        kv = (k, v)
        for step in range(size):
            source = (rank - step) % size
            if ring is not None and step < size - 1:
                incoming, requests = ring.start(kv, _KV_TAG)        # next shard, in flight during compute
            for b in block_plan(layout, rank, source, L, causal):
                rows = slice(b.q_lo, b.q_hi)
                o_b, lse_b = block_forward(q[:, :, rows], kv[0][:, :, b.k_lo:b.k_hi], kv[1][:, :, b.k_lo:b.k_hi],
                                           causal=b.causal, scale=scale, softcap=softcap)
                out[:, :, rows], lse[:, :, rows] = merge_attention([out[:, :, rows], o_b], [lse[:, :, rows], lse_b])
            if ring is not None and step < size - 1:
                ring.wait(requests)
                kv = tuple(incoming)
        lse = lse.float() if compute == torch.float32 else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, size, layout, causal, scale, softcap)
        result = out.to(q.dtype)
        return result, lse

    @staticmethod
    @once_differentiable  # gradients travel the ring: they are not differentiable again
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, size, layout, causal, scale, softcap = ctx.args
        L = q.shape[2]
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype)
        delta = (dout * out).sum(-1)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        ring = Ring(group, rank, size) if size > 1 else None
        kv = (k, v)
        arriving = None  # (buffers, requests) of the dK/dV accumulator on its way to this rank
        for step in range(size):
            source = (rank - step) % size
            if ring is not None and step < size - 1:
                incoming, requests = ring.start(kv, _KV_TAG)
            dk = torch.zeros(k.shape, dtype=out.dtype, device=k.device)
            dv = torch.zeros(v.shape, dtype=out.dtype, device=v.device)
            for b in block_plan(layout, rank, source, L, causal):
                rows, keys = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
                dq_b, dk_b, dv_b = block_backward(
                    q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows], lse[:, :, rows],
                    dout[:, :, rows], delta[:, :, rows], None if dlse is None else dlse[:, :, rows],
                    causal=b.causal, scale=scale, softcap=softcap)
                dq[:, :, rows] += dq_b
                dk[:, :, keys] += dk_b
                dv[:, :, keys] += dv_b
            if ring is None:
                break
            if arriving is not None:  # the accumulator of this block, from the ranks before
                ring.wait(arriving[1])
                dk += arriving[0][0]
                dv += arriving[0][1]
            arriving = ring.start((dk, dv), _GRAD_TAG)  # send it on with the block's owner ahead
            if step < size - 1:
                ring.wait(requests)
                kv = tuple(incoming)
        if ring is not None:  # after W sends every accumulator is back at its owner
            ring.wait(arriving[1])
            dk, dv = arriving[0]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "zigzag",
                   causal: bool = False, scale: float | None = None, softcap: float | None = None,
                   return_lse: bool = False):
    """Exact softmax attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's shards
            of the whole q, k, v (e.g. from :func:`shard_sequence`) in ``layout``; the
            same shapes and dtype on every rank. Hkv divides Hq (GQA/MQA): K/V travel
            with Hkv heads.
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: plain flash attention).
        layout: "zigzag" (default), "striped" or "contiguous": the layout of the
            shards; with ``causal`` zigzag and striped give every rank the same work.
        causal: causal mask over the *global* positions (Nq == Nk, so the usual lower
            triangle).
        scale: score scale, default 1/sqrt(D). softcap: s <- softcap * tanh(s / softcap).
        return_lse: also return the LSE (B, Hq, N/W), float32, natural log.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype (this rank's shard of the output, same
        layout), or (out, lse). Differentiable in q, k, v (and through the LSE).

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (the message names the rank) or when the ranks' shapes, dtypes, layout,
        causal, scale or softcap differ (it lists every rank's value).
    """
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_qkv(q, k, v)
        options = (check_flag("causal", causal), check_scale(scale, shapes.head_dim), check_softcap(softcap))
        check_flag("return_lse", return_lse)
        check_layout(layout)
        if shapes.seqlen_q != shapes.seqlen_k:
            raise ValueError(f"ring attention needs q and k/v shards of the same tokens (Nq == Nk per rank), got "
                             f"{shapes.seqlen_q} and {shapes.seqlen_k}")
        check_length(shapes.seqlen_q * size, layout, size, name="the sequence length N")
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("layout", layout), *map(Field, ("causal", "scale", "softcap"), options)]
        return options, fields

    is_causal, sm_scale, cap = agree("ring_attention", check, group, size)
    out, lse = _RingAttention.apply(q, k, v, group, rank, size, layout, is_causal, sm_scale, cap)
    return (out, lse) if return_lse else out
