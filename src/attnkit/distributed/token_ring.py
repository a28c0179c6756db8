"""TokenRing (Wang et al. 2024): queries travel, K/V stay home, partial outputs come back.

Each of W ranks holds a shard of q, k and v (B, H, N/W, D) in a layout. At step t
(t = 0 .. W-1) rank r holds the query shard of rank s = r - t: it computes that
shard's attention over its own K/V (the rectangle :func:`~.layout.block_plan` gives
for the pair) and sends the partial result (out, lse) back to the query's owner s,
while the query shard moves on to r + 1. Both transfers of a step are posted before
the step's compute, in opposite directions: queries go forward (r -> r + 1), partial
outputs backward (r -> r - t; at t = 1 the other neighbour). So both directions of
the links carry data at once, where ring attention uses one. The owner merges the
partial results by their log-sum-exp (:func:`attnkit.merge_attention`).

Backward (one autograd.Function): the same schedule. The query side (q, dO, the final
LSE and rowsum(dO O) - dLSE, and O where the GPU kernel runs) goes forward; each rank
adds the dK/dV of its own (resident) K/V locally and sends the dQ of the visiting
shard back to its owner. No dK/dV accumulator travels.

Bytes per rank (forward): (W-1) query shards (Hq heads) forward plus (W-1) partial
outputs (Hq heads, Dv + 1 floats) backward; with a causal mask, pairs that share no
visible (query, key) do not send a partial, and a partial covers only the rows its
block computed. Ring attention moves (W-1) K/V shards (2 Hkv heads) one way: TokenRing
moves more under GQA, but on links that carry both directions it takes about the time
of the larger direction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..checks import check_flag, check_scale
from ..merge import merge_attention
from ._blocks import _kernel_ok, block_backward, block_forward
from ._comm import Field, agree, global_rank, input_fields, world
from .layout import Block, block_plan, check_layout, check_length, check_shards

_QUERY_TAG, _PARTIAL_TAG = 0, 1


def _rows(blocks: list[Block]) -> tuple[int, int] | None:
    """The query rows the blocks of a (query shard, key shard) pair cover (None: no block)."""
    if not blocks:
        return None
    return min(b.q_lo for b in blocks), max(b.q_hi for b in blocks)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes, dim=-1))


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[Block], rows: tuple[int, int],
             scale: float, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows ``rows`` of shard q (B, Hq, L, D) over the key shard k, v
    (B, Hkv, L, D/Dv), on ``blocks``: out (B, Hq, hi - lo, Dv), lse (B, Hq, hi - lo)."""
    lo, hi = rows
    B, Hq = q.shape[:2]
    out = torch.zeros(B, Hq, hi - lo, v.shape[-1], dtype=compute, device=q.device)
    lse = torch.full((B, Hq, hi - lo), float("-inf"), dtype=compute, device=q.device)
    for b in blocks:
        o_b, lse_b = block_forward(q[:, :, b.q_lo:b.q_hi], k[:, :, b.k_lo:b.k_hi], v[:, :, b.k_lo:b.k_hi],
                                   causal=b.causal, scale=scale, softcap=None)
        r = slice(b.q_lo - lo, b.q_hi - lo)
        out[:, :, r], lse[:, :, r] = merge_attention([out[:, :, r], o_b], [lse[:, :, r], lse_b])
    return out, lse


def _post(group, rank: int, size: int, step: int, query: torch.Tensor | None, partial: torch.Tensor | None,
          incoming: torch.Tensor | None) -> tuple[torch.Tensor | None, list]:
    """Post the transfers of ``step`` as ONE ``batch_isend_irecv`` (NCCL runs separately
    posted batches in order, and two batches to different peers can wait on each other):
    ``query`` to rank + 1 and one like it from rank - 1; ``partial`` (computed at step - 1)
    to the owner of its query, rank - (step - 1); ``incoming`` (a buffer of the rows
    expected) filled from rank + (step - 1). None leaves that part out. Returns the query
    buffer (or None) and the requests."""
    ops, got_query = [], None
    if query is not None:
        query = query.contiguous()
        got_query = torch.empty_like(query)
        ops += [dist.P2POp(dist.isend, query, global_rank(group, (rank + 1) % size), group, _QUERY_TAG),
                dist.P2POp(dist.irecv, got_query, global_rank(group, (rank - 1) % size), group, _QUERY_TAG)]
    if partial is not None:
        ops.append(dist.P2POp(dist.isend, partial.contiguous(), global_rank(group, (rank - step + 1) % size), group,
                              _PARTIAL_TAG))
    if incoming is not None:
        ops.append(dist.P2POp(dist.irecv, incoming, global_rank(group, (rank + step - 1) % size), group,
                              _PARTIAL_TAG))
    return got_query, (dist.batch_isend_irecv(ops) if ops else [])


def _wait(requests: list) -> None:
    for req in requests:
        req.wait()


class _TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, rank: int, size: int, layout: str, causal: bool, scale: float):
        ctx.set_materialize_grads(False)
        B, Hq, L, _ = q.shape
        Dv = v.shape[-1]
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(B, Hq, L, Dv, dtype=compute, device=q.device)
        lse = torch.full((B, Hq, L), float("-inf"), dtype=compute, device=q.device)

        def merge_in(rows, o_p, lse_p):
            lo, hi = rows
            out[:, :, lo:hi], lse[:, :, lo:hi] = merge_attention([out[:, :, lo:hi], o_p], [lse[:, :, lo:hi], lse_p])

        query, pending = q, None           # pending: the partial of the previous step, for its owner
        for step in range(size + (size > 1)):  # a last round brings the last partial home
            # the partial for this rank's queries that rank + (step - 1) computed at step - 1
            back_rows = _rows(block_plan(layout, rank, (rank + step - 1) % size, L, causal)) if step >= 2 else None
            incoming = None if back_rows is None else torch.empty(
                B, Hq, back_rows[1] - back_rows[0], Dv + 1, dtype=compute, device=q.device)
            query_in, requests = _post(group, rank, size, step, query if step < size - 1 else None, pending, incoming)
            pending = None
            if step < size:                    # the query shard of rank - step against this rank's K/V
                blocks = block_plan(layout, (rank - step) % size, rank, L, causal)
                rows = _rows(blocks)
                if rows is not None:
                    o_p, lse_p = _partial(query, k, v, blocks, rows, scale, compute)
                    if step == 0:
                        merge_in(rows, o_p, lse_p)
                    else:                      # one message: out and lse side by side
                        pending = torch.cat([o_p, lse_p.unsqueeze(-1)], dim=-1)
            _wait(requests)
            if incoming is not None:
                merge_in(back_rows, incoming[..., :Dv], incoming[..., Dv])
            query = query_in
        lse = lse.float() if compute == torch.float32 else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, size, layout, causal, scale)
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable  # gradients travel between ranks: they are not differentiable again
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, size, layout, causal, scale = ctx.args
        B, Hq, L, D = q.shape
        compute = out.dtype
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(compute)
        delta = (dout * out).sum(-1)
        if dlse is not None:      # the LSE's gradient enters as delta - dlse (the PyTorch path)
            delta = delta - dlse.to(compute)
        use_kernel = dlse is None and _kernel_ok(q, v)
        # the query side of the block backward, one message: q, (o for the kernel), dO, lse, delta
        parts = [q.to(compute)] + ([out] if use_kernel else []) + [dout, lse.to(compute)[..., None], delta[..., None]]
        widths = [t.shape[-1] for t in parts]
        side = torch.cat(parts, dim=-1)
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)
        dk = torch.zeros(k.shape, dtype=compute, device=k.device)
        dv = torch.zeros(v.shape, dtype=compute, device=v.device)
        pending = None
        for step in range(size + (size > 1)):
            back_rows = _rows(block_plan(layout, rank, (rank + step - 1) % size, L, causal)) if step >= 2 else None
            incoming = None if back_rows is None else torch.empty(
                B, Hq, back_rows[1] - back_rows[0], D, dtype=compute, device=q.device)
            side_in, requests = _post(group, rank, size, step, side if step < size - 1 else None, pending, incoming)
            pending = None
            if step < size:
                blocks = block_plan(layout, (rank - step) % size, rank, L, causal)
                rows = _rows(blocks)
                if rows is not None:
                    lo, hi = rows
                    dq_p = torch.zeros(B, Hq, hi - lo, D, dtype=compute, device=q.device)
                    pieces = _split(side, widths)
                    q_s, do_s, lse_s, delta_s = pieces[0], pieces[-3], pieces[-2][..., 0], pieces[-1][..., 0]
                    o_s = pieces[1] if use_kernel else None
                    for b in blocks:
                        r, keys = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
                        dq_b, dk_b, dv_b = block_backward(
                            q_s[:, :, r].to(q.dtype), k[:, :, keys], v[:, :, keys],
                            None if o_s is None else o_s[:, :, r], lse_s[:, :, r], do_s[:, :, r], delta_s[:, :, r],
                            None, causal=b.causal, scale=scale, softcap=None, use_kernel=use_kernel)
                        dq_p[:, :, b.q_lo - lo:b.q_hi - lo] += dq_b
                        dk[:, :, keys] += dk_b
                        dv[:, :, keys] += dv_b
                    if step == 0:
                        dq[:, :, lo:hi] += dq_p
                    else:
                        pending = dq_p
            _wait(requests)
            if incoming is not None:
                dq[:, :, back_rows[0]:back_rows[1]] += incoming
            side = side_in
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = False,
                         layout: str = "zigzag", scale: float | None = None, return_lse: bool = False):
    """Exact softmax attention over a sequence sharded across ``group`` by TokenRing:
    queries travel forward around the ring, partial outputs travel back, K/V stay home.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's shards
            of the whole q, k, v (e.g. from :func:`shard_sequence`) in ``layout``; the
            same shapes and dtype on every rank. Hkv divides Hq (GQA/MQA).
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: plain flash attention).
        causal: causal mask over the *global* positions (Nq == Nk).
        layout: "zigzag" (default), "striped" or "contiguous", as for
            :func:`ring_attention` (with ``causal``, zigzag and striped balance the work;
            N must be a multiple of 2W for zigzag, of W otherwise).
        scale: score scale, default 1/sqrt(D).
        return_lse: also return the LSE (B, Hq, N/W), float32 (float64 for float64
            inputs), natural log.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype (this rank's shard of the output, same layout),
        or (out, lse). Differentiable in q, k, v (and through the LSE), first order.

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (the message names the rank) or when the ranks' shapes, dtypes, layout,
        causal or scale differ (it lists every rank's value).

    Examples::

        >>> import attnkit.distributed as akd
        >>> q, k, v = (akd.shard_sequence(t, layout="zigzag") for t in (q_all, k_all, v_all))
        >>> out = akd.token_ring_attention(q, k, v, causal=True)       # (B, Hq, N/W, Dv)
        >>> akd.unshard_sequence(out, layout="zigzag")                  # (B, Hq, N, Dv)
    """
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_shards("token ring attention", q, k, v)
        options = (check_flag("causal", causal), check_scale(scale, shapes.head_dim))
        check_flag("return_lse", return_lse)
        check_layout(layout)
        check_length(shapes.seqlen_q * size, layout, size, name="the sequence length N")
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("layout", layout), *map(Field, ("causal", "scale"), options)]
        return options, fields

    is_causal, sm_scale = agree("token_ring_attention", check, group, size)
    out, lse = _TokenRingAttention.apply(q, k, v, group, rank, size, layout, is_causal, sm_scale)
    return (out, lse) if return_lse else out
