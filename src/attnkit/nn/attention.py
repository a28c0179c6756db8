"""``attnkit.nn.Attention``: the self-attention block of modern transformers, any variant."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_dropout, check_int
from ..dispatch import attention
from ..linear import lightning_slopes
from ..neighborhood.geometry import check_axis_options
from ..registry import Variant, get_variant, list_variants
from .cache import KVCache, RecurrentStateCache, StandaloneCache, WindowCache

#: variants whose attention is causal by construction, and the cache each decodes with
CACHES = {"flash": "kv", "sliding_window": "window", "linear": "state", "lightning": "state", "gla": "state",
          "delta_rule": "state"}

#: variants whose options a module checks when it is built, by the variant's own checks on a
#: one-token problem; other variants' options are checked at the first call
_CHECKED_WHEN_BUILT = ("flash", "sliding_window", "moba", "linear", "lightning", "gla", "delta_rule")
#: options that describe one particular input (its packing, its batch, its length) or carry
#: tensors of their own (mods): checked against the input at each call
_INPUT_OPTIONS = ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "initial_state", "alibi_slopes", "score_mod")
#: variants whose gates a block computes from its input, and their gate forms (the first is the default)
GATE_FORMS = {"gla": ("channel", "scalar"), "delta_rule": ("scalar", "none")}
#: GLA's low-rank gate projection and logit normaliser (GLA, flash-linear-attention's defaults)
GLA_GATE_LOW_RANK_DIM, GLA_GATE_LOGIT_NORMALIZER = 16, 16.0


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
    if spec.name in GATE_FORMS:  # the gates the block computes from its input: one-token stand-ins
        probe["g"] = torch.zeros(1, heads_q, 1, device="cpu") if spec.name == "gla" else None
        if spec.name == "delta_rule":
            probe["beta"] = torch.ones(1, heads_q, 1, device="cpu")
    k = torch.zeros(1, heads_kv, 1, head_dim, device="cpu")
    spec.validate(torch.zeros(1, heads_q, 1, head_dim, device="cpu"), k, k, probe)


def check_gate_options(variant: str, gate: str | None, low_rank_dim: int | None, logit_normalizer: float | None,
                       variant_options: dict[str, Any]) -> str | None:
    """Check a block's gate options; return its gate form (None for a variant without gates)."""
    given = {name: value for name, value in (("gate", gate), ("gate_low_rank_dim", low_rank_dim),
                                               ("gate_logit_normalizer", logit_normalizer)) if value is not None}
    if variant not in GATE_FORMS:
        if given:
            raise ValueError(f"{', '.join(f'{n}={v!r}' for n, v in given.items())}: variant {variant!r} has no "
                             f"data-dependent gates; gate options are for the variants {tuple(GATE_FORMS)}")
        return None
    for name in ("g", "beta"):
        if variant_options.get(name) is not None:
            raise ValueError(f"{name} is computed by the block from its input (gate options: gate, "
                             f"gate_low_rank_dim, gate_logit_normalizer); to pass {name} yourself, call "
                             f"attnkit.attention(q, k, v, {variant!r}, {name}=...)")
    forms = GATE_FORMS[variant]
    gate = forms[0] if gate is None else gate
    if not isinstance(gate, str):
        raise TypeError(f"gate must be one of {forms} for variant {variant!r}, got {type(gate).__name__}")
    if gate not in forms:
        raise ValueError(f"gate must be one of {forms} for variant {variant!r}, got {gate!r}")
    if gate != "channel":
        for name in ("gate_low_rank_dim", "gate_logit_normalizer"):
            if name in given:
                raise ValueError(f"{name} shapes GLA's per-channel gates: it needs gate='channel' "
                                 f"(variant 'gla'), got variant {variant!r} with gate={gate!r}")
    if low_rank_dim is not None:
        check_int("gate_low_rank_dim", low_rank_dim, minimum=1)
    if logit_normalizer is not None:
        if isinstance(logit_normalizer, bool) or not isinstance(logit_normalizer, (int, float)):
            raise TypeError(f"gate_logit_normalizer must be a number > 0, got {type(logit_normalizer).__name__}")
        if not (math.isfinite(logit_normalizer) and logit_normalizer > 0):
            raise ValueError(f"gate_logit_normalizer must be a finite number > 0, got {logit_normalizer}")
    return gate


class Gates(nn.Module):
    """The data-dependent gates of a gla or delta_rule block, computed from its input the
    standard way; ``forward(x (B, N, C))`` returns the variant's gate options, per query head,
    in float32 (float64 for a float64 block):

    * ``gate="channel"`` (gla; GLA, Yang et al. 2024): ``g = logsigmoid(gk_proj(x)) /
      gate_logit_normalizer``, (B, H, N, Dk). ``gk_proj`` is low-rank, C -> gate_low_rank_dim
      (no bias) -> H * Dk (bias); dividing by the normaliser (16) keeps the decays near 1.
    * ``gate="scalar"`` (gla: Mamba-2/SSD, simple GLA; delta_rule: GatedDeltaNet): Mamba-2's
      ``g = -exp(A_log) * softplus(dt_proj(x) + dt_bias)``, (B, H, N): A in [1, 16] and
      dt = softplus(dt_bias) log-uniform in [1e-3, 0.1] at initialisation, as Mamba-2's.
    * delta_rule: ``beta = sigmoid(b_proj(x))``, (B, H, N) (``gate="none"``: DeltaNet, no g).
    """

    def __init__(self, variant: str, gate: str, dim: int, num_heads: int, head_dim: int,
                 low_rank_dim: int = GLA_GATE_LOW_RANK_DIM,
                 logit_normalizer: float = GLA_GATE_LOGIT_NORMALIZER) -> None:
        super().__init__()
        self.variant, self.gate, self.num_heads, self.head_dim = variant, gate, num_heads, head_dim
        self.logit_normalizer = float(logit_normalizer)
        if gate == "channel":
            self.gk_proj = nn.Sequential(nn.Linear(dim, low_rank_dim, bias=False),
                                         nn.Linear(low_rank_dim, num_heads * head_dim, bias=True))
        elif gate == "scalar":
            self.dt_proj = nn.Linear(dim, num_heads, bias=False)
            # Mamba-2's initialisation: A uniform in [1, 16]; dt log-uniform in [1e-3, 0.1] (at least
            # 1e-4), stored as softplus's inverse so that softplus(dt_bias) = dt
            self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1.0, 16.0).log())
            dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if variant == "delta_rule":
            self.b_proj = nn.Linear(dim, num_heads, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, N, C) -> {"g": (B, H, N, Dk) or (B, H, N), "beta": (B, H, N)} (the variant's)."""
        B, N, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)  # gates in float32 at least: g sums over tokens
        out = {}
        if self.gate == "channel":
            logits = self.gk_proj(x).to(dtype).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            out["g"] = F.logsigmoid(logits) / self.logit_normalizer
        elif self.gate == "scalar":
            dt = F.softplus(self.dt_proj(x).to(dtype) + self.dt_bias.to(dtype))
            out["g"] = (-self.A_log.to(dtype).exp() * dt).transpose(1, 2)
        if self.variant == "delta_rule":
            out["beta"] = torch.sigmoid(self.b_proj(x).to(dtype)).transpose(1, 2)
        return out

    def extra_repr(self) -> str:
        extra = f", logit_normalizer={self.logit_normalizer:g}" if self.gate == "channel" else ""
        return f"variant={self.variant!r}, gate={self.gate!r}{extra}"


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
        gate, gate_low_rank_dim, gate_logit_normalizer: the data-dependent gates of the gla
            and delta_rule variants, which the block computes from its input per query head
            (the submodule ``self.gates``, :class:`Gates`; the user passes no ``g`` or ``beta``).
            gla: ``gate="channel"`` (default; GLA) g = logsigmoid(gk_proj(x)) /
            gate_logit_normalizer (default 16), (B, Hq, N, Dk), with gk_proj low-rank, C ->
            gate_low_rank_dim (default 16) -> Hq * Dk; ``gate="scalar"`` (Mamba-2/SSD) Mamba-2's
            g = -exp(A_log) * softplus(dt_proj(x) + dt_bias), (B, Hq, N). delta_rule:
            beta = sigmoid(b_proj(x)), (B, Hq, N), with ``gate="scalar"`` (default;
            GatedDeltaNet, Mamba-2's g) or ``gate="none"`` (DeltaNet). Other variants take none.
        **variant_options: the variant's options, e.g. ``causal=True`` (flash),
            ``window=4096, sinks=4`` or a per-head (Hq, 2) window tensor (sliding_window),
            ``slopes=...`` (lightning; default above), ``decay=...`` (linear),
            ``qk_l2norm`` (delta_rule; default True here, GatedDeltaNet's).
            Tensor options are buffers: they follow ``.to(device)``. Options are checked when
            the block is built (by the variant's own checks); those that describe one input
            (packed offsets ``cu_seqlens_q/k``, an ``initial_state``, a block mask's lengths,
            a neighborhood larger than the sequence) at each call.

    Shapes: ``forward(x (B, N, C), cache=None) -> (B, N, C)``.

    Incremental decoding: ``cache = block.new_cache()`` then ``block(x_chunk, cache=cache)``
    for successive chunks (prefill, then one token at a time). Supported for flash
    (causal; a growing KV cache), sliding_window (sinks + last W keys, constant memory; a
    growing KV cache when some head's window is unbounded),
    linear, lightning, gla and delta_rule (the (B, Hq, Dk, Dv) float32 recurrent state,
    constant memory; each step's gates come from its own tokens); softmax caches decode
    through :func:`attnkit.decode_attention`. ``new_cache("streaming_heads", full_heads=...,
    window=..., sinks=...)`` and ``new_cache("heavy_hitter", budget=..., recent=...)`` give
    the caches that keep less (flash, causal); ``attnkit.nn.PagedCache(paged, seq_ids)``
    serves sequences of an ``attnkit.PagedKVCache``. With a cache, RoPE positions continue
    from the tokens each sequence has seen.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, variant: str = "flash",
                 qkv_bias: bool = False, out_bias: bool = True,
                 rope: None | bool | float | RotaryEmbedding = None, backend: str = "auto",
                 layer_idx: int = 0, num_layers: int = 1, dropout_p: float = 0.0, gate: str | None = None,
                 gate_low_rank_dim: int | None = None, gate_logit_normalizer: float | None = None,
                 **variant_options: Any):
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
        gate = check_gate_options(self.spec.name, gate, gate_low_rank_dim, gate_logit_normalizer, variant_options)
        if self.spec.name == "delta_rule":  # the delta rule is stable on unit-norm keys: GatedDeltaNet's default
            variant_options.setdefault("qk_l2norm", True)
        options = self.spec.resolve_options(variant_options)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        check_module_options(self.spec, options, num_heads, num_kv_heads, self.head_dim)
        self.backend = backend
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=out_bias)
        self.gates = None if gate is None else Gates(
            self.spec.name, gate, dim, num_heads, self.head_dim,
            GLA_GATE_LOW_RANK_DIM if gate_low_rank_dim is None else gate_low_rank_dim,
            GLA_GATE_LOGIT_NORMALIZER if gate_logit_normalizer is None else gate_logit_normalizer)
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
        if self.gates is not None:  # g (and beta) of these tokens, from the block's input
            opts.update(self.gates(x))
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
        if self.gates is not None:
            extra += f", gate={self.gates.gate!r}"
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"variant={self.spec.name!r}{extra}")
