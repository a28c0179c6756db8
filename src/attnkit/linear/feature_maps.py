"""Feature maps phi for linear attention, applied to q and k before the kernel.

Every map takes a tensor (..., D) and returns (..., F); ``feature_map=`` of
:func:`attnkit.linear_attention` accepts one of the names in :data:`NAMES` or any
callable with that contract (e.g. a :class:`Hedgehog` module).

=============  =====================  ======  ===============================================
name           phi(x)                 F       sign of phi(q) . phi(k)  (matters for normalize)
=============  =====================  ======  ===============================================
``identity``   x                      D       any sign: ``normalize=True`` can divide by ~0
``elu+1``      elu(x) + 1             D       > 0 (Katharopoulos et al., 2020)
``relu``       max(x, 0)              D       >= 0; exactly 0 when no feature overlaps
``taylor``     [1, x/d^¼, x⊗x/(√2·√d)] 1+D+D²  1 + s + s²/2 > 0 with s = q·k/√d (Based)
``Hedgehog``   softmax([xW, -xW])     2F'     > 0 (Zhang et al., 2024); learnable W
=============  =====================  ======  ===============================================
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x: (..., D) -> (..., D)."""
    return x


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0 (Transformers are RNNs): (..., D) -> (..., D)."""
    return F.elu(x) + 1.0


def relu(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = max(x, 0): (..., D) -> (..., D)."""
    return F.relu(x)


def taylor(x: torch.Tensor) -> torch.Tensor:
    """Based's second-order Taylor map (Arora et al., 2024): (..., D) -> (..., 1 + D + D^2).

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))], so that
    phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d): the Taylor expansion
    of exp(s), always > 0. The 1/sqrt(d) is inside the map: use ``scale=1.0`` with it.
    """
    d = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2)
    return torch.cat([ones, x / d ** 0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], dim=-1)


class Hedgehog(nn.Module):
    """Hedgehog's learnable feature map (Zhang et al., 2024): phi(x) = [softmax(xW), softmax(-xW)].

    Args:
        head_dim: D, the input dim.
        feature_dim: F', columns of W (default D); the output has 2 F' features.
        num_heads: if given, one W per head (inputs must then be (B, H, N, D)).

    W starts as the identity (when F' = D), as in the paper. Shapes: (B, H, N, D) ->
    (B, H, N, 2 F'). The weight is cast to the input's dtype, so the fp64 oracle and
    half-precision inputs work; the gradient reaches the fp32 parameter.
    """

    def __init__(self, head_dim: int, feature_dim: Optional[int] = None, num_heads: Optional[int] = None):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        self.head_dim, self.feature_dim, self.num_heads = head_dim, feature_dim, num_heads
        eye = torch.eye(head_dim, feature_dim)
        self.weight = nn.Parameter(eye if num_heads is None else eye.expand(num_heads, -1, -1).clone())

    @property
    def out_dim(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"Hedgehog expects inputs with head dim {self.head_dim}, got {x.shape[-1]}")
        w = self.weight.to(x.dtype)
        if self.num_heads is None:
            z = torch.matmul(x, w)
        else:
            if x.dim() != 4 or x.shape[1] != self.num_heads:
                raise ValueError(f"Hedgehog with num_heads={self.num_heads} expects (B, {self.num_heads}, N, D) "
                                 f"inputs, got shape {tuple(x.shape)}")
            z = torch.einsum("bhnd,hdf->bhnf", x, w)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


_BY_NAME: Dict[str, FeatureMap] = {
    "identity": identity,
    "elu+1": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
}
_ALIASES = {"elu": "elu+1", "elu_plus_one": "elu+1", "based": "taylor"}
#: names accepted by ``feature_map=`` (aliases: "elu", "elu_plus_one" -> "elu+1"; "based" -> "taylor")
NAMES = tuple(_BY_NAME)


def resolve(feature_map: Union[None, str, FeatureMap]) -> Optional[FeatureMap]:
    """None (no map), a name from NAMES, or a callable -> the callable (or None)."""
    if feature_map is None:
        return None
    if isinstance(feature_map, str):
        name = _ALIASES.get(feature_map, feature_map)
        if name not in _BY_NAME:
            raise ValueError(f"unknown feature_map {feature_map!r}; known names: {list(NAMES)} "
                             f"(aliases {sorted(_ALIASES)}), or pass a callable")
        return _BY_NAME[name]
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map must be None, a name from {list(NAMES)} or a callable, "
                    f"got {type(feature_map).__name__}")


def output_dim(feature_map: Union[None, str, FeatureMap], head_dim: int) -> Optional[int]:
    """Feature dim F produced from head dim D, or None when it is only known by calling the map."""
    fn = resolve(feature_map)
    if fn is None or fn in (identity, elu_plus_one, relu):
        return head_dim
    if fn is taylor:
        return 1 + head_dim + head_dim * head_dim
    if isinstance(fn, Hedgehog):
        return fn.out_dim
    return None


def apply(feature_map: Union[None, str, FeatureMap], q: torch.Tensor, k: torch.Tensor):
    """phi(q), phi(k) with a check of the callable's output: same leading dims, same feature dim."""
    fn = resolve(feature_map)
    if fn is None:
        return q, k
    fq, fk = fn(q), fn(k)
    for name, x, y in (("q", q, fq), ("k", k, fk)):
        if not isinstance(y, torch.Tensor) or y.shape[:-1] != x.shape[:-1] or y.dtype != x.dtype:
            got = f"shape {tuple(y.shape)}, dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"feature_map must map {name} of shape {tuple(x.shape)} to a tensor of shape "
                             f"{tuple(x.shape[:-1])} + (F,) and dtype {x.dtype}; got {got}")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gave different feature dims for q ({fq.shape[-1]}) and k ({fk.shape[-1]})")
    return fq, fk


# The public surface is the feature maps (and NAMES, the same maps by name). resolve,
# output_dim and apply are the linear variant's plumbing: importable, but not exported,
# and hidden from dir() together with the modules this file imports.
__all__ = ["NAMES", "Hedgehog", "elu_plus_one", "identity", "relu", "taylor"]


def __dir__() -> list[str]:
    return sorted(__all__)
