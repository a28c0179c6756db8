"""The flash variant: exact softmax attention (FlashAttention-2 algorithm on the fused engine).

Options: bottom-right ``causal``, ``scale``, ``softcap``, learnable ``sink_logits``
(gpt-oss), ``alibi_slopes`` (FlashAttention's convention), any ``score_mod``, packed
variable-length batches (``cu_seqlens_q/k``), attention ``dropout_p``, ``return_lse``.
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
from ..engine import Const, Schedule, fused_attention, head_dim_blockers
from ..mods import ScoreMod
from ..registry import Case, Variant, packed_offsets, register_variant
from .reference import flash_reference, flash_score_mod
from .torch_backend import flash_torch

OPTIONS: dict[str, Any] = {"causal": False, "scale": None, "softcap": None, "sink_logits": None,
                           "alibi_slopes": None, "score_mod": None, "cu_seqlens_q": None, "cu_seqlens_k": None,
                           "dropout_p": 0.0, "return_lse": False}


def flash_schedule(causal: bool) -> Schedule:
    """The engine schedule of dense (or bottom-right causal) attention."""
    from ..kernels import flash as kernels

    return Schedule(mask=kernels.flash_mask, kv_range=kernels.flash_kv_range, q_range=kernels.flash_q_range,
                    args=(Const(int(causal)),))


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_flag("causal", options["causal"])
    check_flag("return_lse", options["return_lse"])
    check_scale(options["scale"], shapes.head_dim)
    check_softcap(options["softcap"])
    check_dropout(options["dropout_p"])
    if options["sink_logits"] is not None:
        check_head_vector("sink_logits", options["sink_logits"], shapes.heads_q, q)
    cu_q, cu_k = options["cu_seqlens_q"], options["cu_seqlens_k"]
    check_varlen(shapes, cu_q, cu_k, q.device)
    flash_score_mod(q, k, options["alibi_slopes"], options["score_mod"], cu_q, cu_k)
    return shapes


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    return head_dim_blockers(q, v)


def flash_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 scale: float | None = None, softcap: float | None = None,
                 sink_logits: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 score_mod: ScoreMod | None = None, cu_seqlens_q: torch.Tensor | None = None,
                 cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`flash_attention` (same arguments, no dispatch)."""
    mod = flash_score_mod(q, k, alibi_slopes, score_mod, cu_seqlens_q, cu_seqlens_k)
    out, lse = fused_attention(q, k, v, flash_schedule(causal), sm_scale=check_scale(scale, q.shape[-1]),
                               softcap=softcap, sink_logits=sink_logits, score_mod=mod, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, dropout=Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, softcap: float | None = None,
                    sink_logits: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                    score_mod: ScoreMod | None = None, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                    backend: str = "auto", layout: str = "bhsd"):
    """Exact softmax attention.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq (GQA/MQA).
        causal: mask aligned bottom-right: query i sees keys j <= i + Nk - Nq.
        scale: score scale, default 1/sqrt(D).
        softcap: if set, scores s become softcap * tanh(s / softcap) (after scaling).
        sink_logits: (Hq,) learnable logit per head added to each row's softmax
            denominator, with no value (gpt-oss); differentiable.
        alibi_slopes: (Hq,) or (B, Hq) float: adds -slope * |i + Nk - Nq - j| to the score
            of query i and key j (FlashAttention's convention; after the softcap); may
            require grad. Same as ``score_mod=attnkit.mods.alibi(alibi_slopes)``.
        score_mod: an :class:`attnkit.ScoreMod` applied to every score after the softcap
            (and after ALiBi when both are given); see docs/mods.md.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 offsets of S sequences packed along N
            (B must be 1); each sequence attends only within itself (mods see the
            sequence index as ``b`` and positions from the sequence's start).
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: the
            softmax probabilities are dropped with probability p (the kept ones scaled by
            1 / (1 - p)) before they multiply v; applied whenever p > 0 (pass 0.0 in
            eval: ``attnkit.nn.Attention`` does). The mask is drawn from torch's default
            generator of q's device, so ``torch.manual_seed`` reproduces it, on either
            backend (docs/flash.md, Dropout).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log
            (including the sink; never dropped); -inf for a row that sees no key.
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) and out
            (B, Nq, Hq, Dv) (flash-attn's layout); read without a copy. The LSE stays
            (B, Hq, Nq), as flash-attn's (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``.

    Examples::

        >>> q = torch.randn(2, 8, 128, 64); k = torch.randn(2, 2, 128, 64); v = torch.randn(2, 2, 128, 64)
        >>> attnkit.flash_attention(q, k, v, causal=True).shape
        torch.Size([2, 8, 128, 64])
        >>> slopes = attnkit.mods.alibi_slopes(8)
        >>> out, lse = attnkit.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True)
        >>> _ = torch.manual_seed(0)
        >>> train = attnkit.flash_attention(q, k, v, causal=True, dropout_p=0.1)
    """
    return attention(q, k, v, "flash", backend, causal=causal, scale=scale, softcap=softcap,
                     sink_logits=sink_logits, alibi_slopes=alibi_slopes, score_mod=score_mod,
                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, return_lse=return_lse,
                     layout=layout)


def _sinks(heads: int):
    return lambda g: torch.randn(heads, generator=g, dtype=torch.float64)


def examples() -> list[Case]:
    return [
        Case((1, 2, 37, 32), (1, 2, 37, 32), (1, 2, 37, 32), name="dense"),
        Case((1, 2, 37, 32), (1, 2, 37, 32), (1, 2, 37, 32), {"causal": True}, name="causal"),
        Case((2, 4, 17, 40), (2, 2, 45, 40), (2, 2, 45, 24), {"causal": True}, name="gqa_nq<nk_d40_dv24"),
        Case((1, 2, 45, 16), (1, 1, 17, 16), (1, 1, 17, 16), {"causal": True}, name="nq>nk_empty_rows"),
        Case((1, 4, 1, 64), (1, 1, 70, 64), (1, 1, 70, 64), {"causal": True}, name="decode_mqa"),
        Case((1, 2, 33, 80), (1, 2, 33, 80), (1, 2, 33, 80), {"causal": True, "softcap": 3.0},
             {"sink_logits": _sinks(2)}, name="softcap_sink_d80"),
        Case((1, 2, 41, 32), (1, 2, 55, 32), (1, 2, 55, 32),
             {"causal": True, "scale": 0.3},
             {"cu_seqlens_q": packed_offsets(17, 23, 1), "cu_seqlens_k": packed_offsets(20, 34, 1)},
             name="varlen_causal"),
        Case((1, 2, 45, 32), (1, 2, 30, 32), (1, 2, 30, 24), {"dropout_p": 0.3}, name="dropout_nq>nk_dv24"),
        Case((1, 4, 41, 32), (1, 2, 55, 32), (1, 2, 55, 32), {"causal": True, "softcap": 3.0, "dropout_p": 0.2},
             {"sink_logits": _sinks(4), "cu_seqlens_q": packed_offsets(17, 23, 1),
              "cu_seqlens_k": packed_offsets(20, 34, 1)}, name="dropout_varlen_gqa_softcap_sink"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, {"causal": True}, name=f"causal_n{seqlen}")


VARIANT = register_variant(Variant(
    name="flash",
    reference=flash_reference,
    kernel=flash_kernel,
    torch_impl=flash_torch,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="exact softmax attention: causal, GQA, softcap, sink logits, varlen",
    demo=demo,
))
