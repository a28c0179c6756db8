"""The few torch.distributed pieces the context-parallel schemes share.

Everything here is a thin layer over ``torch.distributed`` (NCCL on GPUs, gloo on
CPU): no transport of our own. Ranks are always *group* ranks; peers are translated
to global ranks only where torch wants them (P2P ops).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world(group=None) -> tuple[int, int]:
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


# --------------------------------------------------------------------------- ranks agree before they talk

class Field(NamedTuple):
    """One thing every rank of a call must agree on.

    ``what`` names it in the error ("causal", "the dtype of q, k and v"); ``value`` is
    compared across ranks as :func:`render` writes it; ``error`` is the exception every
    rank raises when the ranks differ (TypeError for dtypes, ValueError otherwise).
    """

    what: str
    value: Any
    error: type[Exception] = ValueError


def input_fields(shape_what: str, sizes: Sequence[int], names: str, x: torch.Tensor) -> list[Field]:
    """The fields of a call's tensors: the sizes (described by ``shape_what``), and the dtype
    and device type of ``x`` (the caller has checked that ``names`` share them)."""
    return [Field(shape_what, tuple(sizes)), Field(f"the dtype of {names}", x.dtype, TypeError),
            Field(f"the device type of {names}", x.device.type)]


_SHOWN_VALUES = 8                # tensors up to this many elements are shown whole, larger ones by a digest
_AGREEMENT_BYTES = 2048          # per rank and call: the signature, or the message of a rejected input
_KEPT_TYPES = {t.__name__: t for t in (ValueError, TypeError, NotImplementedError, RuntimeError)}


def render(value: Any) -> str:
    """The text ``value`` is compared by across ranks (and shown in errors).

    Plain values by ``repr``; tensors by dtype, shape and values (a digest of the bytes
    when large: different values give different text); other objects (mods, masks) by
    their type only, since their ``repr`` may hold a memory address that differs
    between processes.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.numel() <= _SHOWN_VALUES:
            return f"tensor({t.tolist()}, dtype={t.dtype})"
        digest = hashlib.sha1(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:12]
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype}, values #{digest})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(render(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner},)" if len(value) == 1 else f"({inner})"
    return f"<{type(value).__qualname__}>"


def _agreement_device(group) -> torch.device:
    """Where the agreement buffer must live for the group's backend (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    while len(data) > _AGREEMENT_BYTES:
        if "error" in payload:        # a long message is cut, never dropped
            kind, message = payload["error"]
            payload = dict(payload, error=[kind, message[:len(message) // 2] + " ..."])
        else:                         # too many fields to list: agree on their digest
            digest = hashlib.sha1(data).hexdigest()[:16]
            payload = dict(payload, fields=[["the arguments (a digest)", digest, "ValueError"]])
        data = json.dumps(payload).encode()
    return data


def _all_gather_payloads(payload: dict, group, size: int) -> list[dict]:
    data = _encode(payload)
    buf = torch.zeros(_AGREEMENT_BYTES, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(_agreement_device(group))
    out = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(out, buf, group=group)
    rows = torch.stack(out).cpu().numpy()       # reading it waits for the all-gather (a host sync)
    return [json.loads(row.tobytes().rstrip(b"\0")) for row in rows]


def _by_value(values: Sequence[str]) -> str:
    """'rank 0: a; ranks 1, 2: b' (ranks grouped by value, in rank order)."""
    groups: dict[str, list[int]] = {}
    for r, value in enumerate(values):
        groups.setdefault(value, []).append(r)
    return "; ".join(f"rank {ranks[0]}: {value}" if len(ranks) == 1
                     else f"ranks {', '.join(map(str, ranks))}: {value}" for value, ranks in groups.items())


def _disagreement(per_rank: list[dict]) -> tuple[str | None, type[Exception]]:
    """The error every rank raises for the gathered payloads (None when they agree)."""
    op = per_rank[0]["op"]
    rejected: dict[tuple[str, str], list[int]] = {}
    for r, p in enumerate(per_rank):
        if "error" in p:
            rejected.setdefault(tuple(p["error"]), []).append(r)
    if rejected:
        parts = [f"rank {ranks[0]} rejected its input: {message.rstrip('.')}" if len(ranks) == 1 else
                 f"ranks {', '.join(map(str, ranks))} rejected their inputs: {message.rstrip('.')}"
                 for (_, message), ranks in rejected.items()]
        first_kind = next(iter(rejected))[0]
        return f"{op}: " + ". ".join(parts), _KEPT_TYPES.get(first_kind, RuntimeError)
    ops = [repr(p["op"]) for p in per_rank]
    if len(set(ops)) > 1:
        return f"{op}: the function called must be the same on every rank, got {_by_value(ops)}", ValueError
    tables = [{what: (value, kind) for what, value, kind in p["fields"]} for p in per_rank]
    parts, kinds = [], []
    for what in dict.fromkeys(what for table in tables for what in table):     # every field, in order
        values = [table.get(what, ("<absent>", "ValueError")) for table in tables]
        if len({v for v, _ in values}) > 1:
            parts.append(f"{what} must be the same on every rank, got {_by_value([v for v, _ in values])}")
            kinds.append(values[0][1])
    if not parts:
        return None, ValueError
    return f"{op}: " + ". ".join(parts), _KEPT_TYPES.get(kinds[0], ValueError)


def agree(op: str, check: Callable[[], tuple[T, Sequence[Field]]], group, size: int) -> T:
    """Validate this rank's call, then make every rank of ``group`` agree on it, before any
    transfer. Collective: every rank of the group calls it with the same ``op``.

    ``check()`` validates this rank's arguments (raising ValueError/TypeError as usual)
    and returns (what the caller needs, the call's fields: dtypes, shapes, options).
    With one rank it is simply called. Otherwise each rank catches its own error, and one
    all-gather of a fixed-size buffer shares every rank's "fields" or "rejected: message";
    then, on every rank, the same exception is raised when a rank rejected its input (the
    message names that rank) or when a field differs between ranks (the message lists
    each rank's value). So no rank goes on to a transfer its peers will never join
    (a gloo abort on mismatched sizes, a "connection reset", a wait until the timeout),
    and ranks never compute with different options (silently different results).

    Returns what ``check()`` returned first.
    """
    if size == 1:
        return check()[0]
    failure: Exception | None = None
    try:
        result, fields = check()
        payload = {"op": op, "fields": [[f.what, render(f.value), f.error.__name__] for f in fields]}
    except Exception as exc:  # noqa: BLE001 - any failure is shared with the other ranks and raised on all
        failure = exc
        payload = {"op": op, "error": [type(exc).__name__, str(exc)]}
    message, error = _disagreement(_all_gather_payloads(payload, group, size))
    if message is not None:
        raise error(message) from failure
    return result


class Ring:
    """Point-to-point exchange with the ring neighbours: send to rank + step, receive from
    rank - step (group ranks; ``step=-1`` turns the ring around), posted as one
    ``batch_isend_irecv`` so that it runs while the caller computes. ``start`` returns the
    receive buffers and a handle for ``wait``."""

    def __init__(self, group, rank: int, size: int, *, step: int = 1):
        self.group = group
        self.size = size
        self.send_to = global_rank(group, (rank + step) % size)
        self.recv_from = global_rank(group, (rank - step) % size)

    def start(self, tensors: Sequence[torch.Tensor], tag: int = 0, *, send: bool = True,
              recv: bool = True) -> tuple[list[torch.Tensor] | None, list]:
        """Send ``tensors`` and receive tensors of their shapes; ``send``/``recv`` False
        leave out that half (the ends of a chain, which is a ring cut open: no buffers
        come back without ``recv``)."""
        tensors = [t.contiguous() for t in tensors]
        bufs = [torch.empty_like(t) for t in tensors] if recv else None
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group, tag) for t in tensors] if send else []
        ops += [dist.P2POp(dist.irecv, b, self.recv_from, self.group, tag) for b in bufs or ()]
        return bufs, (dist.batch_isend_irecv(ops) if ops else [])

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
        x = x.clone(memory_format=torch.contiguous_format)   # ranks' tensors may differ in strides
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_gather_async(x: torch.Tensor, group, size: int) -> tuple[list[torch.Tensor], object | None]:
    """Start an all-gather of x; returns the output list and the work handle."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(size)]
    work = dist.all_gather(out, x, group=group, async_op=True)
    return out, work


def agree_2d(op: str, check: Callable[[], tuple[T, Sequence[Field]]], first: tuple, second: tuple) -> T:
    """:func:`agree` over the ranks of a 2-D mesh, given as its two families of groups.

    ``first`` and ``second`` are (group, size, name) of this rank's group along each mesh
    dimension (ranks in messages are ranks of those groups). The ranks agree along
    ``first``, then along ``second``, where a rank whose first agreement failed rejects
    its input with that error: a failure anywhere reaches every rank of the mesh (a group
    of one dimension meets every group of the other), and ranks that agree along both
    dimensions agree across the mesh. No group spanning the mesh is needed. Collective
    over the mesh; returns what ``check()`` returned first.
    """
    failure: Exception | None = None
    try:
        agree(op, check, first[0], first[1])
    except Exception as exc:  # noqa: BLE001 - shared with the other dimension's ranks, raised on all
        failure = exc

    def second_check():
        if failure is not None:     # the first dimension's message, without repeating op
            raise type(failure)(f"(in its {first[2]!r} group) {str(failure).removeprefix(f'{op}: ')}")
        return check()

    return agree(op, second_check, second[0], second[1])


def reduce_scatter(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's chunk ``rank`` of ``size`` along ``dim``
    (a reduce-scatter, as an all-to-all of the chunks and a local sum: gloo has no
    reduce-scatter; the bytes per rank are the same)."""
    send = torch.stack(x.chunk(size, dim=dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.sum(0)

