"""``attnkit.nn.MultiheadAttention``: torch's module, with attnkit's kernels behind it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..dispatch import attention
from ..registry import get_variant
from .attention import check_module_options


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` running an attnkit variant.

    The constructor and ``forward`` take exactly torch's arguments, and the module *is*
    a ``torch.nn.MultiheadAttention`` (same parameters, same ``state_dict``): torch's
    weights load unchanged and give the same outputs. Extra keyword options:
    ``variant`` (default "flash"), ``backend`` and the variant's own options, e.g.
    ``MultiheadAttention(512, 8, batch_first=True, variant="flash", causal=True)``.

    Paths:

    * no ``attn_mask`` / ``key_padding_mask``, ``need_weights=False`` and no dropout in
      training: the projections run here and attention runs through ``attnkit.attention``
      (the Triton kernel on a GPU).
    * a mask, ``need_weights=True`` (torch's default!) or training dropout: torch's own
      ``F.multi_head_attention_forward``, exactly torch's semantics, including the
      returned weights (averaged over heads unless ``average_attn_weights=False``). The
      weights cost O(B * H * L * S) memory. This path exists only for ``variant="flash"``
      with default options; other combinations raise a ``ValueError`` naming the option.

    ``is_causal=True`` is, as in torch, a hint that ``attn_mask`` is the causal mask: with
    L == S, no key padding and no weights it runs the causal kernel.
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

    def _torch_path_blockers(self) -> list[str]:
        """Why torch's masked/weights path cannot stand in for this variant."""
        if self.spec.name != "flash":
            return [f"variant={self.spec.name!r}"]
        defaults = get_variant("flash").options
        return [f"{name}={value!r}" for name, value in self.variant_options.items()
                if value is not defaults[name] and value != defaults[name]]

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
        (S, N, kdim/vdim) likewise. Returns (output like query, weights or None)."""
        self._check_inputs(query, key, value)
        needs_torch = []
        if attn_mask is not None:
            needs_torch.append("attn_mask")
        if key_padding_mask is not None:
            needs_torch.append("key_padding_mask")
        if need_weights:
            needs_torch.append("need_weights=True")
        if self.dropout > 0 and self.training:
            needs_torch.append("dropout in training")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (it is a hint that attn_mask is causal, as in torch); "
                             "for a causal variant without a mask pass causal=True to the constructor")
        batched = query.dim() == 3
        seq_dim = (1 if self.batch_first else 0) if batched else 0
        # With L == S torch's top-left causal mask equals the kernel's bottom-right one.
        causal_hint = (is_causal and needs_torch == ["attn_mask"] and query.shape[seq_dim] == key.shape[seq_dim]
                       and self.bias_k is None and not self.add_zero_attn and "causal" in self.spec.options)
        if causal_hint:
            needs_torch = []
        if needs_torch:
            blockers = self._torch_path_blockers()
            if blockers:
                raise ValueError(f"{', '.join(needs_torch)} is not supported together with {', '.join(blockers)}: "
                                 "masks and attention weights take torch's path, which computes plain softmax "
                                 "attention (variant='flash' with default options)")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._attnkit_forward(query, key, value, batched, causal_hint), None

    def _attnkit_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batched: bool,
                         causal: bool) -> torch.Tensor:
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
        N = q.shape[0]
        if self.bias_k is not None:  # one learned key/value token appended to every sequence
            k = torch.cat([k, self.bias_k.view(1, 1, E).expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, E).expand(N, 1, E)], dim=1)
        if self.add_zero_attn:  # one all-zero key/value token appended
            k = torch.cat([k, k.new_zeros(N, 1, E)], dim=1)
            v = torch.cat([v, v.new_zeros(N, 1, E)], dim=1)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (N, L, E) -> (N, H, L, E / H)
            return x.reshape(N, x.shape[1], H, E // H).transpose(1, 2)

        options = dict(self.variant_options)
        if causal:
            options["causal"] = True
        out = attention(heads(q), heads(k), heads(v), self.spec.name, self.backend, **options)
        if isinstance(out, tuple):
            out = out[0]
        out = self.out_proj(out.transpose(1, 2).reshape(N, -1, E))
        if not self.batch_first or not batched:
            out = out.transpose(0, 1)
        return out if batched else out.squeeze(1)
