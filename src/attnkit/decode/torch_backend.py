"""The torch backend of decode attention: every sequence and kv head in one batched product.

The keys of all sequences are laid side by side, (B, Hkv, L, D): a contiguous cache is
read in place up to the longest sequence; a paged cache has its used pages gathered
through the block table, or, with page selection, only the kept pages of each
(sequence, kv head). One grouped matmul scores them all (the query heads of a GQA group
share their kv head without a copy); the causal rule, the lengths, the window and sinks,
the kept pages and the padding are one boolean mask. Decoding has a few query rows
(Nq), so the scores (B, Hq, Nq, L) are smaller than the keys: explicit scores cost about
what the fused kernel would, and give the probabilities that ``return_key_scores`` sums.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._reference import lse_dtype
from ..checks import check_scale
from ..mods import ScoreMod
from ..sliding_window.window import head_windows
from ..torch_backend import (
    add_sink_logits,
    grouped_scores,
    grouped_values,
    softmax_with_lse,
)
from .reference import cache_lengths, decode_score_mod, decode_selection


def _keys(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None, seqlens: torch.Tensor,
          selected: torch.Tensor | None, counts: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys every (sequence, kv head) may read: k (B, Hkv, L, D), v (B, Hkv, L, Dv), their
    positions (B, Hkv, L) int64 (always valid positions of the cache) and whether each slot
    holds a real key, ``real`` (B, Hkv, L) (a position below the sequence's length, on a kept page)."""
    B, Hkv = seqlens.shape[0], k_cache.shape[1]
    longest = int(seqlens.max())
    if block_table is None:  # contiguous: read in place, up to the longest sequence
        pos = torch.arange(longest, device=k_cache.device).expand(B, Hkv, longest)
        return k_cache[:, :, :longest], v_cache[:, :, :longest], pos, pos < seqlens.view(B, 1, 1)
    num_pages, _, page_size, _ = k_cache.shape
    slot = torch.arange(page_size, device=k_cache.device)
    if selected is None:  # every used page, in order
        used = -(-longest // page_size)
        logical = torch.arange(used, device=k_cache.device).expand(B, Hkv, used)
        kept = torch.ones_like(logical, dtype=torch.bool)
    else:  # the kept pages of each (sequence, kv head); entries past the count are padding
        logical = selected.long()
        kept = torch.arange(logical.shape[-1], device=k_cache.device) < counts.view(B, Hkv, 1).long()
    physical = block_table.long().gather(1, logical.reshape(B, -1)).view(logical.shape)
    physical = physical.clamp(0, num_pages - 1)  # unused table entries may hold anything: masked below
    heads = torch.arange(Hkv, device=k_cache.device).view(1, Hkv, 1)
    n = logical.shape[-1] * page_size
    k = k_cache[physical, heads].reshape(B, Hkv, n, k_cache.shape[-1])             # (B, Hkv, pages, ps, D)
    v = v_cache[physical, heads].reshape(B, Hkv, n, v_cache.shape[-1])
    pos = (logical[..., None] * page_size + slot).reshape(B, Hkv, n)
    real = (kept[..., None] & (pos.view(B, Hkv, -1, page_size) < seqlens.view(B, 1, 1, 1))).reshape(B, Hkv, n)
    return k, v, pos.clamp(max=block_table.shape[1] * page_size - 1), real


def decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_seqlens: torch.Tensor | None = None, *, block_table: torch.Tensor | None = None,
                 window: Any = None, sinks: int = 0, sink_logits: torch.Tensor | None = None,
                 softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                 score_mod: ScoreMod | None = None, scale: float | None = None,
                 page_top_k: int | None = None, page_bounds: tuple[torch.Tensor, ...] | None = None,
                 num_splits: int | None = None, return_lse: bool = False, return_key_scores: bool = False):
    """The torch backend of :func:`attnkit.decode_attention` (same arguments and semantics as
    :func:`decode_reference`), computed in the inputs' dtype; ``num_splits`` is the kernel's
    and is ignored.

    q (B, Hq, Nq, D); a contiguous cache (B, Hkv, Nmax, D / Dv), or a paged one
    (num_pages, Hkv, page_size, D / Dv) with ``block_table`` (B, max_pages). Returns out
    (B, Hq, Nq, Dv) [, lse (B, Hq, Nq)] [, key scores (B, Hq, capacity)].
    """
    B, Hq, Nq, D = q.shape
    Hkv = k_cache.shape[1]
    capacity, seqlens = cache_lengths(q, k_cache, block_table, cache_seqlens)
    sm_scale = check_scale(scale, D)
    mod = decode_score_mod(q, capacity, alibi_slopes, score_mod)
    selected, counts = decode_selection(q, k_cache, block_table, seqlens, page_top_k, page_bounds)
    k, v, pos, real = _keys(k_cache, v_cache, block_table, seqlens, selected, counts)
    groups = Hq // Hkv
    L = k.shape[2]

    def per_query_head(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, L) -> (B, Hq, 1, L)
        return x[:, :, None].expand(B, Hkv, groups, L).reshape(B, Hq, 1, L)

    q_pos = (seqlens.long().view(B, 1) - Nq + torch.arange(Nq, device=q.device)).view(B, 1, Nq, 1)
    j = per_query_head(pos)
    mask = per_query_head(real) & (j <= q_pos)                                    # (B, Hq, Nq, L)
    if window is not None:
        lefts = torch.tensor([left for left, _ in head_windows(window, Hq)], device=q.device).view(1, Hq, 1, 1)
        mask = mask & ((lefts < 0) | (j >= q_pos - lefts) | (j < sinks))
    s = grouped_scores(q, k) * sm_scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mod is not None:
        s = mod.apply(s, torch.arange(B, device=q.device).view(B, 1, 1, 1), torch.arange(Hq, device=q.device)
                      .view(1, Hq, 1, 1), q_pos, j)
    p, lse = softmax_with_lse(s.masked_fill(~mask, -math.inf))
    out, total = add_sink_logits(grouped_values(p.to(v.dtype), v), lse.to(lse_dtype(q)), sink_logits)
    result = (out,)
    if return_lse:
        result += (total,)
    if return_key_scores:
        # each key's probability in the softmax with the sink (its share excluded), summed over the queries
        share = torch.exp(lse.to(total.dtype) - total).nan_to_num(0.0)                  # (B, Hq, Nq)
        probs = (p.to(total.dtype) * share[..., None]).sum(dim=2)                       # (B, Hq, L)
        scores = torch.zeros(B, Hq, capacity, dtype=lse_dtype(q), device=q.device)
        result += (scores.scatter_add_(2, j[:, :, 0], probs.to(scores.dtype)),)
    return result if len(result) > 1 else out
