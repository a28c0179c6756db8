"""Parsing and checking of the ``window`` and ``sinks`` options (shared by spec, reference, cache).

A window is normalized to a list of Hq ``(left, right)`` pairs of Python ints, each
>= -1, where -1 means unbounded on that side (FlashAttention's convention). An extent
that reaches past every key of any sequence (>= UNBOUNDED_FROM) is unbounded too, and
is stored as -1, so every consumer computes position +/- extent without overflow.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from ..checks import check_int

Window = Tuple[int, int]
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: Extents from here on are "unbounded": no tensor holds 2**62 positions, and a position
#: plus an extent below this never leaves int64 (window=2**70 made the references raise
#: OverflowError, and an int64 tensor window near 2**63 wrapped around silently).
UNBOUNDED_FROM = 2 ** 62


def _check_entry(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (>= -1, -1 = unbounded), got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"{name} must be >= -1 (-1 = unbounded), got {value}")
    return -1 if value >= UNBOUNDED_FROM else value


def head_windows(window: object, heads_q: int, device: torch.device = None) -> List[Window]:
    """Normalize ``window`` to one inclusive (left, right) pair per query head.

    Accepts an int W >= 1 (the last W keys: (W - 1, 0)), a pair (left, right) of ints
    >= -1, or an integer tensor of shape (Hq, 2) on ``device`` (per-head windows).
    Extents >= :data:`UNBOUNDED_FROM` come back as -1 (unbounded).
    Raises TypeError/ValueError naming ``window`` otherwise.
    """
    if isinstance(window, torch.Tensor):
        if window.dtype not in INT_DTYPES:
            raise TypeError(f"window as a tensor must have an integer dtype (int32 or int64), got {window.dtype}")
        if tuple(window.shape) != (heads_q, 2):
            raise ValueError(f"window as a tensor must have shape (Hq, 2) = ({heads_q}, 2): one (left, right) "
                             f"row per query head; got {tuple(window.shape)}")
        if device is not None and window.device != torch.device(device):
            raise ValueError(f"window is on {window.device} but q is on {device}")
        return [(_check_entry(f"window[{h}, 0] (left)", int(left)), _check_entry(f"window[{h}, 1] (right)", int(right)))
                for h, (left, right) in enumerate(window.tolist())]
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window as a pair must be (left, right), got {len(window)} entries: {window!r}")
        left = _check_entry("window[0] (left)", window[0])
        right = _check_entry("window[1] (right)", window[1])
        return [(left, right)] * heads_q
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError("window must be an int W (the last W keys), a pair (left, right) or an int tensor of "
                        f"shape (Hq, 2); got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window as an int W means the last W keys (left = W - 1, right = 0) and must be >= 1, "
                         f"got {window}; use window=(-1, 0) for full causal attention")
    return [(_check_entry("window - 1 (left)", window - 1), 0)] * heads_q


def check_sinks(sinks: object) -> int:
    return check_int("sinks", sinks, minimum=0)


def bounded(extent: int, seqlen_q: int, seqlen_k: int) -> int:
    """-1 (unbounded) or any extent beyond the sequences -> seqlen_q + seqlen_k, which is
    unbounded in effect; keeps kernel index arithmetic inside int32."""
    cap = seqlen_q + seqlen_k
    return cap if extent < 0 or extent > cap else extent


def by_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: List[Window],
              sink_logits: torch.Tensor | None, run) -> Tuple[torch.Tensor, torch.Tensor]:
    """Heads grouped by window: ``run(q, k, v, left, right, heads, sink_logits)`` -> (out, lse)
    on each group's heads (q, k, v (B, Hq, N, D), k and v expanded to the query heads; ``heads``
    the group's head indices), put back in head order. One window for every head (or no heads)
    is one call."""
    Hq = q.shape[1]
    groups: dict = {}
    for h, w in enumerate(windows):
        groups.setdefault(w, []).append(h)
    if len(groups) <= 1:
        left, right = windows[0] if windows else (-1, -1)
        return run(q, k, v, left, right, torch.arange(Hq, device=q.device), sink_logits)
    outs, lses, order = [], [], []
    for (left, right), heads in groups.items():
        idx = torch.tensor(heads, device=q.device)
        o, o_lse = run(q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx), left, right, idx,
                       None if sink_logits is None else sink_logits[idx])
        outs.append(o)
        lses.append(o_lse)
        order += heads
    inverse = torch.empty(Hq, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(Hq)
    inverse = inverse.to(q.device)
    return torch.cat(outs, dim=1).index_select(1, inverse), torch.cat(lses, dim=1).index_select(1, inverse)
