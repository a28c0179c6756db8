"""The few torch.distributed pieces the context-parallel schemes share.

Everything here is a thin layer over ``torch.distributed`` (NCCL on GPUs, gloo on
CPU): no transport of our own. Ranks are always *group* ranks; peers are translated
to global ranks only where torch wants them (P2P ops).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def world(group=None) -> Tuple[int, int]:
    """(rank, world size) of this process in ``group`` (None: the default group).

    Without an initialized process group (and no group given) the world is one rank:
    every scheme then runs its single-process path.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    return rank, dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of group rank ``rank`` (what P2P ops take as peer)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def gather_ints(values: Sequence[int], group, device: torch.device) -> List[List[int]]:
    """All-gather a few ints from every rank: returns one list per rank."""
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def check_same_on_ranks(what: str, values: Sequence[int], group, device: torch.device) -> None:
    """Raise the same ValueError on every rank when ``values`` differ between ranks.

    One small all-gather; every rank sees every rank's values, so all of them raise
    (no rank is left waiting in a later collective).
    """
    per_rank = gather_ints(values, group, device)
    if any(p != per_rank[0] for p in per_rank):
        listing = ", ".join(f"rank {r}: {tuple(p) if len(p) > 1 else p[0]}" for r, p in enumerate(per_rank))
        raise ValueError(f"{what} must be the same on every rank, got {listing}")


class Ring:
    """Point-to-point exchange with the ring neighbours: send to rank + 1, receive from
    rank - 1 (group ranks), posted as one ``batch_isend_irecv`` so that it runs while
    the caller computes. ``start`` returns the receive buffers and a handle for ``wait``."""

    def __init__(self, group, rank: int, size: int):
        self.group = group
        self.size = size
        self.send_to = global_rank(group, (rank + 1) % size)
        self.recv_from = global_rank(group, (rank - 1) % size)

    def start(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> Tuple[List[torch.Tensor], list]:
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.recv_from, self.group, tag) for b in bufs]
        return bufs, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests: list) -> None:
        for req in requests:
            req.wait()


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, size: int) -> torch.Tensor:
    """Split x along ``scatter_dim`` into ``size`` chunks, send chunk j to rank j, and
    concatenate the chunks received from ranks 0..size-1 along ``gather_dim``."""
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all; the backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group, size: int):
        ctx.args = (scatter_dim, gather_dim, group, size)
        return _all_to_all(x, scatter_dim, gather_dim, group, size)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, size = ctx.args
        return _all_to_all(grad, gather_dim, scatter_dim, group, size), None, None, None, None


class AllReduceSumReplicated(torch.autograd.Function):
    """All-reduce (sum) whose result is a replicated value: every rank then computes the
    same loss from it, so the backward passes the (identical) gradient through unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_gather_async(x: torch.Tensor, group, size: int) -> Tuple[List[torch.Tensor], Optional[object]]:
    """Start an all-gather of x; returns the output list and the work handle."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(size)]
    work = dist.all_gather(out, x, group=group, async_op=True)
    return out, work
