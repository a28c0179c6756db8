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

Packed variable-length batches (``cu_seqlens_q/k``, B = 1) are the engine's: the gate,
the table (S, Hq, max Nq, slots) and the lists (S, Hq, ...) are per sequence, with
blocks that start at each sequence's first key, so a packed call is its sequences run
one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checks import (
    Shapes,
    check_dropout,
    check_flag,
    check_int,
    check_qkv,
    check_scale,
    check_varlen,
)
from ..dispatch import attention
from ..dropout import Dropout
from ..engine import Schedule, fused_attention, head_dim_blockers, make_block_lists
from ..registry import Case, Variant, packed_offsets, register_variant
from .reference import moba_reference
from .torch_backend import moba_torch
from .variant import fixed_tile

OPTIONS: dict[str, Any] = {"block_size": None, "top_k": None, "scale": None, "cu_seqlens_q": None,
                           "cu_seqlens_k": None, "dropout_p": 0.0, "return_lse": False}
#: query rows per tile of the engine's lists: the union of these rows' selections is visited
LIST_BLOCK_Q = 64


def validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    if options["block_size"] is None:
        raise TypeError("block_size is required: the number of keys per MoBA block (an int >= 1)")
    if options["top_k"] is None:
        raise TypeError("top_k is required: the number of blocks each query attends, its own included (int >= 1)")
    check_int("block_size", options["block_size"], minimum=1)
    check_int("top_k", options["top_k"], minimum=1)
    check_scale(options["scale"], shapes.head_dim)
    check_dropout(options["dropout_p"])
    check_flag("return_lse", options["return_lse"])
    check_varlen(shapes, options["cu_seqlens_q"], options["cu_seqlens_k"], q.device)
    return shapes


def kernel_support(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    return head_dim_blockers(q, v)


def sequence_lengths(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
                     cu_seqlens_k: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """(query lengths, key lengths) of every batch entry, or of every sequence of a packed batch."""
    if cu_seqlens_q is None:
        return [q.shape[2]] * q.shape[0], [k.shape[2]] * k.shape[0]
    return (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()


def moba_select(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int,
                cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """Each query row's selected past blocks, computed by the Triton gate.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> int32 (B, Hq, Nq, slots), slots =
    max(1, min(top_k - 1, Nk // block_size)); best block first, -1 where fewer are
    eligible. Same selection as :func:`attnkit.block_sparse.reference.moba_gate`.
    A packed batch (B = 1, ``cu_seqlens_q/k`` (S + 1,)) gives (S, Hq, max Nq, slots)
    over the longest sequences: row i of sequence s is its i-th query, block c its keys
    [c * block_size, (c + 1) * block_size) from its first key; rows past its length stay -1.
    """
    from ..kernels import moba as kernels
    from ..kernels.common import block_dim

    lengths_q, lengths_k = sequence_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    entries, Hq, D = len(lengths_q), q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    n_blocks = max_k // block_size
    n_pick = min(top_k - 1, n_blocks)
    sel = torch.full((entries, Hq, max_q, max(1, n_pick)), -1, dtype=torch.int32, device=q.device)
    if n_pick == 0 or max_q == 0:
        return sel
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        pooled = torch.empty((entries, Hkv, n_blocks, D), dtype=torch.float32, device=q.device)
        block_d = block_dim(D)
        varlen = cu_seqlens_q is not None
        kernels.moba_pool_kernel[(n_blocks, entries * Hkv)](
            k, pooled, cu_seqlens_q, cu_seqlens_k, *k.stride()[:3], *pooled.stride()[:3], Hkv, k.shape[2],
            block_size, VARLEN=varlen, HEAD_DIM=D, BLOCK_D=block_d, CHUNK=32)
        rows = 32
        kernels.moba_select_kernel[(-(-max_q // rows), entries * Hq)](
            q, pooled, sel, cu_seqlens_q, cu_seqlens_k, *q.stride()[:3], *pooled.stride()[:3], *sel.stride()[:3],
            Hq, Hq // Hkv, q.shape[2], k.shape[2], block_size, top_k,
            VARLEN=varlen, HEAD_DIM=D, BLOCK_D=block_d, ROWS=rows, BLOCK_NB=32 if block_d <= 128 else 16)
    return sel


def list_block_sizes(block_size: int) -> tuple[int, int]:
    """(BQ, BK) of the engine's lists: BQ query rows per tile; BK the largest of 128/64/32/16
    dividing block_size (then a listed key block lies inside one MoBA block), else 16."""
    tile = fixed_tile()
    min_m, min_n = (tile["BLOCK_M"], tile["BLOCK_N"]) if tile is not None else (16, 16)
    bq = max(LIST_BLOCK_Q, min_m)
    for bk in (128, 64, 32, 16):
        if bk >= min_n and block_size % bk == 0:
            return bq, bk
    return bq, max(16, min_n)


def moba_tiles(sel: torch.Tensor, seqlen_q: int | Sequence[int], seqlen_k: int | Sequence[int], block_size: int,
               bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, Hq, R, C) full and partial tiles of query blocks of ``bq`` rows x key blocks of ``bk``.

    ``sel`` is :func:`moba_select`'s table (B, Hq, Nq, slots); ``seqlen_q``/``seqlen_k`` the
    lengths, one for all entries or one per entry (the sequences of a packed batch); R and
    C cover the longest. A tile is listed when some row of the query block selected, or
    owns, a MoBA block overlapping the key block. It is full (no token mask needed) when
    the key block lies inside one MoBA block that every row of the query block selected.
    """
    B, Hq, Nq, slots = sel.shape
    dev = sel.device
    lengths_q = [seqlen_q] * B if isinstance(seqlen_q, int) else list(seqlen_q)
    lengths_k = [seqlen_k] * B if isinstance(seqlen_k, int) else list(seqlen_k)
    max_k = max(lengths_k, default=0)
    len_q = torch.tensor(lengths_q, device=dev)[:, None]                       # (B, 1)
    len_k = torch.tensor(lengths_k, device=dev)[:, None]
    rows, cols = -(-Nq // bq), -(-max_k // bk)
    n_moba = -(-max_k // block_size)  # MoBA blocks of the longest keys, each sequence's last one possibly short
    # how many rows of each query tile selected each MoBA block (rows past a sequence's end select none)
    padded = torch.nn.functional.pad(sel, (0, 0, 0, rows * bq - Nq), value=-1).view(B, Hq, rows, bq * slots)
    target = torch.where(padded < 0, torch.full_like(padded, n_moba), padded).long()
    hits = torch.zeros(B, Hq, rows, n_moba + 1, dtype=torch.int32, device=dev)
    hits.scatter_add_(-1, target, torch.ones_like(target, dtype=torch.int32))
    hits = hits[..., :n_moba]
    first_row = torch.arange(rows, device=dev) * bq
    n_rows = torch.clamp(len_q - first_row, min=0, max=bq)                     # (B, R): 0 past the sequence
    # own blocks of the tile's rows: from the first row's block to the last row's (rows before key 0 own none)
    first_pos = first_row + len_k - len_q
    last_pos = first_pos + n_rows - 1
    own_lo = torch.div(torch.clamp(first_pos, min=0), block_size, rounding_mode="floor")
    own_hi = torch.where(last_pos >= 0, torch.div(torch.clamp(last_pos, min=0), block_size, rounding_mode="floor"),
                         torch.full_like(last_pos, -1))
    moba = torch.arange(n_moba, device=dev)
    has_rows = (n_rows > 0)[:, None, :, None]                                    # (B, 1, R, 1)
    own = (moba >= own_lo[..., None]) & (moba <= own_hi[..., None])             # (B, R, NB)
    own = own[:, None] & has_rows
    moba_full = (hits == n_rows[:, None, :, None]) & ~own & has_rows
    moba_any = (hits > 0) | own
    key_first = torch.arange(cols, device=dev) * bk
    lo = torch.div(key_first, block_size, rounding_mode="floor")
    if block_size % bk == 0:  # each key block lies in one MoBA block
        return moba_full[..., lo], moba_any[..., lo] & ~moba_full[..., lo]
    # the MoBA blocks lo .. hi overlapping each key block, hi per entry; past an entry's keys none
    hi = torch.div(torch.minimum(key_first + bk, len_k) - 1, block_size, rounding_mode="floor")    # (B, C)
    listed = torch.zeros(B, Hq, rows, cols, dtype=torch.bool, device=dev)
    for t in range(-(-bk // block_size) + 1):
        index = torch.minimum(lo + t, hi).clamp(min=0)[:, None, None, :].expand(B, Hq, rows, cols)
        listed |= torch.gather(moba_any, -1, index)
    listed &= (key_first < len_k)[:, None, None, :]
    return torch.zeros_like(listed), listed


def moba_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
                scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False):
    """The Triton path of :func:`moba_attention` (same arguments, no dispatch)."""
    from ..kernels import moba as kernels

    lengths_q, lengths_k = sequence_lengths(q, k, cu_seqlens_q, cu_seqlens_k)
    sel = moba_select(q, k, block_size, top_k, cu_seqlens_q, cu_seqlens_k)
    bq, bk = list_block_sizes(block_size)
    full, part = moba_tiles(sel, lengths_q, lengths_k, block_size, bq, bk)
    lists = make_block_lists(bq, bk, full, part)
    schedule = Schedule(mask=kernels.moba_mask, lists=lists,
                        args=(sel, sel.stride(0), sel.stride(1), block_size, sel.shape[-1]))
    out, lse = fused_attention(q, k, v, schedule, sm_scale=check_scale(scale, q.shape[-1]),
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k),
                               dropout=Dropout.draw(dropout_p, q.device))
    return (out, lse) if return_lse else out


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
                   scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                   cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False,
                   backend: str = "auto", layout: str = "bhsd"):
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
        cu_seqlens_q, cu_seqlens_k: (S + 1,) int32 offsets of S sequences packed along N
            (B must be 1), as :func:`attnkit.flash_attention`'s. Each sequence is a MoBA
            problem of its own: its blocks start at its first key (the last one possibly
            short), its gate ranks only its own blocks and its positions (Nq, Nk,
            bottom-right) are its own, so the result equals the sequences run one by one.
        dropout_p: attention dropout probability in [0, 1), as FlashAttention's: attended
            probabilities are dropped with probability p, the kept ones scaled by
            1 / (1 - p), before they multiply v (the gate is not dropped); the mask is drawn
            from torch's default generator of q's device (docs/flash.md, Dropout).
        return_lse: also return the log-sum-exp (B, Hq, Nq), float32, natural log.
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), k/v (B, Nk, Hkv, D) and out
            (B, Nq, Hq, Dv) (flash-attn's layout); read without a copy. The LSE stays
            (B, Hq, Nq), as flash-attn's (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, lse) with ``return_lse``. A query with
        p < 0 (Nq > Nk) sees nothing: out 0, lse -inf. Gradients reach q, k and v through
        the attention; the block selection is not differentiated.

    Examples::

        >>> q = torch.randn(1, 4, 256, 64); k = torch.randn(1, 2, 256, 64); v = torch.randn(1, 2, 256, 64)
        >>> attnkit.moba_attention(q, k, v, block_size=64, top_k=2).shape
        torch.Size([1, 4, 256, 64])
        >>> cu = torch.tensor([0, 100, 256], dtype=torch.int32)  # two sequences: 100 and 156 tokens
        >>> out, lse = attnkit.moba_attention(q, k, v, block_size=64, top_k=2, cu_seqlens_q=cu, cu_seqlens_k=cu,
        ...                                   return_lse=True)
        >>> lse.shape
        torch.Size([1, 4, 256])
    """
    return attention(q, k, v, "moba", backend, block_size=block_size, top_k=top_k, scale=scale,
                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p, return_lse=return_lse,
                     layout=layout)


def examples() -> list[Case]:
    return [
        Case((1, 2, 100, 32), (1, 2, 100, 32), (1, 2, 100, 32), {"block_size": 16, "top_k": 3}, name="bs16_top3"),
        Case((1, 4, 90, 40), (1, 2, 90, 40), (1, 2, 90, 24), {"block_size": 24, "top_k": 2}, name="gqa_bs24_d40"),
        Case((1, 2, 40, 32), (1, 2, 130, 32), (1, 2, 130, 32), {"block_size": 32, "top_k": 2},
             name="nq<nk_bs32"),
        Case((1, 2, 70, 16), (1, 1, 50, 16), (1, 1, 50, 16), {"block_size": 16, "top_k": 2, "scale": 0.5},
             name="nq>nk_empty_rows_mqa"),
        # packed: per sequence Nq <= Nk, a sequence with keys and no query, blocks restarting at each
        Case((1, 4, 48, 32), (1, 2, 74, 32), (1, 2, 74, 32), {"block_size": 16, "top_k": 2},
             {"cu_seqlens_q": packed_offsets(17, 0, 30, 1), "cu_seqlens_k": packed_offsets(20, 3, 50, 1)},
             name="varlen_gqa_bs16"),
        Case((1, 4, 48, 32), (1, 2, 74, 32), (1, 2, 74, 32), {"block_size": 16, "top_k": 2, "dropout_p": 0.3},
             {"cu_seqlens_q": packed_offsets(17, 0, 30, 1), "cu_seqlens_k": packed_offsets(20, 3, 50, 1)},
             name="dropout_varlen_gqa_bs16"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    block = max(16, seqlen // 16)
    return Case(shape, shape, shape, {"block_size": block, "top_k": 3}, name=f"moba_n{seqlen}_b{block}")


VARIANT = register_variant(Variant(
    name="moba",
    reference=moba_reference,
    kernel=moba_kernel,
    torch_impl=moba_torch,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="MoBA: causal top-k block gating (fp32 gate over mean-pooled key blocks), per-token selection",
    demo=demo,
))
