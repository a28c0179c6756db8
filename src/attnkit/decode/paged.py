"""``attnkit.PagedKVCache``: a pool of fixed-size KV pages shared by sequences that come and go.

A sequence's keys live in pages of ``page_size`` positions anywhere in the pool; its
block table lists them in order (page p holds positions [p * page_size, (p + 1) *
page_size)). Pages are taken from a free list as a sequence grows and returned when it
is freed, so memory follows the tokens actually held (vLLM's PagedAttention layout,
FlashInfer's paged decode). Each page also keeps the element-wise min and max of its
keys per kv head, which query-aware page selection (``page_top_k``, Quest) reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_cache_storage, check_int


class PagedKVCache:
    """A paged KV cache for serving.

    Args:
        num_pages: pages in the pool. page_size: positions per page.
        num_kv_heads: Hkv. head_dim: D. head_dim_v: Dv (default D).
        dtype, device: of the key and value storage.

    Storage: keys (num_pages, Hkv, page_size, D), values (num_pages, Hkv, page_size, Dv), the
    layout :func:`attnkit.decode_attention` reads with a block table; page key bounds (kmin,
    kmax) (num_pages, Hkv, D) in the same dtype.

    Example::

        cache = attnkit.PagedKVCache(1024, 16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device="cuda")
        a, b = cache.add_sequence(), cache.add_sequence()
        cache.append([a], k_prompt_a, v_prompt_a)           # (1, Hkv, n_a, D): a prompt
        cache.append([a, b], k_step, v_step)                # (2, Hkv, 1, D): one token each
        out = cache.attend([a, b], q_step)                  # (2, Hq, 1, D) -> (2, Hq, 1, Dv)
        cache.free(a)                                       # its pages return to the pool
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 head_dim_v: int | None = None, dtype: torch.dtype, device):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            check_int(name, value, minimum=1)
        head_dim_v = head_dim if head_dim_v is None else check_int("head_dim_v", head_dim_v, minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device(device)
        self.page_size, self.num_kv_heads = page_size, num_kv_heads
        self.head_dim, self.head_dim_v = head_dim, head_dim_v
        self.keys = torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(num_pages, num_kv_heads, page_size, head_dim_v, dtype=dtype, device=device)
        # page key bounds in the cache's dtype: a min or max of stored keys is exact, and half the
        # bytes of float32 keep page selection's reads small next to the pages it skips
        self.kmin = torch.full((num_pages, num_kv_heads, head_dim), float("inf"), dtype=dtype, device=device)
        self.kmax = torch.full((num_pages, num_kv_heads, head_dim), float("-inf"), dtype=dtype, device=device)
        # a stack: pages are taken in ascending order, and a freed page is the next one taken
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_pages(self) -> int:
        return self.keys.shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list[int]:
        """Ids of the live sequences, in the order they were added."""
        return list(self._pages)

    def memory_bytes(self) -> int:
        """Bytes of the key and value storage (the whole pool) and the page bounds."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.kmin, self.kmax))

    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (ids are never reused)."""
        seq_id = self._next_id
        self._next_id += 1
        self._pages[seq_id] = []
        self._lengths[seq_id] = 0
        return seq_id

    def free(self, seq_id: int) -> None:
        """Drop a sequence; its pages return to the pool (their bounds reset)."""
        self._check_ids([seq_id])
        pages = self._pages.pop(seq_id)
        del self._lengths[seq_id]
        if pages:
            index = torch.tensor(pages, device=self.keys.device)
            self.kmin[index] = float("inf")
            self.kmax[index] = float("-inf")
        self._free.extend(reversed(pages))

    def length(self, seq_id: int) -> int:
        self._check_ids([seq_id])
        return self._lengths[seq_id]

    def _check_ids(self, seq_ids: Sequence[int]) -> list[int]:
        ids = list(seq_ids)
        if not ids:
            raise ValueError("seq_ids must name at least one sequence")
        unknown = [s for s in ids if s not in self._pages]
        if unknown:
            raise ValueError(f"seq_ids holds {unknown[0]!r}, which is not a live sequence of this cache "
                             f"(live: {self.sequences})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids names a sequence twice: {ids}")
        return ids

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """(len(seq_ids), max_pages) int32: the pages of each sequence in order (padding: page 0)."""
        ids = self._check_ids(seq_ids)
        width = max(1, max(len(self._pages[s]) for s in ids))
        rows = [self._pages[s] + [0] * (width - len(self._pages[s])) for s in ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.keys.device)

    def seqlens(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """(len(seq_ids),) int32: the number of tokens each sequence holds."""
        ids = self._check_ids(seq_ids)
        return torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32, device=self.keys.device)

    # ------------------------------------------------------------------ writing and reading
    def append(self, seq_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Append n >= 1 tokens to each sequence: k (len(seq_ids), Hkv, n, D), v (..., Dv).

        Everything is checked first: a call that cannot be carried out (a full pool, a bad
        shape) raises and changes nothing.
        """
        ids = self._check_ids(seq_ids)
        for name, x, dim in (("k", k, self.head_dim), ("v", v, self.head_dim_v)):
            want = (len(ids), self.num_kv_heads, None, dim)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != len(ids) \
                    or x.shape[1] != self.num_kv_heads or x.shape[3] != dim or x.shape[2] < 1:
                raise ValueError(f"{name} must have shape (len(seq_ids), Hkv, n, {'D' if name == 'k' else 'Dv'}) = "
                                 f"{want[:2] + ('n',) + want[3:]} with n >= 1, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            check_cache_storage(name, x, self.keys)
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must hold the same tokens: {k.shape[2]} and {v.shape[2]}")
        n, ps = k.shape[2], self.page_size
        need = [-(-(self._lengths[s] + n) // ps) - len(self._pages[s]) for s in ids]
        if sum(need) > len(self._free):
            raise RuntimeError(f"the page pool is full: appending {n} token(s) to {len(ids)} sequence(s) needs "
                               f"{sum(need)} more page(s) of {ps} positions, {len(self._free)} are free; free a "
                               "sequence or make a larger cache (nothing was changed)")
        for s, extra in zip(ids, need):
            self._pages[s].extend(self._free.pop() for _ in range(extra))
        # every (sequence, token): its page and slot
        positions = torch.tensor([self._lengths[s] + t for s in ids for t in range(n)])
        seq_index = torch.arange(len(ids)).repeat_interleave(n)
        table = self.block_table(ids).cpu()
        pages = table[seq_index, torch.div(positions, ps, rounding_mode="floor")].to(self.keys.device)
        slots = (positions % ps).to(self.keys.device)
        new_k = k.detach().transpose(1, 2).reshape(len(ids) * n, self.num_kv_heads, self.head_dim)
        new_v = v.detach().transpose(1, 2).reshape(len(ids) * n, self.num_kv_heads, self.head_dim_v)
        self.keys[pages, :, slots] = new_k
        self.values[pages, :, slots] = new_v
        index = pages.long()[:, None, None].expand(new_k.shape)
        self.kmin.scatter_reduce_(0, index, new_k, reduce="amin")
        self.kmax.scatter_reduce_(0, index, new_k, reduce="amax")
        for s in ids:
            self._lengths[s] += n

    def attend(self, seq_ids: Sequence[int], q: torch.Tensor, **options):
        """:func:`attnkit.decode_attention` of q (len(seq_ids), Hq, Nq, D) over these sequences
        (their newest Nq tokens must already be appended); ``options`` are decode_attention's
        (``page_top_k`` reads the bounds this cache maintains)."""
        from . import decode_attention

        ids = self._check_ids(seq_ids)
        if options.get("page_top_k") is not None and options.get("page_bounds") is None:
            options["page_bounds"] = (self.kmin, self.kmax)
        return decode_attention(q, self.keys, self.values, self.seqlens(ids), block_table=self.block_table(ids),
                                **options)

    def __repr__(self) -> str:
        return (f"PagedKVCache(pages={self.num_pages} x {self.page_size}, free={self.num_free_pages}, "
                f"sequences={len(self._pages)}, heads={self.num_kv_heads}, dims=({self.head_dim}, {self.head_dim_v}), "
                f"dtype={self.keys.dtype})")
