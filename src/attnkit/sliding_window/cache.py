"""Constant-memory decode cache for sliding-window attention with attention sinks (StreamingLLM).

The cache holds one key buffer and one value buffer of S + W slots per (batch, kv head):
slots [0, S) keep the sinks (positions 0 .. S - 1) and slots [S, S + W) are a ring of the
last W keys at positions >= S (position x lives in slot S + (x - S) mod W). Generation
with window W therefore uses the same memory at token 10 and at token 10 million.

Why the kernel sees "the right positions": attention is a sum over keys, so their order
in memory does not matter, only which keys each query sees.

* One new token, one window for all heads (the common decode step): after the new key is
  written, the buffer holds exactly the sinks and the last W keys, i.e. exactly what the
  query sees; ``decode_attention`` runs over the buffer in ring order, without any copy.
* Several new tokens (prefill in chunks) or per-head windows: the past keys are gathered
  in position order, sinks then the recent ones, the new keys appended, and the variant
  runs with the same window and sinks. Positions between the sinks and the recent keys
  are gone, but no query of the chunk can see them (every window ends inside the
  recent part), so the compressed indices give the same masks as the true positions.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_cache_entries
from .window import INT_DTYPES, check_sinks, head_windows


def _decode_window(window: Any) -> int:
    """Check a window usable for decoding; return W = 1 + the largest left extent."""
    if isinstance(window, torch.Tensor):
        if window.dtype not in INT_DTYPES:
            raise TypeError(f"window as a tensor must have an integer dtype (int32 or int64), got {window.dtype}")
        if window.dim() != 2 or window.shape[1] != 2 or window.shape[0] < 1:
            raise ValueError(f"window as a tensor must have shape (Hq, 2), got {tuple(window.shape)}")
        rows = [tuple(int(x) for x in row) for row in window.tolist()]
    else:
        rows = head_windows(window, 1)
    for left, right in rows:
        if left < 0:
            raise ValueError("SlidingWindowCache needs a finite left extent (>= 0) in every head: an unbounded "
                             f"window (left = -1) cannot be decoded in constant memory; got {(left, right)}")
        if right != 0:
            raise ValueError("SlidingWindowCache decodes causally: the window's right extent must be 0, "
                             f"got {(left, right)}")
    return 1 + max(left for left, _ in rows)


class SlidingWindowCache:
    """Rolling KV cache for streaming decode: the sinks plus the last W keys, in fixed memory.

    Args:
        window: int W (each token sees the last W keys, itself included), a pair
            (left, 0) with left >= 0 (W = left + 1), or an int tensor (Hq, 2) of
            per-head (left, 0) rows (W = 1 + the largest left). Right extents must be
            0 and left extents finite: decoding is causal and memory is constant.
        sinks: S >= 0 first tokens kept forever (StreamingLLM's attention sinks).

    Use::

        cache = attnkit.SlidingWindowCache(window=4096, sinks=4)
        out = cache.attend(q, k, v)       # prefill: q (B, Hq, n, D), k, v (B, Hkv, n, D/Dv)
        for ...:
            out = cache.attend(q1, k1, v1)   # decode: n = 1

    Each :meth:`attend` call appends the n new keys/values (positions ``seen`` ..
    ``seen + n - 1``) and returns what ``sliding_window_attention`` over the whole
    sequence so far would return for those n queries. The buffers (B, Hkv, S + W, D)
    and (B, Hkv, S + W, Dv) are allocated on the first call, in k's dtype and device.
    The cache is for inference: it stores detached copies of k and v. A call that raises
    changes nothing: every input and option is checked before a key is stored.
    """

    def __init__(self, window: Any, sinks: int = 0):
        self.window_size = _decode_window(window)
        self.sinks = check_sinks(sinks)
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seen = 0

    @property
    def capacity(self) -> int:
        """Slots per (batch, kv head): S + W."""
        return self.sinks + self.window_size

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the key and value buffers (0 before the first call)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def reset(self) -> None:
        """Forget every token (the buffers are kept for reuse)."""
        self.seen = 0

    def _slot(self, pos: torch.Tensor) -> torch.Tensor:
        S, W = self.sinks, self.window_size
        return torch.where(pos < S, pos, S + (pos - S).remainder(W))

    def _check_buffers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New k (B, Hkv, n, D) and v (B, Hkv, n, Dv) against the buffers (once they exist)."""
        check_cache_entries(k, v, self.keys, self.values)

    def _allocate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The buffers, at the first call that stores keys (after its checks passed)."""
        if self.keys is None:
            B, Hkv, _, D = k.shape
            self.keys = torch.zeros((B, Hkv, self.capacity, D), dtype=k.dtype, device=k.device)
            self.values = torch.zeros((B, Hkv, self.capacity, v.shape[-1]), dtype=v.dtype, device=v.device)

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens: sinks by position, then the last W of the others in the ring."""
        self._allocate(k, v)
        n = k.shape[2]
        pos = torch.arange(self.seen, self.seen + n, device=k.device)
        keep = (pos < self.sinks) | (pos >= max(self.sinks, self.seen + n - self.window_size))
        pos = pos[keep]
        slots = self._slot(pos)
        self.keys.index_copy_(2, slots, k.detach()[:, :, keep])
        self.values.index_copy_(2, slots, v.detach()[:, :, keep])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               softcap: float | None = None, sink_logits: torch.Tensor | None = None,
               return_lse: bool = False, backend: str = "auto"):
        """Append n tokens and attend their queries over the cached context.

        Args:
            q: (B, Hq, n, D) queries of the new tokens. k: (B, Hkv, n, D), v: (B, Hkv, n, Dv).
            scale, softcap, sink_logits, return_lse, backend: as in ``sliding_window_attention``.

        Returns:
            out (B, Hq, n, Dv) [, lse (B, Hq, n)], equal to the last n rows of
            ``sliding_window_attention`` over the whole sequence seen so far.
        """
        from ..decode.caches import check_step
        from . import sliding_window_attention

        kwargs = {"scale": scale, "softcap": softcap, "sink_logits": sink_logits, "return_lse": return_lse,
                 "backend": backend}
        # everything is checked before the ring changes: a decode step overwrites the oldest key
        check_step(q, k, v, **kwargs)
        windows = head_windows(self.window, q.shape[1], q.device)
        self._check_buffers(k, v)
        n = q.shape[2]
        S, W = self.sinks, self.window_size

        if n == 1 and len(set(windows)) == 1:
            # After the write the buffer holds exactly the keys this query sees (in ring order):
            # a decode step over the whole buffer (the query sits after every key in it).
            from ..decode import decode_attention

            self._write(k, v)
            filled = torch.full((q.shape[0],), min(self.seen + 1, self.capacity), dtype=torch.int32,
                                device=q.device)
            result = decode_attention(q, self.keys, self.values, filled, **kwargs)
            self.seen += 1
            return result

        if self.keys is None:
            k_all, v_all = k, v
        else:
            recent_from = max(S, self.seen - W)
            past = torch.cat([torch.arange(0, min(self.seen, S)),
                              torch.arange(recent_from, max(recent_from, self.seen))]).to(q.device)
            slots = self._slot(past)
            k_all = torch.cat([self.keys.index_select(2, slots), k], dim=2)
            v_all = torch.cat([self.values.index_select(2, slots), v], dim=2)
        result = sliding_window_attention(q, k_all, v_all, window=self.window, sinks=S, **kwargs)
        self._write(k, v)
        self.seen += n
        return result
