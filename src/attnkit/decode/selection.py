"""Query-aware page selection (Quest, Tang et al., 2024, https://arxiv.org/abs/2406.10774).

Each page of a paged KV cache keeps the element-wise minimum and maximum of its keys
per kv head. For a query q, ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` is an upper bound
of ``q . k`` over the page's keys, so the pages with the largest bound are the ones
that can hold the largest scores. A page's score for a (sequence, kv head) is the
largest bound over the Nq queries and the query heads of the GQA group. The first
page and the page holding the newest token are always kept; the remaining pages are
the best-scoring ones (ties: the lower page first). Reference and kernel path use
these same functions, so both attend over the same pages.
"""

from __future__ import annotations

from typing import Tuple

import torch


def page_count(seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages a sequence of each length occupies: ceil(L / page_size), (B,) int64."""
    return torch.div(seqlens.long() + page_size - 1, page_size, rounding_mode="floor")


def page_bounds(k_cache: torch.Tensor, block_table: torch.Tensor, seqlens: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min and max of the valid keys of every used page.

    k_cache (num_pages, Hkv, page_size, D), block_table (B, max_pages) int32, seqlens (B,).
    Returns kmin, kmax (num_pages, Hkv, D) in the cache's dtype (a min or max of stored keys is a
    stored value: exact); pages no sequence uses hold +inf / -inf.
    (:class:`attnkit.PagedKVCache` maintains the same bounds as keys are appended.)
    """
    num_pages, heads, page_size, dim = k_cache.shape
    kmin = torch.full((num_pages, heads, dim), float("inf"), dtype=k_cache.dtype, device=k_cache.device)
    kmax = torch.full_like(kmin, float("-inf"))
    for b, n in enumerate(page_count(seqlens, page_size).tolist()):
        if n == 0:
            continue
        pages = block_table[b, :n].long()
        keys = k_cache[pages]                                                # (n, Hkv, ps, D)
        filled = int(seqlens[b]) - (n - 1) * page_size                       # slots of the last page
        valid = torch.ones(n, page_size, dtype=torch.bool, device=k_cache.device)
        valid[-1, filled:] = False
        valid = valid[:, None, :, None]
        kmin[pages] = torch.where(valid, keys, float("inf")).amin(dim=2)
        kmax[pages] = torch.where(valid, keys, float("-inf")).amax(dim=2)
    return kmin, kmax


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Quest's score of every page of every (sequence, kv head): (B, Hkv, max_pages) float32,
    -inf for pages past a sequence's end.

    q (B, Hq, Nq, D); kmin, kmax (num_pages, Hkv, D), any float dtype. ``sum_d max(q_d kmax_d, q_d kmin_d)``
    is computed as ``relu(q) . kmax - relu(-q) . kmin`` (two matrix products), the maximum
    taken over the Nq queries and the query heads of each group.
    """
    B, Hq, Nq, D = q.shape
    Hkv = kmin.shape[1]
    rows = q.float().reshape(B, Hkv, (Hq // Hkv) * Nq, D)                   # query heads of a group, head-major
    pages = block_table.long()                                               # (B, P)
    lo = kmin[pages].transpose(1, 2).float()                                 # (B, Hkv, P, D)
    hi = kmax[pages].transpose(1, 2).float()
    # a page with no key has bounds +-inf; zero them (its score is masked below)
    lo, hi = torch.nan_to_num(lo, posinf=0.0, neginf=0.0), torch.nan_to_num(hi, posinf=0.0, neginf=0.0)
    bound = rows.clamp(min=0) @ hi.transpose(-1, -2) + rows.clamp(max=0) @ lo.transpose(-1, -2)   # (B, Hkv, R, P)
    score = bound.amax(dim=2)
    used = torch.arange(pages.shape[1], device=q.device)[None, :] < page_count(seqlens, page_size)[:, None]
    return score.masked_fill(~used[:, None, :], float("-inf"))


def select_pages(scores: torch.Tensor, seqlens: torch.Tensor, page_size: int, top_k: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pages kept for each (sequence, kv head): ``min(top_k, pages)`` of them, the first and the
    newest always among them, the others by score (ties: lower page first).

    scores (B, Hkv, P) from :func:`page_scores`. Returns the kept logical page indices
    (B, Hkv, top_k) int32, ascending (entries past the count are 0), and the counts (B, Hkv) int32.
    """
    B, Hkv, P = scores.shape
    n = page_count(seqlens, page_size)                                       # (B,)
    forced = scores.clone()
    forced[:, :, 0] = float("inf")
    newest = (n - 1).clamp(min=0)
    forced[torch.arange(B, device=scores.device), :, newest] = float("inf")
    order = torch.sort(-forced, dim=-1, stable=True).indices[..., :top_k]   # best first, lower index on ties
    count = torch.minimum(n, torch.tensor(top_k, device=n.device))           # (B,)
    keep = torch.arange(order.shape[-1], device=scores.device)[None, :] < count[:, None]
    chosen = torch.where(keep[:, None, :], order, torch.full_like(order, P))  # P sorts last
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == P, torch.zeros_like(chosen), chosen)
    return chosen.to(torch.int32).contiguous(), count[:, None].expand(B, Hkv).to(torch.int32).contiguous()
