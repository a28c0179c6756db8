"""``attnkit.nn.NeighborhoodAttention1D/2D/3D``: NATTEN-style neighborhood attention modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..neighborhood import neighborhood_attention
from ..neighborhood.geometry import check_axis_options


class _NeighborhoodAttentionND(nn.Module):
    """Multi-head neighborhood self-attention over a channels-last feature map.

    Args:
        dim: channels C; the head dim is C // num_heads.
        num_heads: attention heads.
        kernel_size, dilation, causal, stride: as in :func:`attnkit.neighborhood_attention`
            (an int/bool, or one value per spatial axis).
        qkv_bias: bias of the fused qkv projection.
        proj_drop: dropout after the output projection.

    Shapes: forward(x (B, *spatial, C)) -> (B, *spatial, C), ``spatial`` with
    ``NDIM`` axes. The attribute ``backend`` ("auto", "triton", "torch" or "reference") picks
    the backend of the attention op.
    """

    NDIM = 0

    def __init__(self, dim: int, num_heads: int, kernel_size: int | Sequence[int],
                 dilation: int | Sequence[int] = 1, causal: bool | Sequence[bool] = False,
                 stride: int | Sequence[int] = 1, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        # per-axis tuples, checked now by the op's own checks; kernel_size * dilation <= the axis
        # length is checked against each input
        self.kernel_size, self.dilation, self.causal, self.stride = check_axis_options(
            kernel_size, dilation, causal, stride, self.NDIM)
        self.backend = "auto"
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, *spatial, C) -> (B, *spatial, C)."""
        layout = f"(B, {', '.join(f'X{i}' for i in range(self.NDIM))}, {self.dim})"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
        if x.dim() != self.NDIM + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} takes x of shape {layout}, got {tuple(x.shape)}")
        B, spatial = x.shape[0], tuple(x.shape[1:-1])
        qkv = self.qkv(x).view(B, *spatial, 3, self.num_heads, self.head_dim)
        # (B, *spatial, 3, H, hd) -> (3, B, H, *spatial, hd)
        qkv = qkv.permute(self.NDIM + 1, 0, self.NDIM + 2, *range(1, self.NDIM + 1), self.NDIM + 3)
        out = neighborhood_attention(qkv[0], qkv[1], qkv[2], kernel_size=self.kernel_size, dilation=self.dilation,
                                     causal=self.causal, stride=self.stride, backend=self.backend)
        out = out.permute(0, *range(2, self.NDIM + 2), 1, self.NDIM + 2).reshape(B, *spatial, self.dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, causal={self.causal}, stride={self.stride}")


class NeighborhoodAttention1D(_NeighborhoodAttentionND):
    __doc__ = _NeighborhoodAttentionND.__doc__.replace("``NDIM``", "1")
    NDIM = 1


class NeighborhoodAttention2D(_NeighborhoodAttentionND):
    __doc__ = _NeighborhoodAttentionND.__doc__.replace("``NDIM``", "2")
    NDIM = 2


class NeighborhoodAttention3D(_NeighborhoodAttentionND):
    __doc__ = _NeighborhoodAttentionND.__doc__.replace("``NDIM``", "3")
    NDIM = 3
