"""``attnkit.nn.Attention``: the self-attention block of modern transformers, any variant."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ..dispatch import attention
from ..registry import get_variant
from .cache import KVCache, RecurrentStateCache, StandaloneCache, WindowCache

#: variants whose attention is causal by construction, and the cache each decodes with
CACHES = {"flash": "kv", "sliding_window": "window", "linear": "state", "lightning": "state"}


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), in the "rotate half" layout of Llama/HF.

    ``forward(x, positions)``: x (B, H, N, D) with even D, positions (N,) int ->
    x rotated by angle ``position * base^(-2i/D)`` in the pairs (i, i + D/2).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
        if not base > 0:
            raise ValueError(f"rope base must be > 0, got {base}")
        self.head_dim, self.base = head_dim, float(base)
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, H, N, D); positions (N,), or (B, N) when the rows of a batch are at different positions."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # (N, D/2) or (B, N, D/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
        if positions.dim() == 2:  # one position row per batch entry: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, GQA, optional RoPE and a
    pluggable variant.

    Args:
        dim: model width C.
        num_heads: query heads Hq; the head dim is C // Hq.
        num_kv_heads: key/value heads Hkv (divides Hq); default Hq.
        variant: a registered variant name: "flash", "sliding_window", "linear",
            "lightning", "block_sparse", "moba", ...
        qkv_bias, out_bias: biases of the input and output projections.
        rope: None (no positions), True (RoPE, base 10000), a float base, or a
            :class:`RotaryEmbedding`; applied to q and k.
        backend: "auto", "triton" or "reference".
        **variant_options: the variant's options, e.g. ``causal=True`` (flash),
            ``window=4096, sinks=4`` or a per-head (Hq, 2) window tensor (sliding_window),
            ``slopes=attnkit.lightning_slopes(Hq, l, L)`` (lightning), ``decay=...`` (linear).
            Tensor options are buffers: they follow ``.to(device)``.

    Shapes: ``forward(x (B, N, C), cache=None) -> (B, N, C)``.

    Incremental decoding: ``cache = block.new_cache()`` then ``block(x_chunk, cache=cache)``
    for successive chunks (prefill, then one token at a time). Supported for flash
    (causal; a growing KV cache), sliding_window (sinks + last W keys, constant memory; a
    growing KV cache when some head's window is unbounded),
    linear and lightning (the recurrent state, constant memory); softmax caches decode
    through :func:`attnkit.decode_attention`. ``new_cache("streaming_heads", full_heads=...,
    window=..., sinks=...)`` and ``new_cache("heavy_hitter", budget=..., recent=...)`` give
    the caches that keep less (flash, causal); ``attnkit.nn.PagedCache(paged, seq_ids)``
    serves sequences of an ``attnkit.PagedKVCache``. With a cache, RoPE positions continue
    from the tokens each sequence has seen.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, variant: str = "flash",
                 qkv_bias: bool = False, out_bias: bool = True,
                 rope: Union[None, bool, float, RotaryEmbedding] = None, backend: str = "auto",
                 **variant_options: Any):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.spec = get_variant(variant)
        options = self.spec.resolve_options(variant_options)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=out_bias)
        if rope is None or rope is False:
            self.rope = None
        elif isinstance(rope, RotaryEmbedding):
            self.rope = rope
        elif rope is True or (isinstance(rope, (int, float)) and not isinstance(rope, bool)):
            self.rope = RotaryEmbedding(self.head_dim, 10000.0 if rope is True else float(rope))
        else:
            raise TypeError(f"rope must be None, True, a float base or an attnkit.nn.RotaryEmbedding, got {rope!r}")
        # Tensor options (per-head windows, slopes, sink logits, ...) live as buffers.
        self._tensor_options = []
        for name, value in list(options.items()):
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"option_{name}", value)
                self._tensor_options.append(name)
                options[name] = None
        self.variant_options = options

    def options(self) -> dict:
        """The variant options with the tensor ones taken from this module's buffers."""
        opts = dict(self.variant_options)
        for name in self._tensor_options:
            opts[name] = getattr(self, f"option_{name}")
        return opts

    def new_cache(self, kind: Optional[str] = None, **cache_options: Any):
        """An empty incremental-decoding cache for this block's variant.

        ``kind=None``: the variant's own cache (KV, window or recurrent state).
        ``"streaming_heads"`` (``full_heads``, ``window``, ``sinks``) and ``"heavy_hitter"``
        (``budget``, ``recent``): :class:`attnkit.StreamingHeadsCache` /
        :class:`attnkit.HeavyHitterCache`, for causal flash blocks.
        """
        opts = self.options()
        if kind is not None:
            from ..decode import HeavyHitterCache, StreamingHeadsCache

            makers = {"streaming_heads": StreamingHeadsCache, "heavy_hitter": HeavyHitterCache}
            if kind not in makers:
                raise ValueError(f"kind must be None, 'streaming_heads' or 'heavy_hitter', got {kind!r}")
            if self.spec.name != "flash" or not opts.get("causal"):
                raise ValueError(f"a {kind} cache decodes causal softmax attention: it needs variant='flash' with "
                                 "causal=True")
            return StandaloneCache(makers[kind](**cache_options))
        kind = CACHES.get(self.spec.name)
        if kind == "kv":
            if not opts.get("causal"):
                raise ValueError("decoding with a KV cache needs causal=True for the flash variant")
            return KVCache()
        if kind == "window":
            from ..sliding_window.window import head_windows

            if min(left for left, _ in head_windows(opts["window"], self.num_heads)) < 0:
                return KVCache("sliding_window")  # an unbounded head needs every past key
            return WindowCache(opts["window"], opts["sinks"])
        if kind == "state":
            if self.spec.name == "linear" and not opts.get("causal", True):
                raise ValueError("decoding with a recurrent state needs causal=True for the linear variant")
            return RecurrentStateCache(self.spec.name)
        raise ValueError(f"variant {self.spec.name!r} has no incremental-decoding cache; "
                         f"supported: {sorted(CACHES)}")

    def forward(self, x: torch.Tensor, cache: Optional[Any] = None) -> torch.Tensor:
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        qkv = self.qkv(x).view(B, N, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.rope is not None:
            positions = torch.arange(N, device=x.device) if cache is None else cache.positions(N, x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        opts = self.options()
        if cache is not None:
            out = cache.attend(q, k, v, opts, self.backend)
        else:
            out = attention(q, k, v, self.spec.name, self.backend, **opts)
            if isinstance(out, tuple):
                out = out[0]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"variant={self.spec.name!r}")
