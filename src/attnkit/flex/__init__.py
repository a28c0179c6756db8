"""The flex variant: FlexAttention's interface on attnkit's engine.

``flex_attention(q, k, v, score_mod=None, mask_mod=None, block_mask=None)``: any
:class:`attnkit.ScoreMod` and :class:`attnkit.MaskMod`, and a :class:`attnkit.BlockMask`
(usually from :func:`attnkit.create_block_mask`) whose listed tiles are the only ones
computed: full tiles without the mask, partial tiles with the mask_mod it carries, so
the result is the exact token mask. Without a block mask every tile is visited (the
mask_mod, if any, applies everywhere). An explicit ``mask_mod`` is intersected with
the block mask's.

Packed variable-length batches (``cu_seqlens_q/k``, B = 1) take mods without a block
mask: the mods see ``b`` = the sequence index and ``q_idx``/``kv_idx`` from each
sequence's start. A BlockMask describes one (Nq, Nk) tile grid per batch entry, which a
packed batch does not have, so a block mask with ``cu_seqlens`` is refused; for block
sparsity over packed documents, pass the packed layout without ``cu_seqlens`` and a
block mask built from :func:`attnkit.mods.document`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..block_sparse.block_mask import BlockMask, create_block_mask
from ..block_sparse.variant import (
    block_sparse_kernel,
    check_block_mask,
    list_tile_blockers,
)
from ..checks import check_dropout, check_scale
from ..dispatch import attention
from ..dropout import Dropout
from ..engine import Const, Schedule, fused_attention
from ..extension import softmax_variant
from ..mods import MaskMod, Problem, ScoreMod
from ..mods.core import check_mask_mod, check_score_mod
from ..registry import Case, packed_offsets
from .reference import flex_reference
from .torch_backend import flex_torch


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> None:
    from ..checks import check_qkv

    shapes = check_qkv(q, k, v)
    cu_q, cu_k = options["cu_seqlens_q"], options["cu_seqlens_k"]  # checked by softmax_variant (check_varlen)
    if options["block_mask"] is not None:
        if cu_q is not None:
            raise ValueError("block_mask cannot be combined with cu_seqlens_q/k: a BlockMask lists the tiles of one "
                             "(Nq, Nk) grid per batch entry, and a packed batch has one grid per sequence. Pass a "
                             "mask_mod without block_mask (it sees per-sequence positions), or the packed layout "
                             "without cu_seqlens and a block mask from attnkit.mods.document(doc_ids)")
        check_block_mask(options["block_mask"], shapes)
    flex_mask_mod(q, k, options["mask_mod"], cu_q, cu_k)
    check_dropout(options["dropout_p"])


def flex_mask_mod(q: torch.Tensor, k: torch.Tensor, mask_mod: Any, cu_seqlens_q: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None) -> MaskMod | None:
    """``mask_mod`` checked and specialized for the call, a packed batch counting its
    sequences (None stays None)."""
    if mask_mod is None:
        return None
    return check_mask_mod("mask_mod", mask_mod, Problem.of("flex", q, k, cu_seqlens_q, cu_seqlens_k))


def _kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    return list_tile_blockers(options["block_mask"]) if options["block_mask"] is not None else []


def flex_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score_mod: ScoreMod | None = None,
                mask_mod: MaskMod | None = None, block_mask: BlockMask | None = None,
                scale: float | None = None, softcap: float | None = None,
                cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`flex_attention` (same arguments, no dispatch)."""
    if block_mask is not None:  # never packed: validation refuses a block mask with cu_seqlens
        return block_sparse_kernel(q, k, v, block_mask=block_mask, scale=scale, softcap=softcap,
                                   score_mod=score_mod, mask_mod=mask_mod, dropout_p=dropout_p,
                                   return_lse=return_lse)
    from ..kernels import flash as kernels

    mask = flex_mask_mod(q, k, mask_mod, cu_seqlens_q, cu_seqlens_k)
    problem = Problem.of("flex", q, k, cu_seqlens_q, cu_seqlens_k)
    # no block mask: every key block, full without a mask_mod, partial with one
    if mask is None:
        schedule = Schedule(kv_range=kernels.flash_kv_range, q_range=kernels.flash_q_range, args=(Const(0),))
    else:
        schedule = Schedule(kv_range=kernels.masked_kv_range, q_range=kernels.masked_q_range, args=(Const(0),))
    out, lse = fused_attention(q, k, v, schedule, sm_scale=check_scale(scale, q.shape[-1]), softcap=softcap,
                               score_mod=check_score_mod("score_mod", score_mod, problem), mask_mod=mask,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               dropout=Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None = None,
                   mask_mod: MaskMod | None = None, block_mask: BlockMask | None = None, *,
                   scale: float | None = None, return_lse: bool = False, backend: str = "auto",
                   softcap: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                   cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, layout: str = "bhsd"):
    """FlexAttention on attnkit's engine: softmax attention with a score mod, a mask mod and a block mask.

    Scores: s = scale * q.k, then ``softcap`` (if given), then ``score_mod``; a pair
    attends iff its tile is listed in ``block_mask`` (and, in a partial tile, the block
    mask's mask_mod allows it) and ``mask_mod`` allows it. Positions are attnkit's:
    query row i has ``q_idx = i + Nk - Nq`` (FlexAttention's ``i`` when Nq == Nk).

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq (GQA).
        score_mod: an :class:`attnkit.ScoreMod` (e.g. ``attnkit.mods.alibi(slopes)``); its
            learnable tensors get gradients.
        mask_mod: an :class:`attnkit.MaskMod` (e.g. ``attnkit.mods.causal()``). Without a
            block mask it is evaluated on every tile; build a block mask with
            :func:`attnkit.create_block_mask` so that empty tiles are skipped.
        block_mask: an :class:`attnkit.BlockMask` with seq_lens (Nq, Nk), or None (dense);
            not with ``cu_seqlens_q/k``.
        scale: score scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log; -inf
            (and output 0) for a row that sees no key.
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) and out
            (B, Nq, Hq, Dv) (flash-attn's layout); read without a copy. The LSE stays
            (B, Hq, Nq), as flash-attn's (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).
        softcap: scores s become softcap * tanh(s / softcap) before the score_mod.
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 offsets of S sequences packed along N
            (B must be 1; both or neither): each sequence attends only within itself, and
            the mods see ``b`` = the sequence index and ``q_idx``/``kv_idx`` counted from
            the sequence's start (bottom-right within it). Mods only: a ``block_mask`` is
            refused (ValueError).
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: attended
            probabilities are dropped with probability p, the kept ones scaled by
            1 / (1 - p), before they multiply v; the mask is drawn from torch's default
            generator of q's device and keyed by the positions mods see (docs/flash.md,
            Dropout).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``.

    Examples::

        >>> q, k, v = (torch.randn(1, 4, 256, 64) for _ in range(3))
        >>> causal = attnkit.mods.causal()
        >>> block_mask = attnkit.create_block_mask(causal, None, None, 256, 256, block_size=64, device="cpu")
        >>> slopes = attnkit.mods.alibi_slopes(4)
        >>> out = attnkit.flex_attention(q, k, v, score_mod=attnkit.mods.alibi(slopes), block_mask=block_mask)
        >>> out.shape
        torch.Size([1, 4, 256, 64])
        >>> cu = torch.tensor([0, 100, 256], dtype=torch.int32)  # two sequences packed along N
        >>> per_sequence = torch.rand(2, 4)  # ALiBi slopes (S, Hq): b is the sequence index
        >>> out = attnkit.flex_attention(q, k, v, score_mod=attnkit.mods.alibi(per_sequence), mask_mod=causal,
        ...                              cu_seqlens_q=cu, cu_seqlens_k=cu)
        >>> out.shape
        torch.Size([1, 4, 256, 64])
    """
    return attention(q, k, v, "flex", backend, score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask,
                     scale=scale, softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                     dropout_p=dropout_p, return_lse=return_lse, layout=layout)


def _slopes(*shape: int):
    return lambda g: 0.3 + torch.rand(*shape, generator=g, dtype=torch.float64)


def _table(*shape: int):
    return lambda g: 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)


def _docs(*lengths: int):
    return lambda g: torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def examples() -> list[Case]:
    from .. import mods

    def document_mask(t: dict[str, torch.Tensor], n: int, block: int) -> dict[str, Any]:
        mask = mods.and_masks(mods.causal(), mods.document(t["docs"]))
        return {"block_mask": create_block_mask(mask, None, None, n, n, block_size=block, device=t["docs"].device)}

    return [
        Case((1, 4, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32), tensors={"slopes": _slopes(4)},
             build=lambda t: {"score_mod": mods.alibi(t["slopes"]), "mask_mod": mods.causal()},
             name="alibi_causal_gqa_learnable"),
        Case((1, 2, 100, 40), (1, 2, 100, 40), (1, 2, 100, 40), tensors={"docs": _docs(21, 40, 7, 32)},
             build=lambda t: document_mask(t, 100, 32), name="document_in_block_boundaries_d40"),
        Case((2, 2, 45, 16), (2, 1, 61, 16), (2, 1, 61, 24), tensors={"table": _table(2, 32)},
             build=lambda t: {"score_mod": mods.relative_position_bias(t["table"], bidirectional=False),
                              "mask_mod": mods.causal()}, name="t5_decoder_nq<nk_mqa_learnable"),
        Case((1, 2, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16), {"softcap": 4.0}, tensors={"bias": _table(1, 2, 33)},
             build=lambda t: {"score_mod": mods.chain_score_mods(mods.key_bias(t["bias"]), mods.softcap(2.0)),
                              "mask_mod": mods.prefix_lm(9)}, name="key_bias_then_softcap_prefix_lm"),
        # packed: one row of learnable slopes per sequence (b = the sequence), causal per sequence
        Case((1, 4, 41, 32), (1, 2, 62, 32), (1, 2, 62, 24),
             tensors={"slopes": _slopes(4, 4), "cu_seqlens_q": packed_offsets(17, 0, 23, 1),
                      "cu_seqlens_k": packed_offsets(20, 3, 38, 1)},
             build=lambda t: {"score_mod": mods.alibi(t["slopes"]), "mask_mod": mods.causal(),
                              "cu_seqlens_q": t["cu_seqlens_q"], "cu_seqlens_k": t["cu_seqlens_k"]},
             name="varlen_alibi_per_sequence_causal_gqa"),
        Case((1, 4, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32), {"dropout_p": 0.3}, tensors={"slopes": _slopes(4)},
             build=lambda t: {"score_mod": mods.alibi(t["slopes"]), "mask_mod": mods.causal()},
             name="dropout_alibi_causal_gqa_learnable"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    """Causal attention over three packed documents (boundaries inside tiles) with ALiBi."""
    from .. import mods

    block = 64 if seqlen >= 256 else 32
    lengths = [seqlen // 5 + 3, seqlen // 2 - 5]
    lengths.append(seqlen - sum(lengths))

    def build(t: dict[str, torch.Tensor]) -> dict[str, Any]:
        mask = mods.and_masks(mods.causal(), mods.document(t["docs"]))
        return {"score_mod": mods.alibi(t["slopes"]),
                "block_mask": create_block_mask(mask, None, None, seqlen, seqlen, block_size=block,
                                                device=t["docs"].device)}

    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, tensors={"docs": _docs(*lengths), "slopes": _slopes(heads)}, build=build,
                name=f"document_alibi_n{seqlen}")


VARIANT = softmax_variant(
    "flex", reference=flex_reference, kernel=flex_kernel, torch_impl=flex_torch,
    options={"mask_mod": None, "block_mask": None, "cu_seqlens_q": None, "cu_seqlens_k": None, "dropout_p": 0.0},
    validate=_validate,

    kernel_support=_kernel_support,
    examples=examples, demo=demo,
    doc="FlexAttention's interface: score_mod, mask_mod, block_mask (exact token masks), varlen with mods")

__all__ = ["create_block_mask", "flex_attention", "flex_kernel", "flex_reference"]
