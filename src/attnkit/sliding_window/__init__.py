"""The sliding_window variant: local softmax attention with attention sinks and per-head windows.

FlashAttention window semantics (docs/sliding_window.md): ``window=(left, right)`` inclusive and
bottom-right aligned, -1 unbounded; ``window=W`` means (W - 1, 0); ``sinks=S`` keeps the
first S keys visible (StreamingLLM) subject only to the right edge; ``window`` as an int
tensor (Hq, 2) gives every query head its own window in one launch (DuoAttention, MoA).
The kernel is the shared fused engine in range mode (kernels/sliding_window.py): it visits
only key blocks that intersect a window or the sinks, so its cost is O(N * (W + S)).
Packed variable-length batches (``cu_seqlens_q/k``, B = 1): every sequence has its own
window positions and its own sinks.
:class:`SlidingWindowCache` is the constant-memory decode cache.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import (
    Shapes,
    check_dropout,
    check_flag,
    check_head_vector,
    check_qkv,
    check_scale,
    check_softcap,
    check_varlen,
)
from ..dispatch import attention
from ..dropout import Dropout
from ..engine import Schedule, fused_attention, head_dim_blockers
from ..mods import ScoreMod
from ..registry import Case, Variant, packed_offsets, register_variant
from .reference import sliding_window_reference, sliding_window_score_mod
from .torch_backend import sliding_window_torch
from .window import bounded, check_sinks, head_windows

OPTIONS: dict[str, Any] = {"window": None, "sinks": 0, "scale": None, "softcap": None, "sink_logits": None,
                           "score_mod": None, "cu_seqlens_q": None, "cu_seqlens_k": None, "dropout_p": 0.0,
                           "return_lse": False}


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    if options["window"] is None:
        raise TypeError("sliding_window needs window=: an int W, a pair (left, right) or an int tensor (Hq, 2)")
    head_windows(options["window"], shapes.heads_q, q.device)
    check_sinks(options["sinks"])
    check_flag("return_lse", options["return_lse"])
    check_scale(options["scale"], shapes.head_dim)
    check_softcap(options["softcap"])
    check_dropout(options["dropout_p"])
    if options["sink_logits"] is not None:
        check_head_vector("sink_logits", options["sink_logits"], shapes.heads_q, q)
    check_varlen(shapes, options["cu_seqlens_q"], options["cu_seqlens_k"], q.device)
    sliding_window_score_mod(q, k, options["score_mod"], options["cu_seqlens_q"], options["cu_seqlens_k"])
    return shapes


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    reasons = head_dim_blockers(q, v)
    if q.shape[2] + k.shape[2] >= 2 ** 30:
        reasons.append("Nq + Nk >= 2**30 overflows the kernel's int32 position arithmetic")
    return reasons


def make_schedule(window: Any, sinks: int, heads_q: int, seqlen_q: int, seqlen_k: int,
                  device: torch.device) -> Schedule:
    """The engine Schedule of a window: one window for all heads travels as two ints, per-head
    windows as an int32 (Hq, 2) tensor (see kernels/sliding_window.py). For a packed batch
    ``seqlen_q/k`` are the packed lengths: they bound every sequence's, and the hooks get
    each sequence's own lengths and positions from the engine."""
    from ..kernels import sliding_window as sw

    windows = [(bounded(l, seqlen_q, seqlen_k), bounded(r, seqlen_q, seqlen_k))
               for l, r in head_windows(window, heads_q)]
    sinks = min(sinks, seqlen_k)
    hooks = {"mask": sw.sliding_window_mask, "kv_range": sw.sliding_window_kv_range,
             "q_range": sw.sliding_window_q_range}
    if len(set(windows)) == 1:
        left, right = windows[0]
        return Schedule(**hooks, args=(sinks, left, right, None))
    table = torch.tensor(windows, dtype=torch.int32, device=device).contiguous()
    return Schedule(**hooks, args=(sinks, 0, 0, table))


def sliding_window_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, sinks: int = 0,
                          scale: float | None = None, softcap: float | None = None,
                          sink_logits: torch.Tensor | None = None, score_mod: ScoreMod | None = None,
                          cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                          dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`sliding_window_attention` (same arguments, no dispatch)."""
    schedule = make_schedule(window, sinks, q.shape[1], q.shape[2], k.shape[2], q.device)
    out, lse = fused_attention(q, k, v, schedule, sm_scale=check_scale(scale, q.shape[-1]), softcap=softcap,
                               sink_logits=sink_logits,
                               score_mod=sliding_window_score_mod(q, k, score_mod, cu_seqlens_q, cu_seqlens_k),
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               dropout=Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, sinks: int = 0,
                             scale: float | None = None, softcap: float | None = None,
                             sink_logits: torch.Tensor | None = None, score_mod: ScoreMod | None = None,
                             cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                             dropout_p: float = 0.0, return_lse: bool = False, backend: str = "auto",
                             layout: str = "bhsd"):
    """Sliding-window softmax attention with attention sinks and per-head windows.

    Query i sits at key position p = i + Nk - Nq (bottom-right aligned, as FlashAttention)
    and sees key j iff ``j <= p + right`` and (``j >= p - left`` or ``j < sinks``). In a
    packed batch the rule holds inside each sequence, with its own Nq, Nk and positions.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq (GQA/MQA).
        window: one of
            - int W >= 1: the last W keys up to the query's own position, i.e. (W - 1, 0)
              (Mistral / Hugging Face ``sliding_window``);
            - pair (left, right) of ints >= -1, inclusive, -1 = unbounded on that side
              (flash-attn's ``window_size``); (-1, 0) is causal, (-1, -1) dense;
            - int tensor of shape (Hq, 2), one (left, right) row per query head, on q's
              device (DuoAttention / MoA: e.g. (-1, 0) rows for full causal heads).
        sinks: S >= 0; the first S keys stay visible to every query, subject only to the
            window's right edge (StreamingLLM's attention sinks).
        scale: score scale, default 1/sqrt(D).
        softcap: if set, scores s become softcap * tanh(s / softcap) (after scaling).
        sink_logits: (Hq,) learnable logit per head added to each row's softmax
            denominator with no value (gpt-oss); differentiable. Unrelated to ``sinks``.
        score_mod: an :class:`attnkit.ScoreMod` applied to every visible score after the
            softcap (e.g. ``attnkit.mods.alibi(slopes)``); see docs/mods.md.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 offsets of S sequences packed along N
            (B must be 1; both or neither). Each sequence attends only within itself and
            restarts its window and its sinks (the first ``sinks`` keys of *each*
            sequence), bottom-right aligned within it; mods see the sequence index as
            ``b`` and positions from the sequence's start.
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: visible
            probabilities are dropped with probability p, the kept ones scaled by
            1 / (1 - p), before they multiply v; the mask is drawn from torch's default
            generator of q's device (docs/flash.md, Dropout).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log;
            -inf for a row that sees no key (its output is 0).
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) and out
            (B, Nq, Hq, Dv) (flash-attn's layout); read without a copy. The LSE stays
            (B, Hq, Nq), as flash-attn's (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``.

    Examples::

        >>> q = torch.randn(1, 8, 256, 64); k = torch.randn(1, 2, 256, 64); v = torch.randn(1, 2, 256, 64)
        >>> attnkit.sliding_window_attention(q, k, v, window=64, sinks=4).shape
        torch.Size([1, 8, 256, 64])
        >>> cu = torch.tensor([0, 100, 256], dtype=torch.int32)  # two sequences packed along N
        >>> out, lse = attnkit.sliding_window_attention(q, k, v, window=64, sinks=4, cu_seqlens_q=cu,
        ...                                             cu_seqlens_k=cu, return_lse=True)
        >>> lse.shape
        torch.Size([1, 8, 256])
    """
    return attention(q, k, v, "sliding_window", backend, window=window, sinks=sinks, scale=scale, softcap=softcap,
                     sink_logits=sink_logits, score_mod=score_mod, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, return_lse=return_lse, layout=layout)


def _per_head(rows):
    return lambda g: torch.tensor(rows, dtype=torch.int64)


def _logits(heads: int):
    return lambda g: torch.randn(heads, generator=g, dtype=torch.float64)


def examples() -> list[Case]:
    return [
        Case((1, 2, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32), {"window": 16}, name="mistral_w16"),
        Case((1, 2, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32), {"window": 9, "sinks": 4}, name="w9_sinks4"),
        Case((2, 4, 37, 40), (2, 2, 53, 40), (2, 2, 53, 24), {"window": (20, 5), "sinks": 3},
             name="gqa_nq<nk_d40_left20_right5_sinks"),
        Case((1, 4, 49, 32), (1, 2, 49, 32), (1, 2, 49, 32), {"sinks": 2},
             {"window": _per_head([[-1, 0], [7, 0], [0, 0], [12, 3]])}, name="per_head_gqa"),
        Case((1, 4, 1, 64), (1, 1, 90, 64), (1, 1, 90, 64), {"window": 32, "sinks": 4}, name="decode_mqa"),
        Case((1, 2, 45, 16), (1, 2, 17, 16), (1, 2, 17, 16), {"window": (3, 0)}, name="nq>nk_empty_rows"),
        Case((1, 2, 33, 80), (1, 2, 33, 80), (1, 2, 33, 80), {"window": 10, "sinks": 2, "softcap": 3.0},
             {"sink_logits": _logits(2)}, name="softcap_sink_logits_d80"),
        Case((1, 4, 41, 32), (1, 2, 62, 32), (1, 2, 62, 24), {"sinks": 2},
             {"window": _per_head([[-1, 0], [5, 0], [9, 2], [0, 0]]), "sink_logits": _logits(4),
              "cu_seqlens_q": packed_offsets(17, 0, 23, 1), "cu_seqlens_k": packed_offsets(20, 3, 38, 1)},
             name="varlen_per_head_sinks_gqa"),
        Case((1, 4, 49, 32), (1, 2, 49, 32), (1, 2, 49, 32), {"sinks": 2, "dropout_p": 0.25},
             {"window": _per_head([[-1, 0], [7, 0], [0, 0], [12, 3]])}, name="dropout_per_head_gqa"),
    ]


VARIANT = register_variant(Variant(
    name="sliding_window",
    reference=sliding_window_reference,
    kernel=sliding_window_kernel,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="local attention: (left, right) windows, attention sinks, per-head windows, varlen, decode cache",
    torch_impl=sliding_window_torch,
))

from .cache import SlidingWindowCache

__all__ = ["SlidingWindowCache", "sliding_window_attention", "sliding_window_reference"]
