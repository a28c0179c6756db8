"""Decoding and serving: split-KV attention of a few new queries over a KV cache.

* :func:`decode_attention` — the ``decode`` variant: contiguous or paged caches with a
  length per sequence, Nq >= 1 new tokens, GQA, windows and sinks, sink logits,
  softcap, ALiBi, score mods, Quest page selection, H2O key scores.
* :class:`PagedKVCache` — a pool of fixed-size pages shared by sequences that join and
  leave, with the per-page key bounds page selection reads.
* :class:`StreamingHeadsCache` (DuoAttention / MoA: streaming and retrieval heads) and
  :class:`HeavyHitterCache` (H2O) — caches that keep less than every key.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ..checks import (FLOAT_DTYPES, Shapes, check_flag, check_head_vector, check_heads, check_int, check_scale,
                      check_softcap, checking_values)
from ..dispatch import attention
from ..engine import head_dim_blockers
from ..mods import ScoreMod
from ..registry import Case, Variant, register_variant
from ..sliding_window.window import check_sinks, head_windows
from .kernel import decode_kernel
from .reference import decode_reference, decode_score_mod
from .torch_backend import decode_torch

OPTIONS: Dict[str, Any] = dict(cache_seqlens=None, block_table=None, window=None, sinks=0, sink_logits=None,
                               softcap=None, alibi_slopes=None, score_mod=None, scale=None, page_top_k=None,
                               page_bounds=None, num_splits=None, return_lse=False, return_key_scores=False)


def _check_cache(name: str, x: Any, q: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4, got shape {tuple(x.shape)}")
    if x.dtype != q.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; the cache and q must share one dtype")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    return x


def _check_int_tensor(name: str, x: Any, shape: Tuple[int, ...], q: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape {shape}, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    return x


def validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, options: Dict[str, Any]) -> Shapes:
    if not isinstance(q, torch.Tensor) or q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be a floating tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() != 4 or q.shape[-1] == 0:  # B, Hq or Nq = 0 is an empty problem (dispatch answers it)
        raise ValueError(f"q must have shape (B, Hq, Nq, D) with D >= 1, got {tuple(q.shape)}")
    _check_cache("k_cache", k_cache, q)
    _check_cache("v_cache", v_cache, q)
    B, Hq, Nq, D = q.shape
    block_table = options["block_table"]
    paged = block_table is not None
    layout = "(num_pages, Hkv, page_size, D)" if paged else "(B, Hkv, Nmax, D)"
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree in all but "
                         f"the last dim {layout}")
    if k_cache.shape[-1] != D:
        raise ValueError(f"k_cache has head dim {k_cache.shape[-1]} but q has {D}; k_cache must be {layout}")
    Hkv = k_cache.shape[1]
    check_heads(Hq, Hkv, "the cache's kv heads")
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise ValueError(f"block_table must be an int32 tensor (B, max_pages), got "
                             f"{getattr(block_table, 'shape', type(block_table).__name__)}")
        _check_int_tensor("block_table", block_table, (B, block_table.shape[1]), q)
        capacity = block_table.shape[1] * k_cache.shape[2]
        if options["cache_seqlens"] is None:
            raise ValueError("cache_seqlens is required with a paged cache (block_table): the length of each sequence")
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {B}; a contiguous cache is {layout}")
        capacity = k_cache.shape[2]
    seqlens = options["cache_seqlens"]
    if seqlens is not None:
        _check_int_tensor("cache_seqlens", seqlens, (B,), q)
    if options["window"] is not None:
        head_windows(options["window"], Hq, q.device)
    check_sinks(options["sinks"])
    if options["sink_logits"] is not None:
        check_head_vector("sink_logits", options["sink_logits"], Hq, q)
    check_softcap(options["softcap"])
    check_scale(options["scale"], D)
    for flag in ("return_lse", "return_key_scores"):
        check_flag(flag, options[flag])
    if options["num_splits"] is not None:
        check_int("num_splits", options["num_splits"], minimum=1)
    top_k = options["page_top_k"]
    if top_k is not None:
        if not paged:
            raise ValueError("page_top_k selects pages of a paged cache: pass block_table "
                             "(a contiguous cache has none)")
        check_int("page_top_k", top_k, minimum=2)
    bounds = options["page_bounds"]
    if bounds is not None:
        if not paged or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError("page_bounds must be a pair (kmin, kmax) of (num_pages, Hkv, D) tensors, with a paged "
                             "cache")
        for name, t in zip(("page_bounds[0]", "page_bounds[1]"), bounds):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (k_cache.shape[0], Hkv, D) or t.device != q.device \
                    or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor of shape {(k_cache.shape[0], Hkv, D)} on "
                                 f"{q.device}")
    decode_score_mod(q, capacity, options["alibi_slopes"], options["score_mod"])
    if checking_values() and seqlens is not None:
        lengths = seqlens.tolist()
        bad = [x for x in lengths if x < 0 or x > capacity]
        if bad:
            raise ValueError(f"cache_seqlens must be in [0, {capacity}] (the cache holds {capacity} positions per "
                             f"sequence), got {bad[0]}")
        short = [(b, x) for b, x in enumerate(lengths) if x < Nq]
        if short:
            raise ValueError(f"q holds Nq = {Nq} new tokens but sequence {short[0][0]} has only {short[0][1]} cached: "
                             "the new tokens' keys must already be in the cache (cache_seqlens >= Nq)")
        if paged:  # the pages each sequence uses must exist (one check for the whole table)
            page_size = k_cache.shape[2]
            needed = torch.div(seqlens.long() + page_size - 1, page_size, rounding_mode="floor")
            used = torch.arange(block_table.shape[1], device=q.device)[None, :] < needed[:, None]
            bad = (used & ((block_table < 0) | (block_table >= k_cache.shape[0]))).nonzero()
            if bad.numel():
                b, p = bad[0].tolist()
                raise ValueError(f"block_table[{b}] holds page {int(block_table[b, p])} out of range: the cache "
                                 f"has {k_cache.shape[0]} pages")
    return Shapes(B, Hq, Hkv, Nq, capacity, D, v_cache.shape[-1])


def kernel_support(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    reasons = head_dim_blockers(q, v_cache)
    if options["block_table"] is not None:
        page_size = k_cache.shape[2]
        if page_size < 16 or page_size > 256 or page_size & (page_size - 1):
            reasons.append(f"page_size {page_size}: the kernel reads one page per block and needs a power of two "
                           "in [16, 256]")
    return reasons


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: Optional[torch.Tensor] = None, *, block_table: Optional[torch.Tensor] = None,
                     window: Any = None, sinks: int = 0, sink_logits: Optional[torch.Tensor] = None,
                     softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     score_mod: Optional[ScoreMod] = None, scale: Optional[float] = None,
                     page_top_k: Optional[int] = None, return_lse: bool = False, return_key_scores: bool = False,
                     backend: str = "auto", page_bounds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     num_splits: Optional[int] = None, layout: str = "bhsd"):
    """Attention of the newest Nq tokens of each sequence over its KV cache (decoding, serving).

    Query i of sequence b sits at position ``L_b - Nq + i`` and sees the cached keys j <= that
    position (always causal; its own key is already in the cache), intersected with
    ``window``/``sinks`` as in :func:`attnkit.sliding_window_attention`.

    Args:
        q: (B, Hq, Nq, D): the Nq newest tokens of each sequence (Nq = 1 for plain decoding,
            a few for speculative decoding or chunked prefill).
        k_cache, v_cache: contiguous (B, Hkv, Nmax, D) / (B, Hkv, Nmax, Dv), or paged
            (num_pages, Hkv, page_size, D) / (..., Dv) with ``block_table``; Hkv divides Hq.
        cache_seqlens: (B,) int32, the valid length L_b of each sequence (None: Nmax, contiguous
            caches only). Nq <= L_b.
        block_table: (B, max_pages) int32: page p of sequence b is ``block_table[b, p]``.
        window, sinks: as sliding_window (an int W, a pair (left, right), or a (Hq, 2) tensor).
        sink_logits: (Hq,) logit per head in every row's denominator, with no value (gpt-oss).
        softcap: scores s become softcap * tanh(s / softcap) (before ALiBi and the score mod).
        alibi_slopes: (Hq,) or (B, Hq): -slope * |position - j| (FlashAttention's convention).
        score_mod: an :class:`attnkit.ScoreMod`; in the kernel ``h`` arrives as a tile (the query
            heads of a GQA group share one tile).
        scale: default 1/sqrt(D).
        page_top_k: K >= 2: Quest's query-aware selection (paged caches): per (sequence, kv head)
            attend only the K pages with the largest ``max over queries and group heads of
            sum_d max(q_d kmax_d, q_d kmin_d)``, the first page and the newest always among
            them; K >= the number of pages is full attention.
        return_lse: also return the LSE (B, Hq, Nq), float32, natural log.
        return_key_scores: also return (B, Hq, capacity) float32: per query head, the sum over
            the Nq queries of their softmax probability on each key position (sink share
            excluded; 0 past L_b and on unselected pages): what H2O, SnapKV and CAKE read.
        layout: "bhsd" (default) or "bshd": q (B, Nq, Hq, D), caches (B, Nmax, Hkv, D) or paged
            (num_pages, page_size, Hkv, D) (flash-attn's), out (B, Nq, Hq, Dv); read without a
            copy. LSE and key scores keep their shapes (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference".
        page_bounds: (kmin, kmax) (num_pages, Hkv, D) page key bounds (any float dtype) for page_top_k
            (what :class:`attnkit.PagedKVCache` maintains); computed from the cache when None.
        num_splits: force the kernel's number of key splits per (sequence, kv head) (tests).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, then lse and key scores as asked.

    Examples::

        >>> q = torch.randn(2, 8, 1, 64)
        >>> k_cache, v_cache = torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)
        >>> lengths = torch.tensor([37, 100], dtype=torch.int32)
        >>> attnkit.decode_attention(q, k_cache, v_cache, lengths).shape
        torch.Size([2, 8, 1, 64])
    """
    return attention(q, k_cache, v_cache, "decode", backend, cache_seqlens=cache_seqlens, block_table=block_table,
                     window=window, sinks=sinks, sink_logits=sink_logits, softcap=softcap, alibi_slopes=alibi_slopes,
                     score_mod=score_mod, scale=scale, page_top_k=page_top_k, page_bounds=page_bounds,
                     num_splits=num_splits, return_lse=return_lse, return_key_scores=return_key_scores, layout=layout)


def _ints(*values: int):
    return lambda g: torch.tensor(values, dtype=torch.int32)


def _shuffled_table(batch: int, pages_per_seq: int, seed: int):
    """A block table over batch * pages_per_seq pages in a shuffled order."""
    def make(g):
        perm = torch.randperm(batch * pages_per_seq, generator=torch.Generator().manual_seed(seed))
        return perm.view(batch, pages_per_seq).to(torch.int32)
    return make


def _logits(heads: int):
    return lambda g: torch.randn(heads, generator=g, dtype=torch.float64)


def _slopes(heads: int):
    return lambda g: 0.05 + 0.2 * torch.rand(heads, generator=g, dtype=torch.float64)


def examples() -> List[Case]:
    return [
        Case((3, 8, 1, 32), (3, 1, 300, 32), (3, 1, 300, 32), tensors={"cache_seqlens": _ints(1, 17, 300)},
             grad=False, name="contiguous_gqa8_lengths_1_17_300"),
        Case((2, 2, 4, 32), (8, 2, 16, 32), (8, 2, 16, 24),
             {"window": 20, "sinks": 3},
             tensors={"cache_seqlens": _ints(61, 37), "block_table": _shuffled_table(2, 4, seed=1)},
             grad=False, name="paged16_shuffled_nq4_window_sinks_dv24"),
        Case((2, 4, 1, 40), (6, 2, 64, 40), (6, 2, 64, 40), {"page_top_k": 2},
             tensors={"cache_seqlens": _ints(150, 100), "block_table": _shuffled_table(2, 3, seed=2)},
             grad=False, name="paged64_page_top_k2_gqa"),
        Case((2, 4, 2, 32), (2, 2, 90, 32), (2, 2, 90, 32), {"softcap": 4.0, "sinks": 2},
             tensors={"cache_seqlens": _ints(90, 45), "window": lambda g: torch.tensor([[-1, 0], [10, 0], [5, 0],
                                                                                         [30, 0]]),
                      "sink_logits": _logits(4), "alibi_slopes": _slopes(4)},
             grad=False, name="per_head_windows_sink_logits_softcap_alibi"),
    ]


def demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    """One new token per sequence over a paged cache of 16-token pages, lengths up to ``seqlen``."""
    pages = -(-seqlen // 16)
    lengths = [max(1, seqlen - 7 * b) for b in range(batch)]
    return Case((batch, heads, 1, head_dim), (batch * pages, heads, 16, head_dim), (batch * pages, heads, 16, head_dim),
                tensors={"cache_seqlens": _ints(*lengths), "block_table": _shuffled_table(batch, pages, seed=0)},
                grad=False, name=f"paged_decode_n{seqlen}")


VARIANT = register_variant(Variant(
    name="decode",
    reference=decode_reference,
    kernel=decode_kernel,
    options=OPTIONS,
    validate=validate,
    kernel_support=kernel_support,
    extra_outputs={"return_lse": "lse", "return_key_scores": "key_scores"},
    examples=examples,
    status={"reference": True, "forward": True, "backward": False},
    doc="split-KV decoding over contiguous and paged caches: page selection (Quest), key scores (H2O)",
    demo=demo,
    torch_impl=decode_torch,
))

from .caches import HeavyHitterCache, StreamingHeadsCache  # noqa: E402
from .paged import PagedKVCache  # noqa: E402

__all__ = ["HeavyHitterCache", "PagedKVCache", "StreamingHeadsCache", "decode_attention", "decode_kernel",
           "decode_reference"]
