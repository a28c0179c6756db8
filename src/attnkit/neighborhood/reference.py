"""PyTorch reference of neighborhood attention: gather the neighbours, then softmax.

Every query gathers the ``K = prod(kernel_size)`` key/value slots of its
neighborhood (index tables from :mod:`.geometry`), so memory is O(N * K * D) per
query chunk and never N x N.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .._reference import (
    bind_score_mod,
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    mod_positions,
    query_chunk_rows,
    softmax_attend,
)
from ..checks import check_scale
from ..dropout import Dropout, bind_dropout
from ..mods import Problem, ScoreMod
from ..mods.core import check_score_mod
from .geometry import AxisParams, neighbor_table, normalize


def neighborhood_score_mod(q: torch.Tensor, k: torch.Tensor, axes: Sequence[AxisParams],
                           score_mod: Optional[ScoreMod]) -> Optional[ScoreMod]:
    """``score_mod`` checked and specialized to the call's geometry (None stays None)."""
    if score_mod is None:
        return None
    problem = Problem.of("neighborhood", q, k, spatial=tuple(a.length for a in axes),
                         dilation=tuple(a.dilation for a in axes), kernel_size=tuple(a.kernel for a in axes),
                         stride=tuple(a.stride for a in axes))
    return check_score_mod("score_mod", score_mod, problem)


@functools.lru_cache(maxsize=32)
def _cached_table(axes: Tuple[AxisParams, ...], device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return neighbor_table(axes, device)


def _table(axes: tuple[AxisParams, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbour table of a geometry: cached when eager; under torch.compile it is part of
    the graph, built from the (symbolic) lengths, since Dynamo does not trace through an
    lru_cache (it would warn and call the function anyway)."""
    if torch.compiler.is_compiling():
        return neighbor_table(axes, device)
    return _cached_table(axes, str(device))


def neighborhood_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           kernel_size: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]] = 1,
                           causal: Union[bool, Sequence[bool]] = False, stride: Union[int, Sequence[int]] = 1,
                           scale: Optional[float] = None, score_mod: Optional[ScoreMod] = None,
                           dropout_p: float = 0.0, return_lse: bool = False):
    """Neighborhood attention computed in the dtype of the inputs.

    q (B, Hq, *spatial, D), k (B, Hkv, *spatial, D), v (B, Hkv, *spatial, Dv) ->
    out (B, Hq, *spatial, Dv) [, lse (B, Hq, *spatial)]. A score mod sees flat
    row-major token indices, with kv_idx (1, 1, M, K): the K neighbours of each query;
    attention dropout (``dropout_p`` > 0) is keyed by the same positions, so it drops the
    kernel's pairs for the same generator state (attnkit.dropout).
    """
    dropout = Dropout.draw(dropout_p, q.device)
    spatial = tuple(q.shape[2:-1])
    axes = normalize(spatial, kernel_size, dilation, causal, stride)
    score_mod = neighborhood_score_mod(q, k, axes, score_mod)
    sm_scale = check_scale(scale, q.shape[-1])
    B, Hq, D, Dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    N = math.prod(spatial)
    idx, valid = _table(axes, q.device)  # (N, K): the key slots of every query
    K = idx.shape[1]
    qf = q.reshape(B, Hq, N, D)
    kf = expand_kv_heads(k.reshape(B, k.shape[1], N, D), Hq)
    vf = expand_kv_heads(v.reshape(B, v.shape[1], N, Dv), Hq)

    def attend(q_chunk: torch.Tensor, first_row: int):
        M = q_chunk.shape[2]
        rows = slice(first_row, first_row + M)
        nb = idx[rows]                                   # (M, K)
        k_nb, v_nb = kf[:, :, nb], vf[:, :, nb]          # (B, H, M, K, D)
        positions = mod_positions(B, Hq, torch.arange(first_row, first_row + M, device=q.device), nb)
        mod, drop = bind_score_mod(score_mod, positions), bind_dropout(dropout, positions)
        # scores are (B, H, M, 1, K) here (one query per neighbour list); mods and dropout see (B, H, M, K)
        flat_mod = None if mod is None else (lambda s: mod(s.squeeze(3)).unsqueeze(3))
        flat_drop = None if drop is None else (lambda p: drop(p.squeeze(3)).unsqueeze(3))
        # q (B, H, M, 1, D), mask (M, 1, K)
        out, lse = softmax_attend(q_chunk.unsqueeze(3), k_nb, v_nb, scale=sm_scale, mask=valid[rows].unsqueeze(1),
                                  score_mod=flat_mod, dropout=flat_drop)
        return out.squeeze(3), lse.squeeze(3)

    out, lse = map_query_chunks(attend, qf, query_chunk_rows(B * Hq, K * max(D, Dv)))
    out = out.reshape(B, Hq, *spatial, Dv)
    lse = lse.to(lse_dtype(q)).reshape(B, Hq, *spatial)
    return (out, lse) if return_lse else out
