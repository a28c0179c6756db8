"""Geometry of neighborhood attention, shared by the reference and the fused kernel.

Everything here is per spatial axis: NATTEN's semantics make the multi-axis
neighborhood the product of per-axis windows, and each axis' window depends only
on the query's coordinate along that axis. An axis of length ``L`` with dilation
``d`` splits into ``d`` dilation groups (index mod d); the query at index ``i``
sits at position ``p = i // d`` of its group, of length ``L_g = ceil((L - g) / d)``.

Window of position ``p`` in a group of length ``L_g`` (kernel ``k``, stride ``s``):

* non-causal: the stride group's leader is ``c = min((p // s) * s + s // 2, L_g - 1)``
  (the centre query; the right one of the middle pair for even ``s``); the window
  centre is ``c`` clamped to ``[k // 2, L_g - 1 - (k // 2 + k % 2 - 1)]`` and the
  window is the ``k`` positions ``[centre - k // 2, centre - k // 2 + k)``;
* causal: the leader is the last query of the stride group,
  ``c = min((p // s) * s + s - 1, L_g - 1)``, and the window is
  ``[max(c - k + 1, 0), p + 1)``: at most ``k`` keys, never one after ``p``.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch

from ..checks import check_flag, check_int

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]


class AxisParams(NamedTuple):
    """Neighborhood parameters of one spatial axis."""

    length: int
    kernel: int
    dilation: int
    causal: bool
    stride: int


def _per_axis(name: str, value: object, ndim: int) -> Tuple[object, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name} must be one value or a tuple of {ndim} (one per spatial axis), "
                             f"got {len(value)} values: {tuple(value)}")
        return tuple(value)
    return (value,) * ndim


def check_axis_options(kernel_size: IntOrTuple, dilation: IntOrTuple, causal: BoolOrTuple, stride: IntOrTuple,
                       ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...], tuple[int, ...]]:
    """The checks of the options that do not depend on the input (modules run them when built):
    one value or ``ndim`` per option, ints >= 1, bools, ``stride <= kernel_size``. Returns the
    per-axis tuples (kernel_size, dilation, causal, stride); raises TypeError/ValueError naming
    the option."""
    ks = tuple(check_int("kernel_size", x, minimum=1) for x in _per_axis("kernel_size", kernel_size, ndim))
    ds = tuple(check_int("dilation", x, minimum=1) for x in _per_axis("dilation", dilation, ndim))
    cs = tuple(check_flag("causal", x) for x in _per_axis("causal", causal, ndim))
    ss = tuple(check_int("stride", x, minimum=1) for x in _per_axis("stride", stride, ndim))
    for a, (k, s) in enumerate(zip(ks, ss)):
        if s > k:
            raise ValueError(f"stride must be <= kernel_size on every spatial axis; axis {a} has stride={s} > "
                             f"kernel_size={k}")
    return ks, ds, cs, ss


def normalize(spatial: Sequence[int], kernel_size: IntOrTuple, dilation: IntOrTuple, causal: BoolOrTuple,
              stride: IntOrTuple) -> Tuple[AxisParams, ...]:
    """Check the options against the spatial sizes and expand them per axis.

    Raises TypeError for a wrong type and ValueError (naming the argument) for
    ``kernel_size < 1``, ``kernel_size * dilation > axis length``,
    ``stride > kernel_size`` or a tuple whose length is not the spatial rank.
    """
    ks, ds, cs, ss = check_axis_options(kernel_size, dilation, causal, stride, len(spatial))
    axes = []
    for a, (L, k, d, c, s) in enumerate(zip(spatial, ks, ds, cs, ss)):
        if L and k * d > L:  # an empty axis has no query to place a window around (an empty problem)
            raise ValueError(f"kernel_size * dilation must be <= the axis length on every spatial axis; axis {a} "
                             f"has length {L} but kernel_size={k} and dilation={d} ({k} * {d} = {k * d})")
        axes.append(AxisParams(int(L), k, d, c, s))
    return tuple(axes)


def group_length(length: int, dilation: int, group: int) -> int:
    """Length of dilation group ``group`` (indices ``group, group + d, ...`` below ``length``)."""
    return (length - group + dilation - 1) // dilation


def window_bounds(group_len: int, kernel: int, causal: bool, stride: int,
                  device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Per position p in [0, group_len): the window [start, end) of keys along the axis (int64)."""
    p = torch.arange(group_len, device=device)
    if causal:
        leader = torch.clamp((p // stride) * stride + stride - 1, max=group_len - 1)
        return torch.clamp(leader - kernel + 1, min=0), p + 1
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    leader = torch.clamp((p // stride) * stride + stride // 2, max=group_len - 1)
    centre = torch.clamp(leader, min=left, max=group_len - 1 - right)
    start = centre - left
    return start, start + kernel


def axis_neighbors(axis: AxisParams, device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``kernel`` neighbour slots of every index along one axis, in original indices.

    Returns idx (L, k) int64 and valid (L, k) bool: slot m of index i is the key at
    position ``start + m`` of i's dilation group, valid when it lies in the window
    (always, except near the start of a causal axis or for a causal stride group's
    earlier queries). Invalid slots hold index 0.
    """
    L, k, d = axis.length, axis.kernel, axis.dilation
    idx = torch.zeros(L, k, dtype=torch.long, device=device)
    valid = torch.zeros(L, k, dtype=torch.bool, device=device)
    slots = torch.arange(k, device=device)
    for g in range(d):
        Lg = group_length(L, d, g)
        start, end = window_bounds(Lg, k, axis.causal, axis.stride, device)
        pos = start[:, None] + slots[None, :]  # a window never holds more than k positions
        ok = pos < end[:, None]
        rows = torch.arange(Lg, device=device) * d + g
        idx[rows] = torch.where(ok, pos * d + g, torch.zeros_like(pos))
        valid[rows] = ok
    return idx, valid


def neighbor_table(axes: Sequence[AxisParams], device: Union[str, torch.device] = "cpu"
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat neighbour indices of every token: idx (N, K) int64 and valid (N, K) bool,
    N = prod(lengths), K = prod(kernel sizes), tokens and slots in row-major order."""
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    valid = torch.ones(1, 1, dtype=torch.bool, device=device)
    for axis in axes:
        a_idx, a_valid = axis_neighbors(axis, device)
        # (N, K) x (L, k) -> (N * L, K * k): row-major over (previous axes, this axis)
        n, kk = idx.shape[0] * axis.length, idx.shape[1] * axis.kernel  # explicit: N may be 0
        idx = (idx[:, None, :, None] * axis.length + a_idx[None, :, None, :]).reshape(n, kk)
        valid = (valid[:, None, :, None] & a_valid[None, :, None, :]).reshape(n, kk)
    return idx, valid


def dilation_classes(axis: AxisParams) -> List[Tuple[int, List[int]]]:
    """Dilation groups of one axis bucketed by length: [(group length, [group ids])].

    With ``L % d == r`` the first r groups have length ``L // d + 1`` and the others
    ``L // d``, so there are at most two buckets per axis."""
    buckets: dict = {}
    for g in range(axis.dilation):
        buckets.setdefault(group_length(axis.length, axis.dilation, g), []).append(g)
    return sorted(buckets.items(), key=lambda kv: -kv[0])


def visited_pairs(axes: Sequence[AxisParams]) -> int:
    """Number of (query, key) pairs the neighborhoods contain (the work of the variant)."""
    total = 1
    for axis in axes:
        count = 0
        for g in range(axis.dilation):
            start, end = window_bounds(group_length(axis.length, axis.dilation, g), axis.kernel, axis.causal,
                                       axis.stride)
            count += int((end - start).sum())
        total *= count
    return total


def spatial_numel(axes: Sequence[AxisParams]) -> int:
    return math.prod(a.length for a in axes)
