"""``attnkit.nn.MultiheadAttention``: torch's module, with attnkit's kernels behind it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..dispatch import attention
from ..registry import get_variant
from .attention import check_module_options


def keep_attnkit_path(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing, registered on every attnkit MultiheadAttention.

    torch's ``TransformerEncoderLayer`` runs a fused fast path
    (``torch._transformer_encoder_layer_fwd``) in eval mode under no_grad, which computes
    attention itself and never calls ``self_attn``; it skips that path when any of its modules
    has hooks. This hook makes attnkit's module run in every mode. (``TransformerEncoder`` may
    still hand the layers nested tensors; ``forward`` takes them.)
    """


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` running an attnkit variant.

    The constructor and ``forward`` take exactly torch's arguments, and the module *is*
    a ``torch.nn.MultiheadAttention`` (same parameters, same ``state_dict``): torch's
    weights load unchanged and give the same outputs. Extra keyword options:
    ``variant`` (default "flash"), ``backend`` and the variant's own options, e.g.
    ``MultiheadAttention(512, 8, batch_first=True, variant="flash", causal=True)``.

    Paths:

    * no ``attn_mask``, ``need_weights=False`` and no dropout in training (or a variant
      with ``dropout_p``): the projections run here and attention runs through
      ``attnkit.attention`` (the Triton kernel on a GPU).
    * ``key_padding_mask`` (bool, or float holding 0 and -inf; right, left or any padding)
      on the same conditions: the padded keys are dropped and the batch runs as packed
      sequences (``cu_seqlens_q/k``: unpad -> varlen -> pad), every query row over its
      entry's kept keys, as torch computes it. This needs a variant with packed batches and
      no position-dependent option (flash without causal, ALiBi or a score mod): dropping
      keys moves the ones after them. A batch entry with every key padded gets attention
      output 0, as torch's path without weights does.
    * nested tensors (``TransformerEncoder`` packs a right-padded batch into one in eval mode
      under no_grad): run as packed sequences too, and returned nested.
    * another mask (``attn_mask``, an additive float ``key_padding_mask``), ``need_weights=True``
      (torch's default!) or training dropout the variant lacks: torch's own
      ``F.multi_head_attention_forward``, exactly torch's semantics, including the
      returned weights (averaged over heads unless ``average_attn_weights=False``). The
      weights cost O(B * H * L * S) memory. This path exists only for ``variant="flash"``
      with default options; other combinations raise a ``ValueError`` naming the option.

    ``is_causal=True`` is, as in torch, a hint that ``attn_mask`` is the causal mask: with
    L == S, no key padding and no weights it runs the causal kernel.

    Inside ``nn.TransformerEncoderLayer`` / ``nn.Transformer`` the module is called in every
    mode: a no-op forward pre-hook (:func:`keep_attnkit_path`) turns off torch's fused
    encoder-layer fast path, which would otherwise bypass ``self_attn`` in eval mode.

    Examples::

        >>> layer = torch.nn.TransformerEncoderLayer(256, 8, batch_first=True)
        >>> layer.self_attn = attnkit.nn.MultiheadAttention(256, 8, batch_first=True)
        >>> x = torch.randn(2, 100, 256)
        >>> pad = torch.arange(100) >= torch.tensor([[100], [60]])     # (N, S), True = padding
        >>> with torch.no_grad():
        ...     layer.eval()(x, src_key_padding_mask=pad).shape
        torch.Size([2, 100, 256])
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None, *,
                 variant: str = "flash", backend: str = "auto", **variant_options: Any):
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.spec = get_variant(variant)
        self.variant_options = self.spec.resolve_options(variant_options)
        check_module_options(self.spec, self.variant_options, num_heads, num_heads, embed_dim // num_heads)
        self.backend = backend
        self.register_forward_pre_hook(keep_attnkit_path)

    def _torch_path_blockers(self) -> list[str]:
        """Why torch's masked/weights path cannot stand in for this variant."""
        if self.spec.name != "flash":
            return [f"variant={self.spec.name!r}"]
        defaults = get_variant("flash").options
        return [f"{name}={value!r}" for name, value in self.variant_options.items()
                if value is not defaults[name] and value != defaults[name]]

    def _varlen_blockers(self, keys_dropped: bool) -> list[str]:
        """Why this variant cannot run the batch as packed sequences (empty if it can). With
        ``keys_dropped`` padded keys are removed from anywhere in a row, which moves the keys
        after them: then no option may read positions."""
        if "cu_seqlens_q" not in self.spec.options:
            return [f"variant={self.spec.name!r} (no packed batches)"]
        given = [name for name in ("cu_seqlens_q", "cu_seqlens_k") if self.variant_options[name] is not None]
        if keys_dropped:
            if self.spec.name != "flash":
                return [f"variant={self.spec.name!r}"]
            given += [name for name in ("causal", "alibi_slopes", "score_mod") if self.variant_options[name]]
        return [f"{name}={self.variant_options[name]!r}" for name in given]

    def _padding(self, key_padding_mask: Any, key: torch.Tensor, batched: bool) -> torch.Tensor | None:
        """``key_padding_mask`` as a bool (N, S) mask, True = padded key; None for a float mask
        with other values than 0 and -inf (an additive bias, which only torch's path computes)."""
        if not isinstance(key_padding_mask, torch.Tensor) or not (
                key_padding_mask.dtype == torch.bool or key_padding_mask.is_floating_point()):
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise TypeError(f"key_padding_mask must be a bool or floating tensor (True / -inf = padding), got {got}")
        seq_dim = (1 if self.batch_first else 0) if batched else 0
        want = (key.shape[1 - seq_dim], key.shape[seq_dim]) if batched else (key.shape[0],)
        if tuple(key_padding_mask.shape) != want:
            names = "(N, S)" if batched else "(S,)"
            raise ValueError(f"key_padding_mask must have shape {names} = {want} for a key of shape "
                             f"{tuple(key.shape)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype == torch.bool:
            pad = key_padding_mask
        else:
            pad = torch.isneginf(key_padding_mask)
            if bool((~pad & (key_padding_mask != 0)).any()):
                return None
        return pad if batched else pad[None]

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """torch's shapes: batched query (L, N, E), key (S, N, kdim), value (S, N, vdim) (batch first
        with ``batch_first``), or unbatched (L, E), (S, kdim), (S, vdim)."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        E = self.embed_dim
        if query.dim() not in (2, 3) or query.shape[-1] != E:
            batched = f"(N, L, {E})" if self.batch_first else f"(L, N, {E})"
            raise ValueError(f"query must have shape {batched} (batched) or (L, {E}) (unbatched), "
                             f"got {tuple(query.shape)}")
        if query.dim() == 3:
            dims = ("N", "S", "width") if self.batch_first else ("S", "N", "width")
            batch = query.shape[dims.index("N")]
        else:
            dims, batch = ("S", "width"), None
        tokens = None  # value holds the tokens of key
        for name, x, width in (("key", key, self.kdim), ("value", value, self.vdim)):
            sizes = {"N": batch, "S": tokens, "width": width}
            want = tuple(sizes[d] for d in dims)
            if x.dim() != len(dims) or any(size is not None and x.shape[i] != size for i, size in enumerate(want)):
                layout = ", ".join(str(width) if d == "width" else d for d in dims)
                filled = ", ".join(d if size is None else str(size) for d, size in zip(dims, want))
                raise ValueError(f"{name} must have shape ({layout}) = ({filled}) for a query of shape "
                                 f"{tuple(query.shape)}, got {tuple(x.shape)}")
            tokens = x.shape[dims.index("S")]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (L, N, E) or (N, L, E) with ``batch_first`` (or unbatched (L, E)); key/value
        (S, N, kdim/vdim) likewise; key_padding_mask (N, S) (or (S,)), True or -inf = padding;
        or nested (N, L_i, E) query/key/value (batch_first). Returns (output like query,
        weights or None)."""
        if any(x.is_nested for x in (query, key, value) if isinstance(x, torch.Tensor)):
            return self._nested_forward(query, key, value, key_padding_mask, attn_mask), None
        self._check_inputs(query, key, value)
        batched = query.dim() == 3
        needs_torch = []
        if attn_mask is not None:
            needs_torch.append("attn_mask")
        if need_weights:
            needs_torch.append("need_weights=True")
        dropout_p = 0.0
        if self.dropout > 0 and self.training:
            if "dropout_p" in self.spec.options:
                dropout_p = self.dropout
            else:
                needs_torch.append("dropout in training")
        pad = None
        if key_padding_mask is not None:
            pad = self._padding(key_padding_mask, key, batched)
            if pad is None or needs_torch or self._varlen_blockers(keys_dropped=True):
                needs_torch.append("key_padding_mask")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (it is a hint that attn_mask is causal, as in torch); "
                             "for a causal variant without a mask pass causal=True to the constructor")
        seq_dim = (1 if self.batch_first else 0) if batched else 0
        # With L == S torch's top-left causal mask equals the kernel's bottom-right one.
        causal_hint = (is_causal and needs_torch == ["attn_mask"] and query.shape[seq_dim] == key.shape[seq_dim]
                       and self.bias_k is None and not self.add_zero_attn and "causal" in self.spec.options)
        if causal_hint:
            needs_torch = []
        if needs_torch:
            blockers = self._torch_path_blockers()
            if blockers:
                packed = ""
                if "key_padding_mask" in needs_torch:
                    packed = ("; a bool key_padding_mask alone runs as packed sequences on a variant without "
                              "positions (flash without causal, alibi_slopes or score_mod)")
                raise ValueError(f"{', '.join(needs_torch)} is not supported together with {', '.join(blockers)}: "
                                 "masks and attention weights take torch's path, which computes plain softmax "
                                 f"attention (variant='flash' with default options){packed}")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._attnkit_forward(query, key, value, batched, causal_hint, pad, dropout_p=dropout_p), None

    def _nested_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_padding_mask: Any, attn_mask: Any) -> torch.Tensor:
        """Nested (N, L_i, E) query and (N, S_i, kdim/vdim) key/value, as TransformerEncoder builds
        them from a right-padded batch: run as packed sequences, returned nested like query."""
        if not all(isinstance(x, torch.Tensor) and x.is_nested for x in (query, key, value)):
            raise ValueError("query, key and value must be nested tensors together (or none of them)")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("nested tensors carry their own lengths: key_padding_mask and attn_mask must be None")
        if not self.batch_first:
            raise ValueError("nested tensors need batch_first=True (as torch's fast path)")
        blockers = self._varlen_blockers(keys_dropped=False)
        if blockers:
            raise ValueError(f"nested tensors run as packed sequences, not supported with {', '.join(blockers)}")
        q_lengths = [t.shape[0] for t in query.unbind()]
        k_lengths = [t.shape[0] for t in key.unbind()]
        if [t.shape[0] for t in value.unbind()] != k_lengths:
            raise ValueError("key and value must hold the same number of tokens per sequence")

        def padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            pos = torch.arange(max(lengths, default=0), device=x.device)
            return torch.nested.to_padded_tensor(x, 0.0), pos >= torch.tensor(lengths, device=x.device)[:, None]

        (q, q_pad), (k, k_pad) = padded(query, q_lengths), padded(key, k_lengths)
        v, _ = padded(value, k_lengths)
        out = self._attnkit_forward(q, k, v, True, False, k_pad, query_pad=q_pad, dropout_p=0.0)
        return torch.nested.nested_tensor([out[i, :n] for i, n in enumerate(q_lengths)], layout=query.layout)

    def _attnkit_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batched: bool,
                         causal: bool, pad: torch.Tensor | None = None, query_pad: torch.Tensor | None = None,
                         dropout_p: float = 0.0) -> torch.Tensor:
        """Projections, attention on attnkit, output projection. ``pad`` (N, S) bool drops padded
        keys and runs the batch as packed sequences; ``query_pad`` (N, L) drops padded queries
        too (their output rows are 0)."""
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first or not batched:  # to (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        E, H = self.embed_dim, self.num_heads
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        N, L = q.shape[0], q.shape[1]
        extra = []  # one learned and/or one zero key/value token appended to every sequence, never padding
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, 1, E).expand(N, 1, E), self.bias_v.view(1, 1, E).expand(N, 1, E)))
        if self.add_zero_attn:
            extra.append((k.new_zeros(N, 1, E), v.new_zeros(N, 1, E)))
        for k_extra, v_extra in extra:
            k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
            if pad is not None:
                pad = torch.cat([pad, pad.new_zeros(N, 1)], dim=1)

        options = dict(self.variant_options)
        if causal:
            options["causal"] = True
        if dropout_p:
            options["dropout_p"] = dropout_p
        if pad is None:  # (N, L, E) read as (N, L, H, E / H): layout "bshd", no copy
            out = attention(q.view(N, L, H, E // H), k.view(N, -1, H, E // H), v.view(N, -1, H, E // H),
                            self.spec.name, self.backend, layout="bshd", **options)
        else:  # unpad -> varlen -> pad: each query row over its entry's kept keys
            keep_k = ~pad
            keep_q = None if query_pad is None else ~query_pad
            k_tokens, v_tokens = k[keep_k], v[keep_k]                       # (T_k, E), row by row
            q_tokens = q.reshape(N * L, E) if keep_q is None else q[keep_q]
            q_lengths = (torch.full((N,), L, device=q.device) if keep_q is None else keep_q.sum(dim=1))
            options.update(cu_seqlens_q=_offsets(q_lengths), cu_seqlens_k=_offsets(keep_k.sum(dim=1)))
            out = attention(q_tokens.view(1, -1, H, E // H), k_tokens.view(1, -1, H, E // H),
                            v_tokens.view(1, -1, H, E // H), self.spec.name, self.backend, layout="bshd",
                            **options)
            if isinstance(out, tuple):
                out = out[0]
            if keep_q is not None:
                out = q.new_zeros(N, L, E).index_put((keep_q,), out.reshape(-1, E))
        if isinstance(out, tuple):
            out = out[0]
        out = self.out_proj(out.reshape(N, L, E))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        return out if batched else out.squeeze(1)


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    """(S,) lengths -> (S + 1,) int32 offsets of the sequences packed one after another."""
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
