"""Incremental-decoding caches for ``attnkit.nn.Attention``.

Each cache has ``positions(n)`` (the positions of the next n tokens: (n,), or (B, n) when
the sequences of a batch have different lengths) and ``attend(q, k, v, options,
backend)``: append the n new tokens and return the output of their n queries over
what the cache keeps. Softmax caches decode through :func:`attnkit.decode_attention`.
A call that raises changes nothing: each cache checks the whole call before it stores
a key, and a cache serves one batch of sequences from its first call to its last.

* :class:`KVCache` (flash, and sliding_window with an unbounded head): every past token.
* :class:`WindowCache` (sliding_window): ``attnkit.SlidingWindowCache``, sinks + the last W keys.
* :class:`RecurrentStateCache` (linear, lightning, gla, delta_rule): the (B, H, D, Dv) float32 state.
* :class:`StandaloneCache`: ``attnkit.StreamingHeadsCache`` or ``attnkit.HeavyHitterCache``.
* :class:`PagedCache`: some sequences of an ``attnkit.PagedKVCache`` (serving).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..decode.caches import GrowingKV, check_step
from ..dispatch import attention

#: options of the softmax variants that a decoding step passes on
_DECODE_OPTIONS = ("scale", "softcap", "sink_logits", "alibi_slopes", "score_mod", "window", "sinks")


def decode_options(options: dict[str, Any]) -> dict[str, Any]:
    """The variant options that :func:`attnkit.decode_attention` takes (causal is implied)."""
    return {name: options[name] for name in _DECODE_OPTIONS if options.get(name) is not None}


class _Sequential:
    """``positions`` for caches whose sequences all have the same length (``seen``)."""

    seen = 0

    def positions(self, n: int, device=None) -> torch.Tensor:
        return torch.arange(self.seen, self.seen + n, device=device)


class KVCache(GrowingKV, _Sequential):
    """Growing key/value cache for softmax attention: flash (causal), or sliding_window
    when some head's window is unbounded (a DuoAttention retrieval head needs every key).

    Buffers grow by doubling, so appending one token is amortized O(1) copies; the
    keys (B, Hkv, slots, D) and values (B, Hkv, slots, Dv) are stored detached (the cache
    is for inference). Each step is a :func:`attnkit.decode_attention` over the buffer
    with the length seen so far.
    """

    def __init__(self, variant: str = "flash") -> None:
        super().__init__()
        self.variant = variant

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv)."""
        options = decode_options(options)
        check_step(q, k, v, backend, **options)
        self.check(k, v)
        self.append(k, v)
        return self.decode(q, backend=backend, **options)


class RecurrentStateCache(_Sequential):
    """The recurrent state of linear, lightning, gla and delta_rule attention, (B, Hq, Dk, Dv)
    float32: constant memory per token. The gated variants' ``g``/``beta`` of the new tokens come
    in ``options`` (``attnkit.nn.Attention`` computes them from its input)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.state: torch.Tensor | None = None
        self.seen = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv); n = 1 is the
        recurrent decode step."""
        if self.state is not None and q.shape[0] != self.state.shape[0]:
            raise ValueError(f"q has batch {q.shape[0]} but the cache holds the state of {self.state.shape[0]} "
                             "sequences: a cache decodes one batch from its first call to its last; make a new "
                             "cache for another batch")
        # the state changes only once the step has been computed, so a call that raises changes nothing
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
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
        self.seq_ids: list[int] = list(seq_ids)

    def positions(self, n: int, device=None) -> torch.Tensor:
        """(B, n): the positions of the next n tokens of each sequence."""
        start = self.cache.seqlens(self.seq_ids).to(device=device, dtype=torch.long)
        return start[:, None] + torch.arange(n, device=device)[None, :]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
               backend: str = "auto") -> torch.Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv), B = len(seq_ids)."""
        options = decode_options(options)
        check_step(q, k, v, backend, **options)
        if k.shape[0] != len(self.seq_ids):
            raise ValueError(f"k has batch {k.shape[0]} but the cache holds {len(self.seq_ids)} sequences "
                             f"(seq_ids {self.seq_ids}): row b of the input is sequence seq_ids[b]")
        self.cache.append(self.seq_ids, k, v)  # checks k and v against the pool before it writes
        return self.cache.attend(self.seq_ids, q, backend=backend, **options)
