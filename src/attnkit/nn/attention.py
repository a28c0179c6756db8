"""``attnkit.nn.Attention``: the self-attention block of modern transformers, any variant."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checks import check_dropout, check_int
from ..dispatch import attention
from ..linear import lightning_slopes
from ..neighborhood.geometry import check_axis_options
from ..registry import Variant, get_variant, list_variants
from .cache import KVCache, RecurrentStateCache, StandaloneCache, WindowCache

#: variants whose attention is causal by construction, and the cache each decodes with
CACHES = {"flash": "kv", "sliding_window": "window", "linear": "state", "lightning": "state"}

#: variants whose options a module checks when it is built, by the variant's own checks on a
#: one-token problem; other variants' options are checked at the first call
_CHECKED_WHEN_BUILT = ("flash", "sliding_window", "moba", "linear", "lightning")
#: options that describe one particular input (its packing, its batch, its length) or carry
#: tensors of their own (mods): checked against the input at each call
_INPUT_OPTIONS = ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "initial_state", "alibi_slopes", "score_mod")


def check_module_options(spec: Variant, options: dict[str, Any], heads_q: int, heads_kv: int,
                         head_dim: int) -> None:
    """Check a module's variant options when it is built, with the variant's own checks, so that a
    bad option (``window=-3``, a missing ``window``, ``kernel_size=0``) fails in ``__init__``
    rather than at the first call.

    ``options`` are the resolved options; heads_q, heads_kv and head_dim are the module's.
    For the variants in ``_CHECKED_WHEN_BUILT`` the variant's ``validate`` runs on a one-token
    problem q (1, heads_q, 1, head_dim), k and v (1, heads_kv, 1, head_dim) on the CPU (tensor
    options are checked as CPU copies: modules move them with ``.to``); the options of
    ``_INPUT_OPTIONS`` are left for the call, and so are all options of a module built on the
    meta device (their values are not known yet). Neighborhood attention checks its per-axis
    options.
    """
    if spec.name == "neighborhood":
        check_axis_options(options["kernel_size"], options["dilation"], options["causal"], options["stride"], 1)
        return
    tensors = [value for value in options.values() if isinstance(value, torch.Tensor)]
    if spec.name not in _CHECKED_WHEN_BUILT or any(t.is_meta for t in tensors):
        return
    probe = {name: value.detach().cpu() if isinstance(value, torch.Tensor) else value
             for name, value in options.items()}
    probe.update({name: spec.options[name] for name in _INPUT_OPTIONS if name in probe})
    k = torch.zeros(1, heads_kv, 1, head_dim, device="cpu")
    spec.validate(torch.zeros(1, heads_q, 1, head_dim, device="cpu"), k, k, probe)


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
        backend: "auto", "triton", "torch" or "reference".
        dropout_p: attention dropout probability in [0, 1) (as FlashAttention's and torch's
            ``dropout_p``), applied in ``train()`` mode only: the block passes it to the
            variant while ``self.training`` and 0 in ``eval()``. The softmax variants take
            it (flash, sliding_window, block_sparse, moba, neighborhood, flex); another
            variant with ``dropout_p > 0`` is a ValueError. Not with a decoding cache in
            training (a ValueError: decode in ``eval()``).
        layer_idx, num_layers: this block's index among the model's ``num_layers`` blocks
            (0 <= layer_idx < num_layers), as flash-linear-attention's layers take them. A
            lightning block without ``slopes`` uses the standard ones,
            ``attnkit.lightning_slopes(num_heads, layer_idx, num_layers)`` (early layers decay
            fast, the last one hardly at all); other variants only record them.
        **variant_options: the variant's options, e.g. ``causal=True`` (flash),
            ``window=4096, sinks=4`` or a per-head (Hq, 2) window tensor (sliding_window),
            ``slopes=...`` (lightning; default above), ``decay=...`` (linear).
            Tensor options are buffers: they follow ``.to(device)``. Options are checked when
            the block is built (by the variant's own checks); those that describe one input
            (packed offsets ``cu_seqlens_q/k``, an ``initial_state``, a block mask's lengths,
            a neighborhood larger than the sequence) at each call.

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

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, variant: str = "flash",
                 qkv_bias: bool = False, out_bias: bool = True,
                 rope: None | bool | float | RotaryEmbedding = None, backend: str = "auto",
                 layer_idx: int = 0, num_layers: int = 1, dropout_p: float = 0.0, **variant_options: Any):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layer_idx = check_int("layer_idx", layer_idx, minimum=0)
        self.num_layers = check_int("num_layers", num_layers, minimum=1)
        if layer_idx >= num_layers:
            raise ValueError(f"layer_idx must be < num_layers ({num_layers}), got {layer_idx}")
        self.spec = get_variant(variant)
        self.dropout_p = check_dropout(dropout_p)
        if self.dropout_p > 0 and "dropout_p" not in self.spec.options:
            dropping = sorted(name for name in list_variants() if "dropout_p" in get_variant(name).options)
            raise ValueError(f"dropout_p={dropout_p}: variant {self.spec.name!r} has no attention dropout; "
                             f"the variants that have it: {dropping}")
        if self.spec.name == "lightning":
            if variant_options.get("slopes") is None:
                variant_options["slopes"] = lightning_slopes(num_heads, layer_idx, num_layers)
            elif (layer_idx, num_layers) != (0, 1):
                raise ValueError("pass slopes or layer_idx/num_layers (which give the standard slopes), not both")
        options = self.spec.resolve_options(variant_options)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        check_module_options(self.spec, options, num_heads, num_kv_heads, self.head_dim)
        self.backend = backend
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=out_bias)
        if rope is None or rope is False:
            self.rope = None
        elif isinstance(rope, RotaryEmbedding):
            if rope.head_dim != self.head_dim:
                raise ValueError(f"rope has head_dim {rope.head_dim} but this block's head dim is {self.head_dim} "
                                 f"(dim // num_heads = {dim} // {num_heads})")
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

    def new_cache(self, kind: str | None = None, **cache_options: Any):
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

    def forward(self, x: torch.Tensor, cache: Any | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); with a cache, x holds the next N tokens of each sequence."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, N, {self.dim}), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.rope is not None:
            positions = torch.arange(N, device=x.device) if cache is None else cache.positions(N, x.device)
            q, k = self.rope(q, positions), self.rope(k, positions)
        opts = self.options()
        if "dropout_p" in opts:  # attention dropout while training only, as torch's modules
            opts["dropout_p"] = self.dropout_p if self.training else 0.0
        if cache is not None:
            if opts.get("dropout_p"):
                raise ValueError(f"attention dropout (dropout_p={self.dropout_p}) in train() mode with a decoding "
                                 "cache: decoding steps take no dropout; call eval() to decode")
            out = cache.attend(q, k, v, opts, self.backend)
        else:
            out = attention(q, k, v, self.spec.name, self.backend, **opts)
            if isinstance(out, tuple):
                out = out[0]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        extra = f", layer_idx={self.layer_idx}, num_layers={self.num_layers}" if self.num_layers > 1 else ""
        if self.dropout_p:
            extra += f", dropout_p={self.dropout_p}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"variant={self.spec.name!r}{extra}")
