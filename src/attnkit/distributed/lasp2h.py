"""LASP-2H (Sun et al. 2025): the softmax layers of a linear/softmax hybrid under LASP-2's scheme.

Contiguous layout, as :mod:`.lasp2`: rank r holds tokens [r L, (r + 1) L), L = N/W.
The forward is ONE all-gather of the rank's K and V (packed into one buffer), then the
rank's queries attend the gathered keys with their global positions; the backward is
ONE reduce-scatter of the gathered keys' gradients (each rank gets the sum, over the
ranks, of the gradient of its own K and V). So a hybrid model uses a single collective
pattern for both kinds of layer (LASP-2's all-gather of states for the linear layers,
this all-gather of K/V for the softmax ones).

Global offsets: attnkit's masks are bottom-right aligned (query i of Nq sits at key
position i + Nk - Nq). The rank's queries are the last L of the first (r + 1) L
positions, so with causal attention the keys are cut at (r + 1) L and the usual causal
(or windowed) call is exact. Without the causal mask a window's right edge reaches
past (r + 1) L: the keys are cut at E = min(N, (r + 1) L + right) and the window shifted
by E - (r + 1) L. When nothing before the window's left edge is visible (no sinks),
the keys before it are not computed with either.

The work is not balanced under a causal mask (rank W - 1 attends W times the keys of
rank 0), as in LASP-2's paper; the gathered K/V cost N x (D + Dv) x Hkv per rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..checks import check_flag, check_scale
from ..flash import flash_attention
from ..sliding_window import sliding_window_attention
from ..sliding_window.window import check_sinks, head_windows
from ._comm import Field, agree, input_fields, reduce_scatter, world
from .layout import check_shards


class _GatherKV(torch.autograd.Function):
    """K (B, Hkv, L, D) and V (B, Hkv, L, Dv) of every rank -> (B, Hkv, W L, D/Dv), in
    rank order, by one all-gather; the backward reduce-scatters the gradients."""

    @staticmethod
    def forward(ctx, k, v, group, size: int):
        ctx.args = (group, size, k.shape[-1])
        packed = torch.cat([k, v], dim=-1).contiguous()
        parts = [torch.empty_like(packed) for _ in range(size)]
        dist.all_gather(parts, packed, group=group)
        whole = torch.cat(parts, dim=2)
        return whole[..., :k.shape[-1]], whole[..., k.shape[-1]:]

    @staticmethod
    def backward(ctx, dk, dv):
        group, size, d = ctx.args
        packed = torch.cat([dk, dv], dim=-1)
        mine = reduce_scatter(packed, 2, group, size)
        return mine[..., :d], mine[..., d:], None, None


def _key_range(rank: int, local: int, total: int, causal: bool, windows: list[tuple[int, int]] | None,
               sinks: int) -> tuple[int, int, list[tuple[int, int]] | None]:
    """(start, end, windows') for the queries at positions [rank L, (rank + 1) L): the keys
    [start, end) they need and the windows shifted so that, bottom-right aligned on those
    keys, query i sits at its global position."""
    first, after = rank * local, (rank + 1) * local
    if causal:                  # the window intersected with the causal mask: right edge 0
        end, windows = after, None if windows is None else [(left, 0) for left, _ in windows]
    elif windows is None:
        return 0, total, None
    else:
        right = windows[0][1]
        end = total if right == -1 else min(total, after + right)
        shift = end - after     # <= right: the shifted right edge stays >= 0
        windows = [(-1 if lf == -1 else lf + shift, -1 if rt == -1 else rt - shift) for lf, rt in windows]
    start = 0
    if windows is not None and sinks == 0 and all(left != -1 for left, _ in windows):
        # the earliest visible key: first - left, the left edge unshifted (left' - (end - after))
        start = max(0, first - max(left for left, _ in windows) + (end - after))
    return start, end, windows


def lasp2h_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, causal: bool = True,
                     scale: float | None = None, window: Any = None, sinks: int = 0) -> torch.Tensor:
    """Softmax attention over a sequence sharded across ranks, LASP-2H's way: one
    all-gather of K and V, local attention of this rank's queries at their global
    positions, and one reduce-scatter of the K/V gradients.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's
            shards in the **contiguous** layout (rank r holds tokens [r N/W, (r+1) N/W)),
            as :func:`lasp2_linear_attention` takes them; the same shapes and dtype on
            every rank (checked). Hkv divides Hq (GQA: K/V are gathered with Hkv heads).
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank).
        causal: causal mask over the global positions (the default: a decoder layer).
        scale: score scale, default 1/sqrt(D).
        window: None (full, or causal, attention) or a window as
            :func:`attnkit.sliding_window_attention` takes it over the whole sequence: an
            int W (the last W keys), a pair (left, right), or an int tensor (Hq, 2) of
            per-head pairs; with ``causal`` it is intersected with the causal mask
            (right edges act as 0). Without ``causal`` every head must have the same
            right edge.
        sinks: with a window, the first ``sinks`` tokens of the sequence stay visible to
            every query (StreamingLLM's sinks).

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype: this rank's shard of the single-process
        ``flash_attention(q, k, v, causal=causal, scale=scale)`` or, with a window,
        ``sliding_window_attention(q, k, v, window=window, sinks=sinks, scale=scale)``
        (window intersected with causal). Differentiable in q, k and v.

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (the message names the argument and the rank) or when the ranks' shapes,
        dtypes or options differ.

    Examples::

        >>> q, k, v = (shard_sequence(t, layout="contiguous") for t in (q_all, k_all, v_all))
        >>> out = lasp2h_attention(q, k, v, None, window=512, sinks=4)      # (B, Hq, N/W, Dv)
    """
    rank, size = world(group)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        shapes = check_shards("lasp2h_attention", q, k, v)
        is_causal, sm_scale = check_flag("causal", causal), check_scale(scale, shapes.head_dim)
        n_sinks = check_sinks(sinks)
        windows = None
        if window is not None:
            windows = head_windows(window, shapes.heads_q, q.device)
            if not is_causal and len({right for _, right in windows}) > 1:
                raise ValueError("lasp2h_attention with causal=False needs the same right edge for every head of "
                                 f"window, got {sorted({right for _, right in windows})}")
        elif n_sinks:
            raise ValueError(f"sinks={n_sinks} needs a window (without one every key is visible already)")
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.head_dim, shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("causal", is_causal), Field("scale", sm_scale), Field("window", windows),
                   Field("sinks", n_sinks)]
        return (is_causal, sm_scale, windows, n_sinks), fields

    is_causal, sm_scale, windows, n_sinks = agree("lasp2h_attention", check, group, size)
    local = q.shape[2]
    if size > 1:
        k, v = _GatherKV.apply(k, v, group, size)
    start, end, shifted = _key_range(rank, local, local * size, is_causal, windows, n_sinks)
    k, v = k[:, :, start:end], v[:, :, start:end]
    if shifted is None:
        return flash_attention(q, k, v, causal=is_causal, scale=sm_scale)
    one = len(set(shifted)) == 1
    per_head = shifted[0] if one else torch.tensor(shifted, dtype=torch.int64, device=q.device)
    return sliding_window_attention(q, k, v, window=per_head, sinks=n_sinks, scale=sm_scale)
