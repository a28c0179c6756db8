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

Windows, sinks and packed sequences (:class:`_MaskedRing`) cut the ring open into a
chain: rank r's K/V travel to r + 1, r + 2, ... (the keys below later queries) and, at
the same time, to r - 1, r - 2, ... (the keys above), each direction only as many hops
as a query can reach: a window (left, right) on shards of N_local tokens needs
ceil(left / N_local) hops down and ceil(right / N_local) up (contiguous layout), instead
of W - 1. Blocks are computed under an explicit mask over global positions (only the
bounding box of its visible pairs), and the sink keys a window no longer reaches are
shared once (one all-reduce of the few sink tokens). Backward: the same transfers, then
each block's dK/dV go back along the chain, summed on the way.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..checks import (
    check_cu_seqlens,
    check_flag,
    check_head_vector,
    check_scale,
    check_softcap,
)
from ..merge import merge_attention
from ..sliding_window.window import check_sinks, head_windows
from ._blocks import (
    block_backward,
    block_backward_torch,
    block_forward,
    block_forward_masked,
)
from ._comm import Field, Ring, agree, input_fields, world
from .layout import block_plan, check_layout, check_length, check_shards, positions

_KV_TAG, _GRAD_TAG = 0, 1
_CHAIN_TAGS = {1: (2, 3), -1: (4, 5)}   # per chain direction: (K/V tag, dK/dV tag)


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


class Pattern(NamedTuple):
    """Which keys a query sees, over global positions of the whole (packed) sequence.

    ``windows``: one (left, right) per query head, -1 unbounded, with ``causal`` already
    folded in (right edge 0), or None for no window; ``sinks``: the first ``sinks`` keys
    of each sequence stay visible (with a window); ``cu``: offsets of the packed
    sequences (host ints) or None for one sequence.
    """

    causal: bool
    windows: tuple[tuple[int, int], ...] | None
    sinks: int
    cu: tuple[int, ...] | None

    def starts(self, pos: torch.Tensor) -> torch.Tensor:
        """The first position of the sequence of each position in ``pos``."""
        if self.cu is None:
            return torch.zeros_like(pos)
        cu = torch.tensor(self.cu, device=pos.device)
        return cu[torch.bucketize(pos, cu, right=True) - 1]

    def is_sink(self, pos: torch.Tensor) -> torch.Tensor:
        return pos - self.starts(pos) < self.sinks

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """(1 or Hq, M, L) bool: query position qpos[i] sees key position kpos[j]."""
        seen = self.starts(qpos)[:, None] == self.starts(kpos)[None, :]
        d = qpos[:, None] - kpos[None, :]
        if self.windows is None:
            return (seen & (d >= 0) if self.causal else seen)[None]
        sink = self.is_sink(kpos)[None, :]
        masks = {}
        for left, right in dict.fromkeys(self.windows):
            m = seen if right < 0 else seen & (d >= -right)
            masks[left, right] = m if left < 0 else m & ((d <= left) | sink)
        if len(masks) == 1:
            return next(iter(masks.values()))[None]
        return torch.stack([masks[w] for w in self.windows])

    def reach(self, layout: str, local: int, size: int) -> tuple[int, int]:
        """How many ranks below and above a rank's keys a query can reach (contiguous
        layout; every other layout scatters nearby positions over every rank)."""
        if layout != "contiguous":
            return size - 1, size - 1
        if self.windows is None:
            left, right = -1, 0 if self.causal else -1
        else:
            left = -1 if any(lo < 0 for lo, _ in self.windows) else max(lo for lo, _ in self.windows)
            right = -1 if any(r < 0 for _, r in self.windows) else max(r for _, r in self.windows)
        hops = lambda extent: size - 1 if extent < 0 else min(size - 1, math.ceil(extent / local))
        return hops(left), hops(right)

    def sink_positions(self, total: int) -> torch.Tensor:
        """Positions of every sink key (the first ``sinks`` of each sequence)."""
        if self.windows is None or self.sinks == 0:
            return torch.zeros(0, dtype=torch.long)
        cu = self.cu or (0, total)
        spans = [torch.arange(a, min(a + self.sinks, b)) for a, b in itertools.pairwise(cu)]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


class _Chain:
    """The plan of one masked ring call on one rank: positions, the hops of the two
    chains, which sink keys travel apart, and the block computations."""

    def __init__(self, group, rank: int, size: int, layout: str, pattern: Pattern, local: int, device):
        self.group, self.rank, self.size, self.layout, self.pattern = group, rank, size, layout, pattern
        self.total = local * size
        self.qpos = positions(layout, rank, size, self.total, device)
        self.below, self.above = pattern.reach(layout, local, size)
        self.steps = max(self.below, self.above)
        # Sink keys a window cannot reach from some rank travel apart (windows: contiguous layout only)
        sinks = pattern.sink_positions(self.total)
        owners = sinks // local
        self.sinks = sinks.to(device) if bool((owners < size - 1 - self.below).any()) else None
        if self.sinks is not None:
            self.own_sinks = (owners == rank).nonzero().flatten().to(device)   # indices into self.sinks
            self.own_sink_rows = self.sinks[self.own_sinks] - rank * local
        self.rings = {d: Ring(group, rank, size, step=d) for d in (1, -1)} if size > 1 else {}

    def hops(self, d: int) -> int:
        return self.below if d == 1 else self.above

    def source(self, d: int, s: int) -> int | None:
        """The rank whose K/V reach this rank after s hops of direction d (None: past an end)."""
        src = self.rank - d * s
        return src if 0 <= src < self.size else None

    def kpos(self, source: int) -> torch.Tensor:
        return positions(self.layout, source, self.size, self.total, self.qpos.device)

    def mask(self, kpos: torch.Tensor, sink_block: bool = False):
        """The visible pairs' mask cut to their bounding box: (mask, rows, keys) or None if empty."""
        m = self.pattern.visible(self.qpos, kpos)
        if self.sinks is not None and not sink_block:   # those keys are counted in the sink block
            m = m & ~self.pattern.is_sink(kpos)[None, None, :]
        rows, keys = m.any(2).any(0).nonzero(), m.any(1).any(0).nonzero()
        if rows.numel() == 0:
            return None
        r0, r1, k0, k1 = int(rows[0]), int(rows[-1]) + 1, int(keys[0]), int(keys[-1]) + 1
        return m[:, r0:r1, k0:k1], slice(r0, r1), slice(k0, k1)

    def transfers(self, tensors_of: dict, s: int, tags: int) -> dict:
        """Post hop s of both chains: send what ``tensors_of[d]`` holds on, receive the next."""
        pending = {}
        for d, ring in self.rings.items():
            if s > self.hops(d) or tensors_of.get(d) is None and self.source(d, s) is None:
                continue
            send = 0 <= self.rank + d < self.size and self.source(d, s - 1) is not None
            recv = self.source(d, s) is not None
            if send or recv:
                pending[d] = ring.start(tensors_of[d], _CHAIN_TAGS[d][tags], send=send, recv=recv)
        return pending

    def blocks(self, k: torch.Tensor, v: torch.Tensor):
        """Walk both chains with this rank's K/V. Yields None once the first hop is posted (the
        caller's local blocks overlap it), then (direction, hop, (k, v), key positions) for every
        block that reaches this rank, with the next hop's transfers already in flight."""
        held = {d: (k, v) for d in self.rings}
        pending = self.transfers(held, 1, 0) if self.steps else {}
        yield None
        for s in range(1, self.steps + 1):
            for d, (bufs, requests) in pending.items():
                Ring.wait(requests)
                held[d] = bufs
            for d in self.rings:
                if d not in pending or s > self.hops(d):
                    held[d] = None
            pending = self.transfers(held, s + 1, 0) if s < self.steps else {}
            for d in self.rings:
                if held[d] is not None:
                    yield d, s, held[d], self.kpos(self.source(d, s))

    def sink_slab(self, k: torch.Tensor, v: torch.Tensor):
        """Every sink key and value (B, Hkv, S_all, D): one all-reduce of the owners' rows."""
        slabs = []
        for x in (k, v):
            slab = x.new_zeros(x.shape[0], x.shape[1], self.sinks.numel(), x.shape[3])
            slab[:, :, self.own_sinks] = x[:, :, self.own_sink_rows]
            slabs.append(slab)
        for slab in slabs:
            dist.all_reduce(slab, group=self.group)
        return slabs


class _MaskedRing(torch.autograd.Function):
    """Ring attention under a :class:`Pattern` (windows, sinks, packed sequences), on a chain."""

    @staticmethod
    def forward(ctx, q, k, v, group, rank: int, size: int, layout: str, pattern: Pattern, scale: float,
                softcap: float | None):
        ctx.set_materialize_grads(False)
        B, Hq, L, _ = q.shape
        chain = _Chain(group, rank, size, layout, pattern, L, q.device)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(B, Hq, L, v.shape[-1], dtype=compute, device=q.device)
        lse = torch.full((B, Hq, L), float("-inf"), dtype=compute, device=q.device)

        def attend(kv, kpos, sink_block=False):
            cut = chain.mask(kpos, sink_block)
            if cut is None:
                return
            m, rows, keys = cut
            o_b, lse_b = block_forward_masked(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], m, scale=scale,
                                              softcap=softcap)
            out[:, :, rows], lse[:, :, rows] = merge_attention([out[:, :, rows], o_b], [lse[:, :, rows], lse_b])

        walk = chain.blocks(k, v)
        next(walk)  # the first hop is posted: the local blocks overlap it
        if chain.sinks is not None:
            attend(chain.sink_slab(k, v), chain.sinks, sink_block=True)
        attend((k, v), chain.qpos)
        for _, _, kv, kpos in walk:
            attend(kv, kpos)
        lse = lse.float() if compute == torch.float32 else lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, size, layout, pattern, scale, softcap)
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable  # gradients travel the chain: they are not differentiable again
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, size, layout, pattern, scale, softcap = ctx.args
        chain = _Chain(group, rank, size, layout, pattern, q.shape[2], q.device)
        dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
        delta = (dout * out).sum(-1)
        if dlse is not None:
            delta = delta - dlse
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)

        def grads(kv, kpos, sink_block=False):
            """dK, dV of the block's keys (shaped like kv), dQ added to dq; None if nothing is visible."""
            cut = chain.mask(kpos, sink_block)
            if cut is None:
                return None
            m, rows, keys = cut
            dq_b, dk_b, dv_b = block_backward_torch(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                                                    lse[:, :, rows], dout[:, :, rows], delta[:, :, rows],
                                                    causal=False, scale=scale, softcap=softcap, mask=m)
            dq[:, :, rows] += dq_b
            dk = torch.zeros(kv[0].shape, dtype=out.dtype, device=q.device)
            dv = torch.zeros(kv[1].shape, dtype=out.dtype, device=q.device)
            dk[:, :, keys], dv[:, :, keys] = dk_b, dv_b
            return dk, dv

        zeros = (torch.zeros(k.shape, dtype=out.dtype, device=k.device),
                 torch.zeros(v.shape, dtype=out.dtype, device=v.device))
        dk, dv = grads((k, v), chain.qpos) or zeros
        if chain.sinks is not None:
            slab = chain.sink_slab(k, v)
            sink_grads = grads(slab, chain.sinks, sink_block=True) or tuple(torch.zeros_like(x, dtype=out.dtype)
                                                                            for x in slab)
            for g in sink_grads:
                dist.all_reduce(g, group=group)
            dk[:, :, chain.own_sink_rows] += sink_grads[0][:, :, chain.own_sinks]
            dv[:, :, chain.own_sink_rows] += sink_grads[1][:, :, chain.own_sinks]
        # the same K/V transfers again; each block's dK/dV wait for the return trip
        parts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        walk = chain.blocks(k, v)
        next(walk)
        for d, s, kv, kpos in walk:
            parts[d, s] = grads(kv, kpos) or zeros
        # return trip: hop t carries the sum for the rank t hops back, adding each rank's part on the way
        for d in chain.rings:
            back = Ring(group, rank, size, step=-d)
            incoming = None
            for t in range(chain.hops(d), 0, -1):
                send = chain.source(d, t) is not None
                recv = 0 <= rank + d < size and 0 <= rank + d - d * t < size
                acc = None
                if send:
                    acc = parts.get((d, t), zeros)
                    if incoming is not None:
                        acc = (acc[0] + incoming[0], acc[1] + incoming[1])
                if send or recv:
                    bufs, requests = back.start(acc if send else zeros, _CHAIN_TAGS[d][1], send=send, recv=recv)
                    Ring.wait(requests)
                    incoming = bufs
                else:
                    incoming = None
            if incoming is not None:
                dk, dv = dk + incoming[0], dv + incoming[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, layout: str = "zigzag",
                   causal: bool = False, scale: float | None = None, softcap: float | None = None,
                   window=None, sinks: int = 0, sink_logits: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, return_lse: bool = False):
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
            A ``window`` needs "contiguous" (see below).
        causal: causal mask over the *global* positions (Nq == Nk, so the usual lower
            triangle); with a window it sets the window's right edge to 0.
        scale: score scale, default 1/sqrt(D). softcap: s <- softcap * tanh(s / softcap).
        window: sliding window over the global positions, exactly as
            :func:`attnkit.sliding_window_attention` takes it: an int W (the last W keys,
            (W - 1, 0)), a pair (left, right) of ints >= -1 (-1 unbounded) or an int
            tensor (Hq, 2) of per-head windows; query p sees key j iff j <= p + right and
            (j >= p - left or j is a sink). Only with ``layout="contiguous"``: a window
            then reaches ceil(left / (N/W)) ranks below and ceil(right / (N/W)) above,
            and K/V travel only that far (zigzag and striped spread every window over
            all ranks, and a window is already balanced under contiguous).
        sinks: S >= 0 (needs ``window``): the first S keys of the sequence (of each
            sequence when packed) stay visible, subject only to the right edge.
        sink_logits: (Hq,) per-head logit added to every row's softmax denominator with
            no value (gpt-oss), merged once into the ring's result by its LSE;
            differentiable (each rank gets its share of the gradient: sum over ranks).
        cu_seqlens: (S + 1,) int32 offsets of S sequences packed along the *whole* N
            (B = 1), the same tensor on every rank; each rank holds the shard of the
            packed (1, H, N, D) tensors that :func:`shard_sequence` gives in ``layout``
            (so sequences may straddle ranks). Each sequence attends only within itself
            (causal, window and sinks relative to its own start).
        return_lse: also return the LSE (B, Hq, N/W), float32, natural log.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype (this rank's shard of the output, same
        layout), or (out, lse). Differentiable in q, k, v (and through the LSE) and in
        ``sink_logits``.

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (the message names the rank) or when the ranks' shapes, dtypes, layout,
        causal, scale, softcap, window, sinks, sink_logits or cu_seqlens differ (it lists
        every rank's value).

    Examples::

        >>> # on each of W ranks, after torch.distributed.init_process_group
        >>> q = shard_sequence(torch.randn(1, 8, 4096, 64), layout="contiguous")
        >>> k = v = shard_sequence(torch.randn(1, 2, 4096, 64), layout="contiguous")
        >>> out = ring_attention(q, k, v, layout="contiguous", window=512, sinks=4)   # talks to 1 neighbour (W<=8)
        >>> cu = torch.tensor([0, 1000, 4096], dtype=torch.int32)                    # two packed sequences
        >>> out = ring_attention(q, k, v, causal=True, cu_seqlens=cu, sink_logits=torch.zeros(8))
    """
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_shards("ring attention", q, k, v)
        options = (check_flag("causal", causal), check_scale(scale, shapes.head_dim), check_softcap(softcap))
        check_flag("return_lse", return_lse)
        check_layout(layout)
        total = shapes.seqlen_q * size
        check_length(total, layout, size, name="the sequence length N")
        n_sinks = check_sinks(sinks)
        windows = None
        if window is not None:
            if layout != "contiguous":
                raise ValueError(f"ring_attention with a window needs layout='contiguous', got layout={layout!r}: "
                                 "zigzag and striped spread every window over all ranks (no transfer could be "
                                 "skipped), and a window is already balanced under contiguous")
            windows = tuple((left, 0 if options[0] else right)
                            for left, right in head_windows(window, shapes.heads_q, q.device))
        elif n_sinks:
            raise ValueError(f"sinks={n_sinks} needs a window (the sinks are the keys a window keeps besides "
                             "its own); pass window=")
        if sink_logits is not None:
            check_head_vector("sink_logits", sink_logits, shapes.heads_q, q)
        cu = None
        if cu_seqlens is not None:
            if shapes.batch != 1:
                raise ValueError(f"with cu_seqlens the sequences are packed along N and the batch size must be 1, "
                                 f"got {shapes.batch}")
            cu = tuple(check_cu_seqlens("cu_seqlens", cu_seqlens, total, q.device).tolist())
        pattern = Pattern(options[0], windows, n_sinks, cu)
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("layout", layout), *map(Field, ("causal", "scale", "softcap"), options),
                   Field("window", windows), Field("sinks", n_sinks), Field("cu_seqlens", cu_seqlens),
                   Field("sink_logits", sink_logits)]
        return (*options, pattern), fields

    is_causal, sm_scale, cap, pattern = agree("ring_attention", check, group, size)
    if pattern.windows is None and pattern.cu is None:
        out, lse = _RingAttention.apply(q, k, v, group, rank, size, layout, is_causal, sm_scale, cap)
    else:
        out, lse = _MaskedRing.apply(q, k, v, group, rank, size, layout, pattern, sm_scale, cap)
    if sink_logits is not None:   # the sink: a part with no value whose LSE is the logit
        sink = sink_logits.to(lse.dtype)[None, :, None].expand_as(lse)
        out, lse = merge_attention([out, torch.zeros_like(out)], [lse, sink])
    return (out, lse) if return_lse else out
