"""The torch backend of neighborhood attention: each query tile against its halo, batched.

A neighborhood is a product of per-axis windows (:mod:`.geometry`), and the windows of a
run of consecutive positions along an axis (within a dilation group) cover one
contiguous range: the tile's *halo*. So per axis, per dilation group and per tile of T
positions there is one key range of K <= T + kernel + stride - 2 positions (shifted
inwards at the borders so that every halo has the same K), and the tokens a query tile
may see are the product of its axes' halos. The query tiles go to the batch dimension:
one call of the CPU flash kernel over (B * tiles, H, prod(T), D) queries and their
gathered (B * tiles, Hkv, prod(K), D) halos, under the product of the per-axis window
masks. Work and memory are O(N * prod(K)), never O(N^2); dilation costs nothing extra
(the groups are separate tiles). Score mods and dropout run on the same blocks with
explicit scores and the flat row-major positions the reference gives them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .._reference import lse_dtype
from ..checks import check_scale
from ..dropout import Dropout
from ..mods import ScoreMod
from ..torch_backend import masked_attention
from .geometry import AxisParams, group_length, normalize, window_bounds
from .reference import neighborhood_score_mod

#: query positions per axis per tile, at least (besides the kernel size): more queries per
#: tile make larger matrix products, fewer make smaller halos (less masked work)
_MIN_TILE = {1: 32, 2: 8, 3: 4}


class _AxisTiles(NamedTuple):
    """One axis cut into tiles: slots are (group g, tile t, position r) with index
    (t * T + r) * d + g; ``keys`` (d, nT, K) halo positions within each group, ``mask``
    (d, nT, T, K) whether position r of tile t sees halo key k, ``q_index`` (d, nT, T) and
    ``k_index`` (d, nT, K) original indices clamped into the axis (for mod positions)."""

    tiles: int
    tile: int
    halo: int
    keys: torch.Tensor
    mask: torch.Tensor
    q_index: torch.Tensor
    k_index: torch.Tensor


def _axis_tiles(axis: AxisParams, ndim: int, device: torch.device) -> _AxisTiles:
    L, k, d = axis.length, axis.kernel, axis.dilation
    P = -(-L // d)                                     # the longest group
    T = min(P, max(k, _MIN_TILE[ndim]))
    nT = -(-P // T)
    starts, ends = [], []
    for g in range(d):  # per group, per slot: its window [start, end) (empty for padding slots)
        s, e = window_bounds(group_length(L, d, g), k, axis.causal, axis.stride, device)
        pad = nT * T - s.shape[0]
        starts.append(torch.cat([s, s.new_zeros(pad)]))
        ends.append(torch.cat([e, e.new_zeros(pad)]))
    start = torch.stack(starts).view(d, nT, T)
    end = torch.stack(ends).view(d, nT, T)
    real = end > start
    lo = torch.where(real, start, P).amin(dim=-1)      # (d, nT): the halo's first key
    hi = torch.where(real, end, 0).amax(dim=-1)
    K = max(1, min(P, int((hi - lo).clamp(min=0).max())))
    lo = torch.minimum(lo, torch.tensor(P - K, device=device)).clamp(min=0)
    keys = lo[:, :, None] + torch.arange(K, device=device)                     # (d, nT, K)
    mask = (keys[:, :, None, :] >= start[..., None]) & (keys[:, :, None, :] < end[..., None])
    group = torch.arange(d, device=device).view(d, 1, 1)
    q_pos = (torch.arange(nT * T, device=device).view(1, nT, T)) * d + group
    return _AxisTiles(nT, T, K, keys, mask, q_pos.clamp(max=L - 1), (keys * d + group).clamp(max=L - 1))


def _broadcast(x: torch.Tensor, a: int, ndim: int, groups: int) -> torch.Tensor:
    """Axis ``a``'s table x, of dims (d, nT, ...), shaped for a layout of ``groups`` groups of
    ``ndim`` dims each, (d..., nT..., ...): dim j of x goes to position j * ndim + a, the
    other dims are 1 (the tables of all axes then broadcast into their product)."""
    shape = [1] * (groups * ndim)
    for j, size in enumerate(x.shape):
        shape[j * ndim + a] = size
    return x.reshape(shape)


class _Plan(NamedTuple):
    """What a geometry's calls share: the axes' tiles, the halo index per axis (see
    ``neighborhood_torch``), the mask (tiles, 1, prod(T), prod(K)) and the flat row-major
    positions mods see, of the tiles' queries (tiles, prod(T)) and halo keys (tiles, prod(K))."""

    tiles: list[_AxisTiles]
    index: list[torch.Tensor]
    mask: torch.Tensor
    q_idx: torch.Tensor
    k_idx: torch.Tensor


def _make_plan(axes: tuple[AxisParams, ...], device: torch.device) -> _Plan:
    n = len(axes)
    tiles = [_axis_tiles(a, n, device) for a in axes]
    count = math.prod(a.dilation for a in axes) * math.prod(t.tiles for t in tiles)
    mask = None
    for a, t in enumerate(tiles):
        m = _broadcast(t.mask, a, n, 4)                       # (d..., nT..., T..., K...)
        mask = m if mask is None else mask & m
    strides = [math.prod(ax.length for ax in axes[a + 1:]) for a in range(n)]
    q_idx = sum(_broadcast(t.q_index, a, n, 3) * strides[a] for a, t in enumerate(tiles))
    k_idx = sum(_broadcast(t.k_index, a, n, 3) * strides[a] for a, t in enumerate(tiles))
    return _Plan(tiles, [_broadcast(t.k_index, a, n, 3) for a, t in enumerate(tiles)],
                 mask.reshape(count, 1, math.prod(t.tile for t in tiles), math.prod(t.halo for t in tiles)),
                 q_idx.reshape(count, -1), k_idx.reshape(count, -1))


@functools.lru_cache(maxsize=32)
def _cached_plan(axes: tuple[AxisParams, ...], device: str) -> _Plan:
    return _make_plan(axes, torch.device(device))


def _plan(axes: tuple[AxisParams, ...], device: torch.device) -> _Plan:
    """The plan of a geometry: cached when eager (a model calls one geometry in every layer);
    under torch.compile built in the graph, as the reference's neighbour table."""
    if torch.compiler.is_compiling():
        return _make_plan(axes, device)
    return _cached_plan(axes, str(device))


def neighborhood_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                       causal: bool | Sequence[bool] = False, stride: int | Sequence[int] = 1,
                       scale: float | None = None, score_mod: ScoreMod | None = None,
                       dropout_p: float = 0.0, return_lse: bool = False):
    """The torch backend of :func:`attnkit.neighborhood_attention` (same arguments and semantics
    as :func:`neighborhood_reference`), computed in the inputs' dtype.

    q (B, Hq, *spatial, D), k (B, Hkv, *spatial, D), v (B, Hkv, *spatial, Dv) ->
    out (B, Hq, *spatial, Dv) [, lse (B, Hq, *spatial) float32 (float64 for float64 inputs)].
    """
    dropout = Dropout.draw(dropout_p, q.device)
    spatial = tuple(q.shape[2:-1])
    n = len(spatial)
    axes = normalize(spatial, kernel_size, dilation, causal, stride)
    score_mod = neighborhood_score_mod(q, k, axes, score_mod)
    sm_scale = check_scale(scale, q.shape[-1])
    B, Hq, Hkv, D, Dv = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    device = q.device
    plan = _plan(axes, device)
    tiles = plan.tiles
    dil = [a.dilation for a in axes]
    nT = [t.tiles for t in tiles]
    T = [t.tile for t in tiles]
    K = [t.halo for t in tiles]
    count = math.prod(dil) * math.prod(nT)               # tiles of the whole map, per batch entry
    padded = [d * t * s for d, t, s in zip(dil, nT, T)]

    def pad(x: torch.Tensor) -> torch.Tensor:
        widths = []
        for length, full in zip(reversed(spatial), reversed(padded)):
            widths += [0, full - length]
        return torch.nn.functional.pad(x, [0, 0] + widths) if any(widths) else x

    # queries: (B, H, [nT, T, d] per axis, D) -> (B * tiles, H, prod(T), D), tiles ordered (d..., nT...)
    split = [s for a in range(n) for s in (nT[a], T[a], dil[a])]
    qt = pad(q).view(B, Hq, *split, D)
    qt = qt.permute(0, *[3 * a + 4 for a in range(n)], *[3 * a + 2 for a in range(n)], 1,
                    *[3 * a + 3 for a in range(n)], 3 * n + 2).reshape(B * count, Hq, math.prod(T), D)

    # halos: gathered heads-last, so that every gathered token is one contiguous (Hkv, w) row:
    # (B, *spatial, Hkv, w)[:, index...] -> (B, d..., nT..., K..., Hkv, w), then a view with the
    # heads second (the flash kernel reads strides). Indices are original ones clamped into the
    # map: slots that hold no key of the halo are masked.
    index = plan.index

    def halos(x: torch.Tensor) -> torch.Tensor:
        g = x.movedim(1, -2).contiguous()[(slice(None), *index)]
        return g.reshape(B * count, math.prod(K), Hkv, x.shape[-1]).transpose(1, 2)

    mask = plan.mask.repeat(B, 1, 1, 1) if B > 1 else plan.mask
    positions = None
    if score_mod is not None or dropout is not None:
        b = torch.arange(B, device=device).repeat_interleave(count).view(-1, 1, 1, 1)
        positions = (b, torch.arange(Hq, device=device).view(1, -1, 1, 1),
                     plan.q_idx.repeat(B, 1).view(B * count, 1, -1, 1),
                     plan.k_idx.repeat(B, 1).view(B * count, 1, 1, -1))

    out, lse = masked_attention(qt, halos(k), halos(v), mask, scale=sm_scale, score_mod=score_mod,
                                dropout=dropout, positions=positions)

    def untile(x: torch.Tensor, tail: Sequence[int]) -> torch.Tensor:
        # (B * tiles, H, prod(T), *tail) -> (B, H, *spatial, *tail)
        x = x.reshape(B, *dil, *nT, Hq, *T, *tail)
        order = [0, 2 * n + 1] + [p for a in range(n) for p in (1 + n + a, 2 * n + 2 + a, 1 + a)]
        x = x.permute(*order, *range(3 * n + 2, 3 * n + 2 + len(tail))).reshape(B, Hq, *padded, *tail)
        return x[(slice(None), slice(None), *[slice(0, s) for s in spatial])]

    out = untile(out, [Dv])
    lse = untile(lse.to(lse_dtype(q)), [])
    return (out, lse) if return_lse else out
