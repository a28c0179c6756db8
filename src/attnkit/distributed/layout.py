"""Sequence layouts: which tokens of a length-N sequence each of W ranks holds.

* ``contiguous`` - rank r holds chunk r of W: tokens [r N/W, (r + 1) N/W).
* ``zigzag``     - the sequence is cut into 2W chunks; rank r holds chunks r and
  2W - 1 - r (in that order). Under a causal mask every rank then does the same work.
* ``striped``    - token i is on rank i mod W (Striped Attention); rank r holds
  tokens r, r + W, r + 2W, ... Also balanced under a causal mask.

A rank's tokens are always kept in increasing position order, so a causal mask
between two shards is a (shifted) triangle: :func:`block_plan` gives each pair of
shards the rectangle of (query rows, key rows) that needs computing and whether it
is masked, which is how ring attention skips and balances causal work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..checks import Shapes, check_qkv
from ._comm import Field, agree, agree_2d, input_fields, world

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: object) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def pieces(layout: str, world_size: int) -> int:
    """How many equal pieces the layout cuts a sequence into (the length must divide)."""
    return 2 * world_size if layout == "zigzag" else world_size


def check_shards(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Shapes:
    """``check_qkv`` plus the rule of every sequence-parallel scheme: q and k/v are shards of
    the same tokens (Nq == Nk per rank). ``op`` names the scheme in the error."""
    shapes = check_qkv(q, k, v)
    if shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"{op} needs q and k/v shards of the same tokens (Nq == Nk per rank), got "
                         f"{shapes.seqlen_q} and {shapes.seqlen_k}")
    return shapes


def check_length(total: int, layout: str, world_size: int, name: str = "the sequence length") -> int:
    """Raise a ValueError unless ``layout`` can split ``total`` tokens over ``world_size`` ranks."""
    need = pieces(layout, world_size)
    if total % need != 0:
        what = {"contiguous": f"{world_size} equal chunks", "striped": f"{world_size} equal stripes",
                "zigzag": f"2W = {need} equal chunks"}[layout]
        raise ValueError(f"{name} {total} cannot take layout {layout!r} on {world_size} ranks: it must split "
                         f"into {what}, i.e. be a multiple of {need}")
    return total // world_size


def positions(layout: str, rank: int, world_size: int, total: int, device=None) -> torch.Tensor:
    """Global positions (int64, increasing) of the ``total // world_size`` tokens rank ``rank`` holds."""
    check_layout(layout)
    local = check_length(total, layout, world_size)
    if layout == "contiguous":
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    if layout == "striped":
        return torch.arange(rank, total, world_size, device=device)
    c = local // 2
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world_size - 1 - rank) * c, (2 * world_size - rank) * c, device=device)
    return torch.cat([first, second])


MESH_DIMS = ("ulysses", "ring")


class MeshGroups(NamedTuple):
    """This rank's place on a USP mesh: its group, rank and size along each dimension."""

    ulysses_group: object
    ulysses_rank: int
    ulysses_size: int
    ring_group: object
    ring_rank: int
    ring_size: int


def is_mesh(x: object) -> bool:
    """Whether ``x`` is a torch.distributed DeviceMesh (False where torch lacks them)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:         # a torch built without distributed support
        return False
    return isinstance(x, DeviceMesh)


def mesh_groups(mesh: object, name: str = "mesh") -> MeshGroups:
    """The groups of a 2-D DeviceMesh whose dimensions are named "ulysses" and "ring"
    (in either order: put "ulysses" on the fast links, e.g. the GPUs of one node).

    Raises TypeError/ValueError naming ``name`` otherwise. A mesh is built collectively
    and is the same on every rank, so every rank raises the same error without talking.
    """
    wanted = f"a 2-D torch.distributed.device_mesh.DeviceMesh with dimensions named {MESH_DIMS}"
    if not is_mesh(mesh):
        raise TypeError(f"{name} must be {wanted}, got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim != 2 or sorted(names) != sorted(MESH_DIMS):
        raise ValueError(f"{name} must be {wanted} (in either order), got a {mesh.ndim}-D mesh with dimension "
                         f"names {mesh.mesh_dim_names}")
    sizes = dict(zip(names, mesh.mesh.shape))
    return MeshGroups(mesh.get_group("ulysses"), mesh.get_local_rank("ulysses"), int(sizes["ulysses"]),
                      mesh.get_group("ring"), mesh.get_local_rank("ring"), int(sizes["ring"]))


def check_mesh_length(total: int, layout: str, mesh: MeshGroups, name: str = "the sequence length") -> int:
    """Raise a ValueError unless ``total`` tokens split over the mesh: ``layout`` over the
    ring dimension, then equal contiguous parts over the Ulysses dimension. Returns the
    tokens per rank."""
    need = math.lcm(pieces(layout, mesh.ring_size), mesh.ring_size * mesh.ulysses_size)
    if total % need != 0:
        raise ValueError(f"{name} {total} cannot take layout {layout!r} on a {mesh.ulysses_size} x "
                         f"{mesh.ring_size} (ulysses x ring) mesh: each ring shard must split into "
                         f"{mesh.ulysses_size} equal parts, i.e. the length must be a multiple of {need}")
    return total // (mesh.ring_size * mesh.ulysses_size)


def mesh_positions(layout: str, mesh: MeshGroups, total: int, device=None) -> torch.Tensor:
    """Global positions (increasing) of the tokens this rank holds on a USP mesh: its ring
    rank's shard of ``layout`` over the ring dimension, cut into equal contiguous parts,
    of which it holds part ``ulysses_rank`` (so Ulysses' all-to-all over the parts gives
    back the ring shard, in order)."""
    check_layout(layout)
    local = check_mesh_length(total, layout, mesh)
    ring = positions(layout, mesh.ring_rank, mesh.ring_size, total, device)
    return ring[mesh.ulysses_rank * local:(mesh.ulysses_rank + 1) * local]


def _check_dim(x: object, dim: object, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for {name} of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, *, layout: str, group=None, dim: int = 2) -> torch.Tensor:
    """This rank's shard of a whole sequence.

    Args:
        x: the whole tensor, the same on every rank, e.g. (B, H, N, D) with the sequence
            along ``dim`` (default 2).
        layout: "contiguous", "zigzag" or "striped" (see the module docstring).
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank), or a 2-D DeviceMesh with dimensions "ulysses" and
            "ring" (:func:`usp_attention`'s layout: ``layout`` over the ring dimension,
            each ring shard cut into equal contiguous parts over the Ulysses dimension).
        dim: the sequence dimension.

    Returns:
        (..., N / W, ...): the tokens this rank holds, in increasing position order
        (W: the number of ranks of the group or mesh).
        Differentiable: the gradient is scattered back to those positions (this rank's
        share of the gradient of the replicated input).
    """
    dim = _check_dim(x, dim, "x")
    check_layout(layout)
    if is_mesh(group):          # USP: layout over "ring", contiguous parts over "ulysses"
        return x.index_select(dim, mesh_positions(layout, mesh_groups(group, "group"), x.shape[dim], x.device))
    rank, size = world(group)
    return x.index_select(dim, positions(layout, rank, size, x.shape[dim], x.device))


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, layout, group, dim, rank, size):
        local = x_local.shape[dim]
        gathered = [torch.empty_like(x_local) for _ in range(size)]
        dist.all_gather(gathered, x_local.contiguous(), group=group)
        order = torch.cat([positions(layout, r, size, local * size, x_local.device) for r in range(size)])
        ctx.args = (layout, dim, rank, size)
        return torch.cat(gathered, dim=dim).index_select(dim, torch.argsort(order))

    @staticmethod
    def backward(ctx, grad):
        layout, dim, rank, size = ctx.args
        idx = positions(layout, rank, size, grad.shape[dim], grad.device)
        return grad.index_select(dim, idx), None, None, None, None, None


def unshard_sequence(x_local: torch.Tensor, *, layout: str, group=None, dim: int = 2) -> torch.Tensor:
    """The whole sequence, in the original order, from every rank's shard (one all-gather).

    Args:
        x_local: this rank's shard, e.g. (B, H, N / W, D); every rank's shard must have
            the same shape and dtype, and every rank the same layout and dim (checked
            before the all-gather: the same ValueError/TypeError on every rank otherwise,
            also when one rank's arguments are invalid).
        layout, group, dim: as for :func:`shard_sequence` (``group`` may be a USP mesh).

    Returns:
        (..., N, ...), the same on every rank. Differentiable: the result is treated as
        one replicated value (compute the same loss from it on every rank); the
        gradient of this rank's shard is the gradient at its positions.
    """
    if is_mesh(group):
        return _unshard_mesh(x_local, layout, mesh_groups(group, "group"), dim)
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        d = _check_dim(x_local, dim, "x_local")
        check_layout(layout)
        if size > 1:            # one rank: the shard is the whole sequence, whatever its length
            check_length(x_local.shape[d] * size, layout, size)
        fields = input_fields("the shape of x_local", x_local.shape, "x_local", x_local)
        return d, [*fields, Field("layout", layout), Field("dim", d)]

    dim = agree("unshard_sequence", check, group, size)
    if size == 1:
        return x_local
    return _Unshard.apply(x_local, layout, group, dim, rank, size)


def _unshard_mesh(x_local: torch.Tensor, layout: str, mesh: MeshGroups, dim: int) -> torch.Tensor:
    """unshard_sequence on a USP mesh: the Ulysses parts back into ring shards, then the
    ring shards back into the sequence (two all-gathers, the inverse of mesh_positions)."""
    def check():                # agree_2d() makes every rank of the mesh raise if one fails
        d = _check_dim(x_local, dim, "x_local")
        check_layout(layout)
        check_mesh_length(x_local.shape[d] * mesh.ulysses_size * mesh.ring_size, layout, mesh)
        fields = input_fields("the shape of x_local", x_local.shape, "x_local", x_local)
        return d, [*fields, Field("layout", layout), Field("dim", d)]

    dim = agree_2d("unshard_sequence", check, (mesh.ulysses_group, mesh.ulysses_size, "ulysses"),
                   (mesh.ring_group, mesh.ring_size, "ring"))
    x = x_local
    if mesh.ulysses_size > 1:
        x = _Unshard.apply(x, "contiguous", mesh.ulysses_group, dim, mesh.ulysses_rank, mesh.ulysses_size)
    if mesh.ring_size > 1:
        x = _Unshard.apply(x, layout, mesh.ring_group, dim, mesh.ring_rank, mesh.ring_size)
    return x


class Block(NamedTuple):
    """Rows [q_lo, q_hi) of the query shard against rows [k_lo, k_hi) of a key shard;
    ``causal``: the two row ranges have equal length and a lower triangle applies."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool


def block_plan(layout: str, rank: int, source: int, local: int, causal: bool) -> list[Block]:
    """The work between the query shard of ``rank`` and the key shard of ``source``.

    Each shard has ``local`` tokens in increasing position order; with ``causal``
    query position p sees key positions <= p. Returns the blocks to compute (an
    empty list when no query of the shard sees any key of the other).

    * contiguous: source < rank full, source == rank a triangle, source > rank nothing
      (rank W - 1 works W times as much as rank 0).
    * zigzag: source == rank a triangle; source < rank all queries x the first key
      chunk; source > rank the second query chunk x all keys: half a block each.
    * striped: source <= rank a triangle (diagonal included); source > rank the
      strict triangle, i.e. queries 1.. against keys ..L-2 with the diagonal.
    """
    full = [Block(0, local, 0, local, False)]
    if not causal:
        return full
    diag = [Block(0, local, 0, local, True)]
    if layout == "contiguous":
        return full if source < rank else diag if source == rank else []
    if layout == "zigzag":
        half = local // 2
        if source == rank:
            return diag
        return [Block(0, local, 0, half, False)] if source < rank else [Block(half, local, 0, local, False)]
    # striped
    if source <= rank:
        return diag
    return [Block(1, local, 0, local - 1, True)] if local > 1 else []
