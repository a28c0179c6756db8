"""The moba variant: Mixture of Block Attention (Lu et al., 2025), causal.

Keys are cut into blocks of ``block_size``. Each query attends its own block
(causally) plus the top-(top_k - 1) past blocks ranked by q . mean(K_block) (gate
in float32) among the blocks that lie wholly before its own block. Selection is
per query token and is not differentiated; gradients flow to q, k, v through the
attention.

Kernel path (all on the GPU, no host round trip but one to size the lists):
Triton pools the complete key blocks and picks each row's top blocks into a
selection table (B, Hq, Nq, slots); for every query tile of the engine's block
lists the union of its rows' selected blocks and own blocks is listed (blocks that
every row selected are "full" and skip the mask), and the engine's token mask reads
the selection table, so each token sees exactly its own selection.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checks import Shapes, check_flag, check_int, check_qkv, check_scale
from ..dispatch import attention
from ..engine import Schedule, fused_attention, head_dim_blockers, make_block_lists
from ..registry import Case, Variant, register_variant
from .reference import moba_reference
from .variant import fixed_tile

OPTIONS: Dict[str, Any] = dict(block_size=None, top_k=None, scale=None, return_lse=False)
#: query rows per tile of the engine's lists: the union of these rows' selections is visited
LIST_BLOCK_Q = 64


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    if options["block_size"] is None:
        raise TypeError("block_size is required: the number of keys per MoBA block (an int >= 1)")
    if options["top_k"] is None:
        raise TypeError("top_k is required: the number of blocks each query attends, its own included (int >= 1)")
    check_int("block_size", options["block_size"], minimum=1)
    check_int("top_k", options["top_k"], minimum=1)
    check_scale(options["scale"], shapes.head_dim)
    check_flag("return_lse", options["return_lse"])
    return shapes


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    return head_dim_blockers(q, v)


def moba_select(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int) -> torch.Tensor:
    """Each query row's selected past blocks, computed by the Triton gate.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> int32 (B, Hq, Nq, slots), slots =
    max(1, min(top_k - 1, Nk // block_size)); best block first, -1 where fewer are
    eligible. Same selection as :func:`attnkit.block_sparse.reference.moba_gate`.
    """
    from ..kernels import moba as kernels
    from ..kernels.common import block_dim

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    n_blocks = Nk // block_size
    n_pick = min(top_k - 1, n_blocks)
    sel = torch.full((B, Hq, Nq, max(1, n_pick)), -1, dtype=torch.int32, device=q.device)
    if n_pick == 0:
        return sel
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        pooled = torch.empty((B, Hkv, n_blocks, D), dtype=torch.float32, device=q.device)
        block_d = block_dim(D)
        kernels.moba_pool_kernel[(n_blocks, B * Hkv)](
            k, pooled, *k.stride()[:3], *pooled.stride()[:3], Hkv, block_size,
            HEAD_DIM=D, BLOCK_D=block_d, CHUNK=32)
        rows = 32
        kernels.moba_select_kernel[(-(-Nq // rows), B * Hq)](
            q, pooled, sel, *q.stride()[:3], *pooled.stride()[:3], *sel.stride()[:3],
            Hq, Hq // Hkv, Nq, Nk, block_size, n_blocks, n_pick,
            HEAD_DIM=D, BLOCK_D=block_d, ROWS=rows, BLOCK_NB=32 if block_d <= 128 else 16)
    return sel


def list_block_sizes(block_size: int) -> Tuple[int, int]:
    """(BQ, BK) of the engine's lists: BQ query rows per tile; BK the largest of 128/64/32/16
    dividing block_size (then a listed key block lies inside one MoBA block), else 16."""
    tile = fixed_tile()
    min_m, min_n = (tile["BLOCK_M"], tile["BLOCK_N"]) if tile is not None else (16, 16)
    bq = max(LIST_BLOCK_Q, min_m)
    for bk in (128, 64, 32, 16):
        if bk >= min_n and block_size % bk == 0:
            return bq, bk
    return bq, max(16, min_n)


def moba_tiles(sel: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: int, bq: int, bk: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, Hq, R, C) full and partial tiles of query blocks of ``bq`` rows x key blocks of ``bk``.

    A tile is listed when some row of the query block selected, or owns, a MoBA
    block overlapping the key block. It is full (no token mask needed) when the key
    block lies inside one MoBA block that every row of the query block selected.
    """
    B, Hq, Nq, slots = sel.shape
    dev = sel.device
    rows, cols = -(-seqlen_q // bq), -(-seqlen_k // bk)
    n_moba = -(-seqlen_k // block_size)  # MoBA blocks, the last one possibly short
    offset = seqlen_k - seqlen_q
    # how many rows of each query tile selected each MoBA block
    padded = torch.nn.functional.pad(sel, (0, 0, 0, rows * bq - Nq), value=-1).view(B, Hq, rows, bq * slots)
    target = torch.where(padded < 0, torch.full_like(padded, n_moba), padded).long()
    hits = torch.zeros(B, Hq, rows, n_moba + 1, dtype=torch.int32, device=dev)
    hits.scatter_add_(-1, target, torch.ones_like(target, dtype=torch.int32))
    hits = hits[..., :n_moba]
    n_rows = torch.clamp(seqlen_q - torch.arange(rows, device=dev) * bq, max=bq)
    # own blocks of the tile's rows: from the first row's block to the last row's (rows before key 0 own none)
    first_pos = torch.arange(rows, device=dev) * bq + offset
    last_pos = torch.clamp(torch.arange(rows, device=dev) * bq + bq, max=seqlen_q) - 1 + offset
    own_lo = torch.div(torch.clamp(first_pos, min=0), block_size, rounding_mode="floor")
    own_hi = torch.where(last_pos >= 0, torch.div(torch.clamp(last_pos, min=0), block_size, rounding_mode="floor"),
                         torch.full_like(last_pos, -1))
    moba = torch.arange(n_moba, device=dev)
    own = (moba[None, :] >= own_lo[:, None]) & (moba[None, :] <= own_hi[:, None])       # (R, NB)
    moba_full = (hits == n_rows[:, None]) & ~own
    moba_any = (hits > 0) | own
    key_first = torch.arange(cols, device=dev) * bk
    lo = torch.div(key_first, block_size, rounding_mode="floor")
    hi = torch.div(torch.clamp(key_first + bk, max=seqlen_k) - 1, block_size, rounding_mode="floor")
    if block_size % bk == 0:  # each key block lies in one MoBA block
        return moba_full[..., lo], moba_any[..., lo] & ~moba_full[..., lo]
    listed = torch.zeros(B, Hq, rows, cols, dtype=torch.bool, device=dev)
    for t in range(-(-bk // block_size) + 1):  # the MoBA blocks lo .. hi overlapping each key block
        listed |= moba_any[..., torch.minimum(lo + t, hi)]
    return torch.zeros_like(listed), listed


def moba_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
                scale: Optional[float] = None, return_lse: bool = False):
    """The Triton path of :func:`moba_attention` (same arguments, no dispatch)."""
    from ..kernels import moba as kernels

    Nq, Nk = q.shape[2], k.shape[2]
    sel = moba_select(q, k, block_size, top_k)
    bq, bk = list_block_sizes(block_size)
    full, part = moba_tiles(sel, Nq, Nk, block_size, bq, bk)
    lists = make_block_lists(bq, bk, full, part)
    schedule = Schedule(mask=kernels.moba_mask, lists=lists,
                        args=(sel, sel.stride(0), sel.stride(1), block_size, sel.shape[-1]))
    out, lse = fused_attention(q, k, v, schedule, sm_scale=check_scale(scale, q.shape[-1]))
    return (out, lse) if return_lse else out


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
                   scale: Optional[float] = None, return_lse: bool = False, backend: str = "auto"):
    """MoBA: causal attention to the own block plus the top-(top_k - 1) gated past blocks.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv); Hkv divides Hq (GQA:
            query head h gates and attends over kv head h // (Hq // Hkv)).
        block_size: keys per block (>= 1); block c holds keys [c*block_size, (c+1)*block_size).
        top_k: blocks per query, its own block included (>= 1). Query i (key position
            p = i + Nk - Nq, bottom-right causal) attends keys j <= p of block p // block_size
            and every key of the top_k - 1 complete blocks c < p // block_size with the
            largest gate q_i . mean(K_c), computed in float32 (ties: lower c first).
            top_k = 1 is causal attention inside each block; top_k >= the number of blocks
            is full causal attention.
        scale: score scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log.
        backend: "auto", "triton" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``. A query with
        p < 0 (Nq > Nk) sees nothing: out 0, lse -inf. Gradients reach q, k and v through
        the attention; the block selection is not differentiated.
    """
    return attention(q, k, v, "moba", backend, block_size=block_size, top_k=top_k, scale=scale,
                     return_lse=return_lse)


def examples() -> List[Case]:
    return [
        Case((1, 2, 100, 32), (1, 2, 100, 32), (1, 2, 100, 32), {"block_size": 16, "top_k": 3}, name="bs16_top3"),
        Case((1, 4, 90, 40), (1, 2, 90, 40), (1, 2, 90, 24), {"block_size": 24, "top_k": 2}, name="gqa_bs24_d40"),
        Case((1, 2, 40, 32), (1, 2, 130, 32), (1, 2, 130, 32), {"block_size": 32, "top_k": 2},
             name="nq<nk_bs32"),
        Case((1, 2, 70, 16), (1, 1, 50, 16), (1, 1, 50, 16), {"block_size": 16, "top_k": 2, "scale": 0.5},
             name="nq>nk_empty_rows_mqa"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    block = max(16, seqlen // 16)
    return Case(shape, shape, shape, {"block_size": block, "top_k": 3}, name=f"moba_n{seqlen}_b{block}")


VARIANT = register_variant(Variant(
    name="moba",
    reference=moba_reference,
    kernel=moba_kernel,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="MoBA: causal top-k block gating (fp32 gate over mean-pooled key blocks), per-token selection",
    demo=demo,
))
