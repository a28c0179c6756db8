"""The neighborhood variant: NATTEN's neighborhood attention in 1-D, 2-D and 3-D.

Every query attends to the ``prod(kernel_size)`` keys around it (windows shift at
the borders so each query sees exactly ``kernel_size`` keys per axis), with
per-axis dilation, causality and GNA stride (see :mod:`.geometry` and
docs/neighborhood.md). The kernel is fused neighborhood attention on the shared
engine in list mode (:mod:`.fused`); the reference gathers the neighbours.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..checks import (
    Shapes,
    check_dropout,
    check_flag,
    check_qkv,
    check_scale,
    check_tensor,
)
from ..dispatch import attention
from ..dropout import Dropout
from ..engine import head_dim_blockers
from ..mods import ScoreMod
from ..registry import Case, Variant, register_variant
from .geometry import normalize
from .reference import neighborhood_reference, neighborhood_score_mod
from .torch_backend import neighborhood_torch

OPTIONS: Dict[str, Any] = dict(kernel_size=None, dilation=1, causal=False, stride=1, scale=None, score_mod=None,
                               dropout_p=0.0, return_lse=False)


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> Shapes:
    check_tensor("q", q)
    ndim = q.dim() - 3
    if not 1 <= ndim <= 3:
        raise ValueError(f"q must have layout (B, H, *spatial, D) with 1 to 3 spatial dims (rank 4 to 6), "
                         f"got shape {tuple(q.shape)} ({ndim} spatial dims)")
    shapes = check_qkv(q, k, v, spatial_dims=ndim)
    if q.shape[2:-1] != k.shape[2:-1]:
        raise ValueError(f"q and k must have the same spatial sizes, got {tuple(q.shape[2:-1])} and "
                         f"{tuple(k.shape[2:-1])}")
    if options["kernel_size"] is None:
        raise TypeError("neighborhood attention needs kernel_size (an int or one int per spatial axis)")
    axes = normalize(tuple(q.shape[2:-1]), options["kernel_size"], options["dilation"], options["causal"],
                     options["stride"])
    check_scale(options["scale"], shapes.head_dim)
    check_dropout(options["dropout_p"])
    neighborhood_score_mod(q, k, axes, options["score_mod"])
    check_flag("return_lse", options["return_lse"])
    return shapes


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    reasons = head_dim_blockers(q, v)
    return reasons


def neighborhood_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        kernel_size: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]] = 1,
                        causal: Union[bool, Sequence[bool]] = False, stride: Union[int, Sequence[int]] = 1,
                        scale: Optional[float] = None, score_mod: Optional[ScoreMod] = None,
                        dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`neighborhood_attention` (same arguments, no dispatch)."""
    from .fused import fused_neighborhood

    axes = normalize(tuple(q.shape[2:-1]), kernel_size, dilation, causal, stride)
    out, lse = fused_neighborhood(q, k, v, axes, check_scale(scale, q.shape[-1]),
                                  neighborhood_score_mod(q, k, axes, score_mod), Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           kernel_size: Union[int, Sequence[int]], dilation: Union[int, Sequence[int]] = 1,
                           causal: Union[bool, Sequence[bool]] = False, stride: Union[int, Sequence[int]] = 1,
                           scale: Optional[float] = None, score_mod: Optional[ScoreMod] = None,
                           dropout_p: float = 0.0, return_lse: bool = False, backend: str = "auto",
                           layout: str = "bhsd"):
    """Neighborhood attention (NATTEN semantics) over 1 to 3 spatial axes.

    Each query attends to the keys of its neighborhood: the product over spatial axes
    of a window of ``kernel_size`` positions (along an axis of length L, within the
    query's dilation group). Non-causal windows are centred on the query and shift at
    the borders, so every query sees exactly ``kernel_size`` keys per axis; a causal
    axis sees the ``kernel_size`` positions ending at the query (fewer at the start).

    Args:
        q: (B, Hq, *spatial, D); ``spatial`` is (X,), (X, Y) or (X, Y, Z).
        k: (B, Hkv, *spatial, D). v: (B, Hkv, *spatial, Dv); Hkv divides Hq (GQA/MQA:
            query head h uses kv head h // (Hq // Hkv)).
        kernel_size: window size per axis, an int or a tuple of one int per axis (>= 1).
        dilation: per-axis dilation d (>= 1): tokens split into d groups by index mod d
            and attend only within their group; requires kernel_size * dilation <= L.
        causal: a bool or one bool per axis (e.g. (True, False, False) for video:
            causal in time only).
        stride: per-axis GNA stride (1 <= stride <= kernel_size): the queries of a
            stride group share the window of their leader (the centre query, the right
            one of the middle pair for even strides; the last query on a causal axis,
            where each query still sees no key after itself). stride == kernel_size
            gives blocked (HaloNet/Swin-style) attention.
        scale: score scale, default 1/sqrt(D).
        score_mod: an :class:`attnkit.ScoreMod` applied to every neighbour's score; it sees
            flat row-major token indices over ``spatial`` as ``q_idx``/``kv_idx`` (e.g.
            ``attnkit.mods.relative_position_bias_2d(rpb, kernel_size)``, NATTEN's rpb).
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: the
            neighbours' probabilities are dropped with probability p, the kept ones scaled
            by 1 / (1 - p), before they multiply v; the mask is drawn from torch's default
            generator of q's device and keyed by the flat token indices mods see
            (docs/flash.md, Dropout).
        return_lse: also return the log-sum-exp (B, Hq, *spatial), float32, natural log.
        layout: "bhsd" (default) or "bshd": heads second to last, q/k/v (B, *spatial, H, D) and out
            (B, *spatial, H, Dv) (NATTEN's heads-last layout); read without a copy.
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, *spatial, Dv) in q's dtype, or (out, lse) with ``return_lse``.
    """
    return attention(q, k, v, "neighborhood", backend, kernel_size=kernel_size, dilation=dilation, causal=causal,
                     stride=stride, scale=scale, score_mod=score_mod, dropout_p=dropout_p, return_lse=return_lse,
                     layout=layout)


def examples() -> List[Case]:
    def same(*shape: int):
        return dict(q=shape, k=shape, v=shape)

    return [
        Case(**same(1, 2, 45, 32), options={"kernel_size": 7}, name="1d_k7"),
        Case((1, 2, 9, 13, 40), (1, 1, 9, 13, 40), (1, 1, 9, 13, 24), options={"kernel_size": (5, 4)},
             name="2d_9x13_k5x4_gqa_d40"),
        Case(**same(1, 1, 11, 12, 16), options={"kernel_size": 3, "dilation": (2, 3), "causal": (True, False)},
             name="2d_dilation_causal"),
        Case(**same(1, 1, 4, 6, 5, 16), options={"kernel_size": (3, 3, 4), "stride": (1, 2, 4)},
             name="3d_4x6x5_stride"),
        Case((1, 2, 11, 12, 16), (1, 1, 11, 12, 16), (1, 1, 11, 12, 16),
             options={"kernel_size": 3, "dilation": (2, 3), "causal": (True, False), "dropout_p": 0.3},
             name="dropout_2d_dilation_gqa"),
    ]


VARIANT = register_variant(Variant(
    name="neighborhood",
    reference=neighborhood_reference,
    kernel=neighborhood_kernel,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="NATTEN neighborhood attention in 1-3 spatial dims: dilation, per-axis causal, GNA stride",
    torch_impl=neighborhood_torch,
))

__all__ = ["neighborhood_attention", "neighborhood_reference", "neighborhood_kernel", "VARIANT"]
