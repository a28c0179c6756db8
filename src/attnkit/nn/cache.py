"""Incremental-decoding caches for ``attnkit.nn.Attention``.

Each cache has ``positions(n)`` (the positions of the next n tokens: (n,), or (B, n) when
the sequences of a batch have different lengths) and ``attend(q, k, v, options,
backend)``: append the n new tokens and return the output of their n queries over
what the cache keeps. Softmax caches decode through :func:`attnkit.decode_attention`.

* :class:`KVCache` (flash, and sliding_window with an unbounded head): every past token.
* :class:`WindowCache` (sliding_window): ``attnkit.SlidingWindowCache``, sinks + the last W keys.
* :class:`RecurrentStateCache` (linear, lightning): the (B, H, D, Dv) float32 state.
* :class:`StandaloneCache`: ``attnkit.StreamingHeadsCache`` or ``attnkit.HeavyHitterCache``.
* :class:`PagedCache`: some sequences of an ``attnkit.PagedKVCache`` (serving).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..dispatch import attention

#: options of the softmax variants that a decoding step passes on
_DECODE_OPTIONS = ("scale", "softcap", "sink_logits", "alibi_slopes", "score_mod", "window", "sinks")


def decode_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The variant options that :func:`attnkit.decode_attention` takes (causal is implied)."""
    return {name: options[name] for name in _DECODE_OPTIONS if options.get(name) is not None}


class _Sequential:
    """``positions`` for caches whose sequences all have the same length (``seen``)."""

    seen = 0

    def positions(self, n: int, device=None) -> torch.Tensor:
        return torch.arange(self.seen, self.seen + n, device=device)


class KVCache(_Sequential):
    """Growing key/value cache for softmax attention: flash (causal), or sliding_window
    when some head's window is unbounded (a DuoAttention retrieval head needs every key).

    Buffers grow by doubling, so appending one token is amortized O(1) copies; the
    keys and values are stored detached (the cache is for inference). Each step is a
    :func:`attnkit.decode_attention` over the buffer with the length seen so far.
    """

    def __init__(self, variant: str = "flash") -> None:
        self.variant = variant
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.seen = 0

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.keys is None:
            self.keys = k.new_empty(k.shape[:2] + (max(16, n),) + k.shape[3:])
            self.values = v.new_empty(v.shape[:2] + (max(16, n),) + v.shape[3:])
        if self.seen + n > self.keys.shape[2]:
            size = max(2 * self.keys.shape[2], self.seen + n)
            grow = lambda x: torch.cat([x[:, :, :self.seen], x.new_empty(x.shape[:2] + (size - self.seen,)  # noqa
                                                                         + x.shape[3:])], dim=2)
            self.keys, self.values = grow(self.keys), grow(self.values)
        self.keys[:, :, self.seen:self.seen + n] = k.detach()
        self.values[:, :, self.seen:self.seen + n] = v.detach()
        self.seen += n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv)."""
        from ..decode import decode_attention

        self._append(k, v)
        lengths = torch.full((q.shape[0],), self.seen, dtype=torch.int32, device=q.device)
        return decode_attention(q, self.keys, self.values, lengths, backend=backend, **decode_options(options))


class RecurrentStateCache(_Sequential):
    """The recurrent state of linear / lightning attention: constant memory per token."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.state: Optional[torch.Tensor] = None
        self.seen = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv); n = 1 is the
        recurrent decode step."""
        out, state = attention(q, k, v, self.variant, backend,
                               **dict(options, initial_state=self.state, return_state=True))
        self.state = state.detach()
        self.seen += q.shape[2]
        return out


class WindowCache:
    """``attnkit.SlidingWindowCache`` (sinks + the last W keys in a ring buffer, constant
    memory) behind the cache protocol of this module."""

    positions = _Sequential.positions

    def __init__(self, window: Any, sinks: int = 0) -> None:
        from ..sliding_window import SlidingWindowCache

        self.inner = SlidingWindowCache(window, sinks)

    @property
    def seen(self) -> int:
        return self.inner.seen

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv); window and
        sinks are the cache's own."""
        return self.inner.attend(q, k, v, scale=options.get("scale"), softcap=options.get("softcap"),
                                 sink_logits=options.get("sink_logits"), backend=backend)


class StandaloneCache:
    """A cache with ``attnkit.SlidingWindowCache``'s protocol (``attnkit.StreamingHeadsCache``,
    ``attnkit.HeavyHitterCache``) behind the cache protocol of this module."""

    positions = _Sequential.positions

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def seen(self) -> int:
        return self.inner.seen

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        return self.inner.attend(q, k, v, scale=options.get("scale"), softcap=options.get("softcap"),
                                 sink_logits=options.get("sink_logits"), backend=backend)


class PagedCache:
    """Some sequences of an ``attnkit.PagedKVCache``, as one batch of ``attnkit.nn.Attention``.

    Row b of the block's input is sequence ``seq_ids[b]``; the sequences may hold different
    numbers of tokens (each step appends n tokens to every one). RoPE positions continue
    per sequence. One ``PagedKVCache`` per layer, all driven with the same sequence ids.
    """

    def __init__(self, cache: Any, seq_ids: Sequence[int]) -> None:
        self.cache = cache
        self.seq_ids: List[int] = list(seq_ids)

    def positions(self, n: int, device=None) -> torch.Tensor:
        """(B, n): the positions of the next n tokens of each sequence."""
        start = self.cache.seqlens(self.seq_ids).to(device=device, dtype=torch.long)
        return start[:, None] + torch.arange(n, device=device)[None, :]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        self.cache.append(self.seq_ids, k, v)
        return self.cache.attend(self.seq_ids, q, backend=backend, **decode_options(options))
