"""PyTorch reference of decode_attention: one sequence at a time, over the keys it keeps.

For sequence b of length L, query i sits at position L - Nq + i and sees key j iff
j <= that position and j < L (always causal), intersected with the window and sinks
(sliding_window's rule), and, with page selection, j lies in a kept page. The keys
are gathered in position order from the contiguous cache or through the block table;
memory is O(Hq x Nq x L) per sequence.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from .._reference import bind_score_mod, expand_kv_heads, lse_dtype, softmax_attend
from ..checks import check_scale
from ..flash.reference import alibi_then_score_mod
from ..mods import Problem, ScoreMod
from ..sliding_window.window import head_windows
from .selection import page_bounds, page_scores, select_pages


def gather_keys(cache: torch.Tensor, b: int, positions: torch.Tensor, block_table: Optional[torch.Tensor]
                ) -> torch.Tensor:
    """The cached rows of sequence ``b`` at ``positions`` (n,): (Hkv, n, D), from a contiguous
    (B, Hkv, Nmax, D) or a paged (num_pages, Hkv, page_size, D) cache."""
    if block_table is None:
        return cache[b].index_select(1, positions)
    page_size = cache.shape[2]
    pages = block_table[b].long()[torch.div(positions, page_size, rounding_mode="floor")]
    return cache[pages, :, positions % page_size].transpose(0, 1)


def kept_positions(length: int, selected: Optional[torch.Tensor], count: int, page_size: int,
                   device: torch.device) -> torch.Tensor:
    """Key positions of a sequence: all of [0, L), or those of its kept pages (ascending)."""
    if selected is None:
        return torch.arange(length, device=device)
    pages = selected[:count].long()
    pos = (pages[:, None] * page_size + torch.arange(page_size, device=device)[None, :]).flatten()
    return pos[pos < length]


def cache_lengths(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                  cache_seqlens: Optional[torch.Tensor]) -> Tuple[int, torch.Tensor]:
    """(capacity, seqlens): the tokens a sequence's cache can hold (max_pages x page_size for a
    paged cache, Nmax for a contiguous one) and each sequence's length (B,) int32 (the capacity
    for every sequence when ``cache_seqlens`` is None)."""
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    if cache_seqlens is not None:
        return capacity, cache_seqlens.to(torch.int32)
    return capacity, torch.full((q.shape[0],), capacity, dtype=torch.int32, device=q.device)


def decode_score_mod(q: torch.Tensor, capacity: int, alibi_slopes: Optional[torch.Tensor],
                     score_mod: Optional[ScoreMod]) -> Optional[ScoreMod]:
    """ALiBi then ``score_mod`` for a decode call (positions count over the cache's capacity)."""
    if alibi_slopes is None and score_mod is None:
        return None
    problem = Problem("decode", q.shape[0], q.shape[1], q.shape[2], capacity, q.device)
    return alibi_then_score_mod(problem, q, alibi_slopes, score_mod)


def decode_selection(q: torch.Tensor, k_cache: torch.Tensor, block_table: Optional[torch.Tensor],
                     seqlens: torch.Tensor, page_top_k: Optional[int], bounds: Optional[Tuple[torch.Tensor, ...]]):
    """(kept pages (B, Hkv, K) int32, counts (B, Hkv)) of page_top_k, or (None, None); also
    (None, None) without queries (Hq or Nq = 0): nothing to rank the pages by, nothing to attend."""
    if page_top_k is None or q.shape[1] == 0 or q.shape[2] == 0:
        return None, None
    kmin, kmax = bounds if bounds is not None else page_bounds(k_cache, block_table, seqlens)
    scores = page_scores(q, kmin, kmax, block_table, seqlens, k_cache.shape[2])
    return select_pages(scores, seqlens, k_cache.shape[2], page_top_k)


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: Optional[torch.Tensor] = None, *, block_table: Optional[torch.Tensor] = None,
                     window: Any = None, sinks: int = 0, sink_logits: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     score_mod: Optional[ScoreMod] = None, scale: Optional[float] = None,
                     page_top_k: Optional[int] = None, page_bounds: Optional[Tuple[torch.Tensor, ...]] = None,
                     num_splits: Optional[int] = None, return_lse: bool = False, return_key_scores: bool = False):
    """Decoding attention, in the dtype of the inputs.

    q (B, Hq, Nq, D); a contiguous cache k_cache (B, Hkv, Nmax, D), v_cache (B, Hkv, Nmax, Dv),
    or a paged one (num_pages, Hkv, page_size, D / Dv) with ``block_table`` (B, max_pages).
    Returns out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq)] [, key scores (B, Hq, capacity)].
    ``num_splits`` is the kernel's and is ignored here.
    """
    B, Hq, Nq, D = q.shape
    capacity, seqlens = cache_lengths(q, k_cache, block_table, cache_seqlens)
    sm_scale = check_scale(scale, D)
    mod = decode_score_mod(q, capacity, alibi_slopes, score_mod)
    windows = head_windows(window, Hq) if window is not None else None
    selected, counts = decode_selection(q, k_cache, block_table, seqlens, page_top_k, page_bounds)
    groups = Hq // k_cache.shape[1]

    outs, lses = [], []
    key_scores = torch.zeros(B, Hq, capacity, dtype=lse_dtype(q), device=q.device) if return_key_scores else None
    for b in range(B):
        length = int(seqlens[b])
        qpos = torch.arange(length - Nq, length, device=q.device)
        per_head = []
        for hk in range(k_cache.shape[1]):  # page selection may differ per kv head
            keys = kept_positions(length, None if selected is None else selected[b, hk],
                                  0 if counts is None else int(counts[b, hk]), k_cache.shape[2], q.device)
            per_head.append(keys)
        # one attention per distinct key set (all kv heads share it without page selection)
        heads_of = {}
        for hk, keys in enumerate(per_head):
            heads_of.setdefault(tuple(keys.tolist()), []).append(hk)
        out_b = q.new_zeros(1, Hq, Nq, v_cache.shape[-1])
        lse_b = q.new_full((1, Hq, Nq), float("-inf"), dtype=lse_dtype(q))
        for key_tuple, kv_heads in heads_of.items():
            keys = torch.tensor(key_tuple, dtype=torch.long, device=q.device)
            heads = torch.tensor([hk * groups + g for hk in kv_heads for g in range(groups)], dtype=torch.long,
                                 device=q.device)  # long: the list is empty when Hq = 0
            kv_idx = torch.tensor(kv_heads, device=q.device)
            k_b = expand_kv_heads(gather_keys(k_cache, b, keys, block_table)[kv_idx][None], len(heads))
            v_b = expand_kv_heads(gather_keys(v_cache, b, keys, block_table)[kv_idx][None], len(heads))
            j, p = keys[None, None, :], qpos[None, :, None]
            mask = (j <= p).expand(len(heads), Nq, len(keys))
            if windows is not None:
                left = torch.tensor([windows[h][0] for h in heads.tolist()], device=q.device)[:, None, None]
                window_ok = torch.where(left < 0, torch.ones_like(mask), j >= p - left)
                mask = mask & (window_ok | (j < sinks))
            positions = (torch.full((1, 1, 1, 1), b, device=q.device), heads.view(1, -1, 1, 1),
                         qpos.view(1, 1, -1, 1), keys.view(1, 1, 1, -1))
            o, o_lse, probs = softmax_attend(q[b:b + 1, heads], k_b, v_b, scale=sm_scale, mask=mask[None],
                                         softcap=softcap,
                                         sink_logits=None if sink_logits is None else sink_logits[heads],
                                         score_mod=bind_score_mod(mod, positions), return_probs=True)
            out_b[:, heads] = o
            lse_b[:, heads] = o_lse.to(lse_b.dtype)
            if key_scores is not None:
                key_scores[b, heads[:, None], keys[None, :]] = probs[0].sum(dim=1).to(key_scores.dtype)
        outs.append(out_b)
        lses.append(lse_b)
    if not outs:  # B = 0: an empty batch (decode has no backward, so nothing to connect)
        outs, lses = [q.new_zeros(0, Hq, Nq, v_cache.shape[-1])], [q.new_zeros((0, Hq, Nq), dtype=lse_dtype(q))]
    out, lse = torch.cat(outs), torch.cat(lses)
    result = (out,)
    if return_lse:
        result += (lse,)
    if return_key_scores:
        result += (key_scores,)
    return result if len(result) > 1 else out
