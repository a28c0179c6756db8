"""Fused neighborhood attention (FNA) on the shared softmax engine: the host side.

How a call runs:

1. **Dilation groups as sub-problems.** Along an axis of length L with dilation d the
   tokens split into d groups (index mod d) of length ``L // d`` or ``L // d + 1``.
   Groups of equal lengths on every axis form one *class*; each class is one engine
   launch with its groups folded into the head dimension (ordered (group, head), so
   the engine's GQA mapping ``kv_head = head // groups`` stays right). No work is
   spent on the (d - 1) / d pairs that dilation excludes.
2. **Multi-dimensional tiles.** Within a group the tokens are permuted so that every
   tile (e.g. 8x8 in 2-D, 4x4x4 in 3-D; volume 64 or 128) is contiguous; maps that
   are not tile multiples are padded up (padding queries see nothing, padding keys
   are never visible).
3. **Block lists.** Per query tile, the key tiles that intersect the union of its
   queries' neighborhoods, split into *full* tiles (every pair attends: no mask) and
   *partial* ones (token mask), plus the transposed lists for the dK/dV pass. Because
   the neighborhood is a product of per-axis windows, a tile pair's status is the
   minimum of its per-axis statuses, so the lists come from small per-axis tables.
4. **Token mask.** ``attnkit.kernels.neighborhood.neighborhood_mask`` reads per
   permuted query its per-axis window and per permuted key its per-axis coordinate
   from an int32 table.
5. **Mod positions.** Score mods see the original head and flat row-major token
   indices: ``neighborhood_positions`` maps a permuted slot back through the gather table.

Plans (permutation, lists, table) are built once per geometry and device and cached.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..dropout import Dropout
from ..engine import BlockLists, Const, Schedule, dense_to_lists, fused_attention
from ..mods import ScoreMod
from .geometry import AxisParams, dilation_classes, window_bounds

#: Tile volumes tried, with a cost factor for the lower throughput of small tiles (GPU).
_TILE_VOLUMES = {64: 1.25, 128: 1.0}
#: Under Triton's interpreter only 64-token tiles are used (engine blocks 32 x 16 divide them).
_INTERPRETER_VOLUMES = {64: 1.0}
_forced_tile: Optional[Tuple[int, ...]] = None


@contextlib.contextmanager
def force_tile_shape(shape: Sequence[int]) -> Iterator[None]:
    """Use this tile shape (one power of two per spatial axis, volume >= 16) for every
    fused call in the block; tests use it to cover several tilings. The engine's block
    sizes must divide the tile volume (see ``attnkit.kernels.engine.force_config``)."""
    global _forced_tile
    shape = tuple(int(t) for t in shape)
    if any(t < 1 or t & (t - 1) for t in shape) or math.prod(shape) < 16:
        raise ValueError(f"tile shape must be powers of two with a volume >= 16, got {shape}")
    previous, _forced_tile = _forced_tile, shape
    try:
        yield
    finally:
        _forced_tile = previous


# ----------------------------------------------------------------------------- per-axis tiles

def axis_tile_status(group_len: int, kernel: int, causal: bool, stride: int, tile: int) -> torch.Tensor:
    """Status of every (query tile, key tile) pair along one axis: (R, R) int8 with
    R = ceil(group_len / tile); 0 = no query of the tile sees a key of the tile,
    2 = every query sees every key (no padding on either side), 1 = partial."""
    start, end = window_bounds(group_len, kernel, causal, stride)
    R = -(-group_len // tile)
    pad = R * tile - group_len

    def tiles(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.cat([x, x.new_full((pad,), fill)]).view(R, tile)

    big = group_len + 1
    union_lo, union_hi = tiles(start, big).amin(1), tiles(end, -1).amax(1)
    inter_lo, inter_hi = tiles(start, -1).amax(1), tiles(end, big).amin(1)
    t_lo = torch.arange(R) * tile
    t_hi = torch.clamp(t_lo + tile, max=group_len)
    sees_some = (union_lo[:, None] < t_hi[None, :]) & (t_lo[None, :] < union_hi[:, None])
    q_whole = (t_lo + tile <= group_len)[:, None]
    sees_all = q_whole & (inter_lo[:, None] <= t_lo[None, :]) & ((t_lo + tile)[None, :] <= inter_hi[:, None])
    return torch.where(sees_all, 2, torch.where(sees_some, 1, 0)).to(torch.int8)


def _compact(select: torch.Tensor, cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``cols`` where ``select`` holds, moved to the front: counts (R,), index (R, C)."""
    counts, order = dense_to_lists(select)
    index = cols.gather(1, order.long()).to(torch.int32)
    valid = torch.arange(order.shape[1])[None, :] < counts[:, None]
    return counts, torch.where(valid, index, torch.zeros_like(index))


def tile_lists(status: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Block lists from per-axis (rows, cols) status tables of a product geometry.

    Row tile ``ravel(r_0, r_1, ...)`` visits column tile ``ravel(c_0, c_1, ...)`` when
    every axis pair is visited; the pair is full when every axis pair is full.
    Returns full_count (R,), full_index (R, C1), part_count (R,), part_index (R, C2).
    """
    cols = torch.zeros(1, 1, dtype=torch.long)
    st = torch.full((1, 1), 2, dtype=torch.int8)
    for m in status:
        nz = m > 0
        width = max(int(nz.sum(1).max()), 1)
        order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :width]  # visited columns first
        a_st = m.gather(1, order)
        rows = cols.shape[0] * m.shape[0]
        cols = (cols[:, None, :, None] * m.shape[1] + order[None, :, None, :]).reshape(rows, -1)
        st = torch.minimum(st[:, None, :, None], a_st[None, :, None, :]).reshape(rows, -1)
    full_count, full_index = _compact(st == 2, cols)
    part_count, part_index = _compact(st == 1, cols)
    return full_count, full_index, part_count, part_index


def _tile_cost(group_lens: Sequence[int], axes: Sequence[AxisParams], shape: Sequence[int]) -> Tuple[int, int]:
    """(visited token pairs, padded token count) of a tile shape."""
    pairs, padded = 1, 1
    for Lg, axis, t in zip(group_lens, axes, shape):
        pairs *= int((_axis_status(Lg, axis.kernel, axis.causal, axis.stride, t) > 0).sum()) * t * t
        padded *= -(-Lg // t) * t
    return pairs, padded


@functools.lru_cache(maxsize=1024)
def _axis_status(group_len: int, kernel: int, causal: bool, stride: int, tile: int) -> torch.Tensor:
    return axis_tile_status(group_len, kernel, causal, stride, tile)


def choose_tile_shape(group_lens: Sequence[int], axes: Sequence[AxisParams], interpret: bool) -> Tuple[int, ...]:
    """The power-of-two tile shape that minimizes the visited token pairs (weighted by a
    per-volume throughput factor), then the padding; the forced shape if one is set."""
    if _forced_tile is not None:
        if len(_forced_tile) != len(axes):
            raise ValueError(f"forced tile shape {_forced_tile} does not match {len(axes)} spatial axes")
        return _forced_tile
    volumes = _INTERPRETER_VOLUMES if interpret else _TILE_VOLUMES
    best, best_key = None, None
    for volume, factor in volumes.items():
        exp = volume.bit_length() - 1
        for split in itertools.product(range(exp + 1), repeat=len(axes)):
            if sum(split) != exp:
                continue
            shape = tuple(1 << e for e in split)
            pairs, padded = _tile_cost(group_lens, axes, shape)
            key = (pairs * factor, padded, max(shape))
            if best_key is None or key < best_key:
                best, best_key = shape, key
    assert best is not None
    return best


# ----------------------------------------------------------------------------- plans

@dataclass(frozen=True)
class ClassPlan:
    """One launch: the dilation groups of equal lengths, permuted into tiles."""

    groups: int               # dilation groups folded into the head dimension
    tokens: int               # permuted (tile-padded) tokens per group
    gather: torch.Tensor      # (groups, tokens) int64: original flat token of each permuted slot (0 for padding)
    gather32: torch.Tensor    # the same, int32, for the kernel's mod positions
    lists: BlockLists
    table: torch.Tensor       # int32 (3 * ndim, tokens): windows and coordinates (kernels/neighborhood.py)
    tile: Tuple[int, ...]

    def schedule(self, heads: int) -> Schedule:
        from ..kernels import neighborhood as kernels

        return Schedule(mask=kernels.neighborhood_mask, lists=self.lists, positions=kernels.neighborhood_positions,
                        args=(self.table, self.tokens, Const(self.table.shape[0] // 3), self.gather32, heads))


@dataclass(frozen=True)
class Plan:
    classes: Tuple[ClassPlan, ...]
    scatter: torch.Tensor     # (N,) int64: row of each original token in the concatenated class outputs


def _unravel(index: torch.Tensor, shape: Sequence[int]) -> List[torch.Tensor]:
    coords = []
    for size in reversed(shape):
        coords.append(index % size)
        index = index // size
    return coords[::-1]


def _class_plan(spatial: Sequence[int], axes: Sequence[AxisParams], group_lens: Sequence[int],
                group_ids: Sequence[Sequence[int]], interpret: bool, device: torch.device
                ) -> Tuple[ClassPlan, torch.Tensor, torch.Tensor]:
    ndim = len(axes)
    tile = choose_tile_shape(group_lens, axes, interpret)
    grid = [-(-Lg // t) for Lg, t in zip(group_lens, tile)]
    volume = math.prod(tile)
    tokens = math.prod(grid) * volume
    n = torch.arange(tokens)
    tile_crd = _unravel(n // volume, grid)
    off_crd = _unravel(n % volume, tile)
    coord = [tc * t + oc for tc, t, oc in zip(tile_crd, tile, off_crd)]  # per axis, within the group
    real = torch.ones(tokens, dtype=torch.bool)
    for c, Lg in zip(coord, group_lens):
        real &= c < Lg

    table = torch.zeros(3 * ndim, tokens, dtype=torch.int32)
    for a, (axis, Lg) in enumerate(zip(axes, group_lens)):
        start, end = window_bounds(Lg, axis.kernel, axis.causal, axis.stride)
        safe = torch.clamp(coord[a], max=Lg - 1)
        table[2 * a] = torch.where(real, start[safe], 0).to(torch.int32)
        table[2 * a + 1] = torch.where(real, end[safe], 0).to(torch.int32)
        table[2 * ndim + a] = coord[a].to(torch.int32)

    status = [_axis_status(Lg, ax.kernel, ax.causal, ax.stride, t) for Lg, ax, t in zip(group_lens, axes, tile)]
    kv = tile_lists(status)
    qt = tile_lists([m.t().contiguous() for m in status])

    def dev(x: torch.Tensor) -> torch.Tensor:
        return x.to(device)[None, None].contiguous()

    lists = BlockLists(volume, volume, *(dev(x) for x in kv), *(dev(x) for x in qt))

    # original flat index of every (group, permuted slot)
    combos = list(itertools.product(*group_ids))
    gather = torch.zeros(len(combos), tokens, dtype=torch.long)
    for gi, combo in enumerate(combos):
        flat = torch.zeros(tokens, dtype=torch.long)
        for a, (axis, g) in enumerate(zip(axes, combo)):
            flat = flat * spatial[a] + coord[a] * axis.dilation + g
        gather[gi] = torch.where(real, flat, 0)
    plan = ClassPlan(len(combos), tokens, gather.to(device), gather.to(torch.int32).to(device).contiguous(), lists,
                     table.to(device).contiguous(), tile)
    return plan, gather, real


@functools.lru_cache(maxsize=64)
def _build_plan(spatial: Tuple[int, ...], axes: Tuple[AxisParams, ...], forced: Optional[Tuple[int, ...]],
                interpret: bool, device: str) -> Plan:
    dev = torch.device(device)
    N = math.prod(spatial)
    scatter = torch.full((N,), -1, dtype=torch.long)
    classes = []
    offset = 0
    for buckets in itertools.product(*(dilation_classes(a) for a in axes)):
        group_lens = [Lg for Lg, _ in buckets]
        group_ids = [ids for _, ids in buckets]
        plan, gather, real = _class_plan(spatial, axes, group_lens, group_ids, interpret, dev)
        rows = offset + torch.arange(plan.groups * plan.tokens).view(plan.groups, plan.tokens)
        scatter[gather[:, real]] = rows[:, real]
        offset += plan.groups * plan.tokens
        classes.append(plan)
    assert int(scatter.min()) >= 0, "every token belongs to exactly one dilation group"
    return Plan(tuple(classes), scatter.to(dev))


def get_plan(spatial: Sequence[int], axes: Sequence[AxisParams], device: torch.device) -> Plan:
    """The cached launch plan of a geometry on a device."""
    from ..dispatch import interpreter_enabled

    return _build_plan(tuple(spatial), tuple(axes), _forced_tile, interpreter_enabled() and device.type == "cpu",
                       str(device))


# ----------------------------------------------------------------------------- the call

def _to_groups(x: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, G * H, T, D): the permuted tokens of each group, groups outer."""
    if gather.shape[0] == 1:
        return x.index_select(2, gather[0])
    B, H = x.shape[:2]
    return x[:, :, gather].transpose(1, 2).reshape(B, gather.shape[0] * H, gather.shape[1], *x.shape[3:])


def _from_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, G * H, T, ...) -> (B, H, G * T, ...)."""
    if groups == 1:
        return x
    B, GH, T = x.shape[:3]
    H = GH // groups
    return x.view(B, groups, H, T, *x.shape[3:]).transpose(1, 2).reshape(B, H, groups * T, *x.shape[3:])


def fused_neighborhood(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, axes: Sequence[AxisParams],
                       sm_scale: float, score_mod: Optional[ScoreMod] = None,
                       dropout: Dropout | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, *spatial, D), k (B, Hkv, *spatial, D), v (B, Hkv, *spatial, Dv) ->
    out (B, Hq, *spatial, Dv) and lse (B, Hq, *spatial) float32; differentiable in q, k, v
    (and in the score mod's learnable tensors). ``score_mod`` is already specialized.
    ``dropout``: one key for every launch; its mask is keyed by the positions mods see
    (original head, flat token indices), so every dilation class draws its own pairs."""
    spatial = tuple(q.shape[2:-1])
    B, Hq, Hkv, D, Dv = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    N = math.prod(spatial)
    plan = get_plan(spatial, axes, q.device)
    qf, kf, vf = q.reshape(B, Hq, N, D), k.reshape(B, Hkv, N, D), v.reshape(B, Hkv, N, Dv)
    outs, lses = [], []
    for cls in plan.classes:
        o, l = fused_attention(_to_groups(qf, cls.gather), _to_groups(kf, cls.gather), _to_groups(vf, cls.gather),
                               cls.schedule(Hq), sm_scale=sm_scale, score_mod=score_mod, dropout=dropout)
        outs.append(_from_groups(o, cls.groups))
        lses.append(_from_groups(l, cls.groups))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    out = out.index_select(2, plan.scatter).reshape(B, Hq, *spatial, Dv)
    lse = lse.index_select(2, plan.scatter).reshape(B, Hq, *spatial)
    return out, lse
