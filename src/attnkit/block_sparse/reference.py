"""PyTorch references of block-sparse attention and MoBA.

Both run one query block (or chunk) at a time. block_sparse gathers only the key
blocks its mask lists for that query block, so memory follows the listed tiles,
never Nq x Nk; MoBA keeps a (chunk x Nk) token mask per step, like the flash
reference, plus the (chunk x blocks) gate scores.
"""

from __future__ import annotations

import torch

from .._reference import (
    bind_score_mod,
    bottom_right,
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    map_sequences,
    mod_positions,
    softmax_attend,
)
from ..checks import check_scale
from ..dropout import Dropout, bind_dropout
from ..mods import MaskMod, Problem, ScoreMod
from ..mods.core import check_mask_mod, check_score_mod
from .block_mask import BlockMask


def block_sparse_mods(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, score_mod: ScoreMod | None,
                      mask_mod: MaskMod | None):
    """(score mod, the block mask's own mask_mod, the explicit mask_mod) specialized to the call."""
    if score_mod is None and mask_mod is None and block_mask.mask_mod is None:
        return None, None, None
    problem = Problem.of("block_sparse", q, k)
    return (check_score_mod("score_mod", score_mod, problem),
            check_mask_mod("block_mask.mask_mod", block_mask.mask_mod, problem),
            check_mask_mod("mask_mod", mask_mod, problem))


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask,
                           causal: bool = False, scale: float | None = None, softcap: float | None = None,
                           score_mod: ScoreMod | None = None, mask_mod: MaskMod | None = None,
                           dropout_p: float = 0.0, return_lse: bool = False):
    """Block-sparse softmax attention, in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. Query block r (rows r*BQ ... r*BQ + BQ - 1) attends the keys
    of the key blocks ``block_mask`` lists for it (per batch entry and head, or shared
    when the mask's dim is 1): every key of a full tile, and in a partial tile the keys
    the mask's mask_mod allows; intersected with ``mask_mod`` and with the bottom-right
    causal mask when ``causal``. A row that sees nothing has out 0 and lse -inf. With
    ``dropout_p`` > 0 the probabilities are dropped by the kernel's mask for the same
    generator state (attnkit.dropout).
    """
    sm_scale = check_scale(scale, q.shape[-1])
    dropout = Dropout.draw(dropout_p, q.device)
    block_mask = block_mask.to(q.device)
    score_mod, own_mask, extra_mask = block_sparse_mods(q, k, block_mask, score_mod, mask_mod)
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    bq, bk = block_mask.block_size
    tiles = block_mask.to_dense()  # (Bm, Hm, R, C) bool: R x C blocks, not tokens
    partial = block_mask._partial if own_mask is not None else torch.zeros_like(tiles)
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)

    def attend(q_block: torch.Tensor, first_row: int):
        listed = tiles[:, :, first_row // bq]                           # (Bm, Hm, C)
        blocks = listed.flatten(0, 1).any(dim=0).nonzero().flatten()    # union over batch and heads
        if blocks.numel() == 0:  # nothing listed: attend one block fully masked (out 0, lse -inf, zero grads)
            blocks, listed = blocks.new_zeros(1), torch.zeros_like(listed)
        key_idx = (blocks[:, None] * bk + torch.arange(bk, device=q.device)).flatten()
        key_idx = key_idx[key_idx < Nk]
        query_pos = bottom_right(first_row, q_block.shape[2], Nq, Nk, q.device)
        positions = mod_positions(B, Hq, query_pos, key_idx)
        mask = listed[:, :, key_idx // bk][:, :, None, :]                # (Bm, Hm, 1, L)
        if own_mask is not None:  # the block mask's mask_mod cuts its partial tiles only
            cut = partial[:, :, first_row // bq][:, :, key_idx // bk][:, :, None, :]
            mask = mask & (~cut | own_mask.apply(*positions))
        if extra_mask is not None:
            mask = mask & extra_mask.apply(*positions)
        if causal:
            mask = mask & (key_idx[None, :] <= query_pos[:, None])
        return softmax_attend(q_block, k[:, :, key_idx], v[:, :, key_idx], scale=sm_scale, mask=mask,
                              softcap=softcap, score_mod=bind_score_mod(score_mod, positions),
                              dropout=bind_dropout(dropout, positions))

    out, lse = map_query_chunks(attend, q, bq)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out


def moba_gate(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int, first_row: int = 0,
              seqlen_q: int | None = None) -> torch.Tensor:
    """MoBA's selection for the query rows ``q`` (B, Hq, M, D) that start at row ``first_row``.

    k is (B, Hq, Nk, D) (already expanded to the query heads). The gate is computed in
    float32: score(c) = q . mean(K of block c) for the complete blocks c wholly before
    the row's own block (key position p = row + Nk - Nq, own block p // block_size).
    Returns bool (B, Hq, M, NB) with NB = Nk // block_size: True for the top
    (top_k - 1) blocks of each row (ties: lower block index first); fewer when fewer
    blocks are eligible. Not differentiable (as in MoBA).
    """
    Nq = q.shape[2] if seqlen_q is None else seqlen_q
    Nk = k.shape[2]
    n_blocks = Nk // block_size
    B, Hq, M, D = q.shape
    pooled = k[:, :, :n_blocks * block_size].detach().float().reshape(B, Hq, n_blocks, block_size, D).mean(dim=3)
    gate = torch.matmul(q.detach().float(), pooled.transpose(-1, -2))             # (B, Hq, M, NB) fp32
    pos = torch.arange(first_row, first_row + M, device=q.device) + (Nk - Nq)
    own = torch.div(pos, block_size, rounding_mode="floor")
    eligible = torch.arange(n_blocks, device=q.device)[None, :] < own[:, None]    # wholly before own block
    gate = gate.masked_fill(~eligible, float("-inf"))
    n_pick = min(top_k - 1, n_blocks)
    order = torch.sort(gate, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    picked = torch.gather(gate, -1, order) > float("-inf")
    chosen = torch.zeros(B, Hq, M, n_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(picked, order, torch.full_like(order, n_blocks)), True)
    return chosen[..., :n_blocks]


def moba_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int, top_k: int,
                   scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                   cu_seqlens_k: torch.Tensor | None = None, dropout_p: float = 0.0, return_lse: bool = False):
    """MoBA attention (causal, bottom-right), in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq)]. Query i (key position p = i + Nk - Nq) attends the keys
    j <= p of its own block p // block_size plus every key of the top-(top_k - 1)
    blocks chosen by :func:`moba_gate`. A packed batch (B = 1, ``cu_seqlens_q/k``
    (S + 1,)) is its sequences run one by one: blocks, gate and positions restart at
    each sequence. With ``dropout_p`` > 0 the probabilities are dropped by the kernel's
    mask for the same generator state (attnkit.dropout). Memory: one (chunk x Nk) mask
    per step.
    """
    sm_scale = check_scale(scale, q.shape[-1])
    dropout = Dropout.draw(dropout_p, q.device)
    if cu_seqlens_q is not None:
        out, lse = map_sequences(lambda q_s, k_s, v_s, seq: moba_attend(q_s, k_s, v_s, block_size, top_k, sm_scale,
                                                                        seq, dropout),
                                 q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = moba_attend(q, k, v, block_size, top_k, sm_scale, dropout=dropout)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out


def moba_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, top_k: int, sm_scale: float,
                first_batch: int = 0, dropout: Dropout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA of one (B, H, N, D) problem, chunked over queries: -> (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)).
    ``dropout`` is keyed by positions whose batch entry 0 is ``first_batch`` (a packed sequence's index)."""
    B, Hq, Nq, Nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    key_pos = torch.arange(Nk, device=q.device)
    n_blocks = Nk // block_size
    key_block = torch.div(key_pos, block_size, rounding_mode="floor")

    def attend(q_chunk: torch.Tensor, first_row: int):
        chosen = moba_gate(q_chunk, k, block_size=block_size, top_k=top_k, first_row=first_row, seqlen_q=Nq)
        # column NB: "not a past block" (built from the shape: with Nk < block_size, NB = 0)
        chosen = torch.cat([chosen, chosen.new_zeros(chosen.shape[:-1] + (1,))], dim=-1)
        query_pos = torch.arange(first_row, first_row + q_chunk.shape[2], device=q.device) + (Nk - Nq)
        own = torch.div(query_pos, block_size, rounding_mode="floor")
        in_chosen = chosen[..., key_block.clamp(max=n_blocks)]                      # (B, Hq, M, Nk)
        mask = (in_chosen | (key_block[None, :] == own[:, None])) & (key_pos[None, :] <= query_pos[:, None])
        positions = mod_positions(B, Hq, query_pos, key_pos, first_batch=first_batch)
        return softmax_attend(q_chunk, k, v, scale=sm_scale, mask=mask, dropout=bind_dropout(dropout, positions))

    rows = max(1, min(Nq, (1 << 22) // max(1, q.shape[0] * Hq * Nk)))
    return map_query_chunks(attend, q, rows)
