"""The block_sparse variant: softmax attention over the tiles a :class:`BlockMask` lists.

Runs on the shared fused engine in list mode: the mask's lists become the engine's
``BlockLists`` (split into full and partial tiles when causal), so the kernel loads
only listed key blocks, forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import (
    Shapes,
    check_dropout,
    check_flag,
    check_qkv,
    check_scale,
    check_softcap,
)
from ..dispatch import attention, triton_import_error
from ..dropout import Dropout
from ..engine import Schedule, fused_attention, head_dim_blockers
from ..mods import MaskMod, ScoreMod, and_masks
from ..registry import Case, Variant, register_variant
from .block_mask import BlockMask
from .reference import block_sparse_mods, block_sparse_reference
from .torch_backend import block_sparse_torch

OPTIONS: dict[str, Any] = {"block_mask": None, "causal": False, "scale": None, "softcap": None, "score_mod": None,
                           "mask_mod": None, "dropout_p": 0.0, "return_lse": False}
#: the engine's smallest kernel tile; list block sizes must be multiples of it
KERNEL_TILE = 16


def check_block_mask(block_mask: Any, shapes: Shapes) -> BlockMask:
    """The block mask fits q and k: a BlockMask whose batch/head dims are 1 or (B, Hq)
    and whose seq_lens are (Nq, Nk)."""
    if block_mask is None:
        raise TypeError("block_mask is required: pass an attnkit.BlockMask (see BlockMask.from_dense, "
                        "BlockMask.from_mask_fn, attnkit.patterns)")
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be an attnkit.BlockMask, got {type(block_mask).__name__} "
                        "(convert a torch FlexAttention BlockMask with attnkit.BlockMask.from_torch)")
    bm, hm, _, _ = block_mask.shape
    if bm not in (1, shapes.batch):
        raise ValueError(f"block_mask has batch dim {bm}; it must be 1 or the batch size {shapes.batch}")
    if hm not in (1, shapes.heads_q):
        raise ValueError(f"block_mask has head dim {hm}; it must be 1 or the number of query heads {shapes.heads_q}")
    if tuple(block_mask.seq_lens) != (shapes.seqlen_q, shapes.seqlen_k):
        raise ValueError(f"block_mask was built for seq_lens (Nq, Nk) = {tuple(block_mask.seq_lens)} with block_size "
                         f"{block_mask.block_size}, but q has Nq = {shapes.seqlen_q} and k has Nk = {shapes.seqlen_k}")
    return block_mask


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_block_mask(options["block_mask"], shapes)
    check_flag("causal", options["causal"])
    check_flag("return_lse", options["return_lse"])
    check_scale(options["scale"], shapes.head_dim)
    check_softcap(options["softcap"])
    check_dropout(options["dropout_p"])
    block_sparse_mods(q, k, options["block_mask"], options["score_mod"], options["mask_mod"])
    return shapes


def fixed_tile(list_block: tuple[int, int] | None = None) -> dict[str, int] | None:
    """The engine's fixed kernel tile (the interpreter's, or force_config's), or None when it
    autotunes. ``list_block``: the (BQ, BK) of a list schedule, which the interpreter's tile
    shrinks to divide (a forced tile does not)."""
    from ..kernels.engine import configs

    return configs.fixed_config(list_block)


def list_tile_blockers(block_mask: BlockMask) -> list[str]:
    """Reasons the engine's list mode cannot take this mask's block sizes (empty if it can)."""
    reasons = []
    bq, bk = block_mask.block_size
    if bq % KERNEL_TILE or bk % KERNEL_TILE:
        reasons.append(f"block_mask.block_size {(bq, bk)}: the kernel needs block sizes that are multiples of "
                       f"{KERNEL_TILE} (the smallest kernel tile)")
    elif not triton_import_error():  # without triton the dispatcher reports that; the tiles need it
        tile = fixed_tile((bq, bk))
        if tile is not None and (bq % tile["BLOCK_M"] or bk % tile["BLOCK_N"]):
            reasons.append(f"block_mask.block_size {(bq, bk)} is not a multiple of the fixed kernel tile "
                           f"(BLOCK_M={tile['BLOCK_M']}, BLOCK_N={tile['BLOCK_N']}); pick another with "
                           "attnkit.extension.force_config")
    return reasons


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    return head_dim_blockers(q, v) + list_tile_blockers(options["block_mask"])


def block_sparse_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask,
                        causal: bool = False, scale: float | None = None, softcap: float | None = None,
                        score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
                        dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`block_sparse_attention` (same arguments, no dispatch)."""
    from ..kernels import block_sparse as kernels

    block_mask = block_mask.to(q.device)
    score, own_mask, extra_mask = block_sparse_mods(q, k, block_mask, score_mod, mask_mod)
    token_masks = [m for m in (own_mask, extra_mask) if m is not None]
    schedule = Schedule(mask=kernels.block_sparse_causal_mask if causal else None,
                        lists=block_mask.engine_lists(causal, masked=extra_mask is not None))
    # full tiles of a block mask are whole by definition: its mask_mod (and an explicit one,
    # which turns every listed tile partial) runs in partial tiles only
    out, lse = fused_attention(q, k, v, schedule, sm_scale=check_scale(scale, q.shape[-1]), softcap=softcap,
                               score_mod=score, mask_mod=and_masks(*token_masks) if token_masks else None,
                               mask_mod_in_full_blocks=False, dropout=Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *,
                           causal: bool = False, scale: float | None = None, softcap: float | None = None,
                           score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
                           dropout_p: float = 0.0, return_lse: bool = False, backend: str = "auto",
                           layout: str = "bhsd"):
    """Softmax attention over the tiles of a block mask.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq (GQA/MQA).
        block_mask: an :class:`attnkit.BlockMask` with seq_lens (Nq, Nk), block_size
            (BQ, BK) and batch/head dims 1 or (B, Hq). Query block r (rows
            [r*BQ, r*BQ + BQ)) attends every key of each key block it lists.
        causal: also apply the bottom-right causal mask (query i sees keys
            j <= i + Nk - Nq) inside the listed tiles.
        scale: score scale, default 1/sqrt(D).
        softcap: if set, scores s become softcap * tanh(s / softcap) (after scaling).
        score_mod: an :class:`attnkit.ScoreMod` applied to every computed score after the
            softcap; see docs/mods.md.
        mask_mod: an :class:`attnkit.MaskMod` intersected with the block mask (and with its
            own mask_mod, if it carries one): every listed tile is then computed with it.
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: computed
            probabilities are dropped with probability p, the kept ones scaled by
            1 / (1 - p), before they multiply v; the mask is drawn from torch's default
            generator of q's device (docs/flash.md, Dropout).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log.
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) and out
            (B, Nq, Hq, Dv) (flash-attn's layout); read without a copy. The LSE stays
            (B, Hq, Nq), as flash-attn's (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``). The kernel
            needs block sizes that are multiples of 16; auto falls back to the
            reference otherwise.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``. A query
        that sees no key has out 0 and lse -inf (and zero gradients).
    """
    return attention(q, k, v, "block_sparse", backend, block_mask=block_mask, causal=causal, scale=scale,
                     softcap=softcap, score_mod=score_mod, mask_mod=mask_mod, dropout_p=dropout_p,
                     return_lse=return_lse, layout=layout)


def _random_mask(batch: int, heads: int, nq: int, nk: int, block_size, density: float, seed: int,
                 empty_rows: bool = False) -> BlockMask:
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    rows, cols = -(-nq // bq), -(-nk // bk)
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, heads, rows, cols, generator=g) < density
    if empty_rows:
        dense[..., 0, :] = False
    return BlockMask.from_dense(dense, (bq, bk), (nq, nk))


def examples() -> list[Case]:
    return [
        Case((1, 2, 100, 32), (1, 2, 100, 32), (1, 2, 100, 32),
             {"block_mask": _random_mask(1, 2, 100, 100, 32, 0.5, seed=1)}, name="random_per_head"),
        Case((2, 2, 70, 40), (2, 1, 90, 40), (2, 1, 90, 24),
             {"block_mask": _random_mask(1, 1, 70, 90, (32, 16), 0.6, seed=2), "causal": True},
             name="causal_gqa_nonsquare_nq<nk_d40"),
        Case((1, 2, 96, 16), (1, 1, 64, 16), (1, 1, 64, 16),
             {"block_mask": _random_mask(1, 2, 96, 64, (32, 32), 0.7, seed=3, empty_rows=True), "causal": True},
             name="empty_rows_nq>nk_mqa"),
        Case((1, 1, 64, 64), (1, 1, 80, 64), (1, 1, 80, 64),
             {"block_mask": _random_mask(1, 1, 64, 80, 32, 0.6, seed=4), "softcap": 2.5, "scale": 0.2},
             name="softcap_scale"),
        Case((1, 2, 70, 32), (1, 1, 90, 32), (1, 1, 90, 32),
             {"block_mask": _random_mask(1, 2, 70, 90, (32, 16), 0.6, seed=5), "causal": True, "dropout_p": 0.3},
             name="dropout_causal_gqa"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    from .patterns import local_global_random

    shape = (batch, heads, seqlen, head_dim)
    block = 64 if seqlen >= 256 else 32
    mask = local_global_random(seqlen, block, window=1, global_blocks=1, random_blocks=1)
    return Case(shape, shape, shape, {"block_mask": mask}, name=f"bigbird_n{seqlen}")


VARIANT = register_variant(Variant(
    name="block_sparse",
    reference=block_sparse_reference,
    kernel=block_sparse_kernel,
    torch_impl=block_sparse_torch,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="block-sparse softmax attention over a FlexAttention-style BlockMask (list mode of the engine)",
    demo=demo,
))
