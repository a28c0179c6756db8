"""``attnkit.nn.Attention``: the self-attention block of modern transformers, any variant."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..dispatch import attention
from ..registry import get_variant


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, GQA and a pluggable variant.

    Args:
        dim: model width C.
        num_heads: query heads Hq; the head dim is C // Hq.
        num_kv_heads: key/value heads Hkv (divides Hq); default Hq.
        variant: a registered variant name, e.g. "flash".
        qkv_bias, out_bias: biases of the input and output projections.
        backend: "auto", "triton" or "reference".
        **variant_options: options of the variant, e.g. ``causal=True``.

    Shapes: forward(x (B, N, C)) -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, variant: str = "flash",
                 qkv_bias: bool = False, out_bias: bool = True, backend: str = "auto", **variant_options: Any):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.spec = get_variant(variant)
        self.variant_options = self.spec.resolve_options(variant_options)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        out = attention(q, k, v, self.spec.name, self.backend, **self.variant_options)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"variant={self.spec.name!r}")
