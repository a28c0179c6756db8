"""Incremental-decoding caches for ``attnkit.nn.Attention``.

Each cache has ``seen`` (tokens consumed so far, which is also the position of the
next token) and ``attend(q, k, v, options)``: append the n new tokens and return the
output of their n queries over everything seen so far.

* :class:`KVCache` (flash): the keys and values of every past token; causal
  attention with bottom-right alignment makes n new queries see the whole past.
* :class:`WindowCache` (sliding_window): ``attnkit.SlidingWindowCache``, sinks + the last W keys.
* :class:`RecurrentStateCache` (linear, lightning): the (B, H, D, Dv) float32 state.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..dispatch import attention


class KVCache:
    """Growing key/value cache for softmax attention: flash (causal), or sliding_window
    when some head's window is unbounded (a DuoAttention retrieval head needs every key).

    Buffers grow by doubling, so appending one token is amortized O(1) copies; the
    keys and values are stored detached (the cache is for inference).
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
        self._append(k, v)
        if self.variant == "flash":
            options = dict(options, causal=True)
        return attention(q, self.keys[:, :, :self.seen], self.values[:, :, :self.seen], self.variant, backend,
                         **options)


class RecurrentStateCache:
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
