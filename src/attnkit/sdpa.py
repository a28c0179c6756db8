"""``attnkit.scaled_dot_product_attention``: a drop-in for ``F.scaled_dot_product_attention``.

Same arguments, same semantics (torch's top-left ``is_causal``, boolean masks where
True means "may attend", float masks added to the scores, ``enable_gqa``). Calls
that the flash kernel computes exactly are routed to it; everything else goes to
torch's own implementation, so results never depend on the route.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .dispatch import _decide
from .registry import get_variant


def sdpa_route(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
               enable_gqa: bool = False, backend: str = "auto") -> List[str]:
    """Reasons why a call goes to torch instead of attnkit's flash kernel (empty: it goes to the kernel)."""
    reasons = []
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        reasons.append("the kernel takes 4-D (B, H, N, D) tensors")
    if attn_mask is not None:
        reasons.append("attn_mask is given (masks take torch's path)")
    if dropout_p != 0.0:
        reasons.append("dropout_p > 0 (the kernel has no dropout)")
    if reasons:
        return reasons
    if is_causal and query.shape[-2] != key.shape[-2]:
        reasons.append("is_causal with L != S is top-left aligned in torch; the kernel is bottom-right")
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if heads_q != heads_kv and not (enable_gqa and heads_kv > 0 and heads_q % heads_kv == 0):
        reasons.append("head counts differ without enable_gqa (torch raises)")
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3] or query.shape[-1] != key.shape[-1]:
        reasons.append("shapes do not match (torch reports the error)")
    if query.dtype != key.dtype or key.dtype != value.dtype:
        reasons.append("dtypes differ (torch reports the error)")
    if reasons:
        return reasons
    spec = get_variant("flash")
    options = spec.resolve_options({"causal": bool(is_causal), "scale": scale})
    decision = _decide(spec, query, key, value, options, backend)
    if decision.backend != "triton":
        reasons.extend(decision.reasons or ["the flash kernel was not chosen"])
    return reasons


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                                 *, backend: str = "auto") -> torch.Tensor:
    """Drop-in replacement for ``torch.nn.functional.scaled_dot_product_attention``.

    query (N, ..., L, E), key (N, ..., S, E), value (N, ..., S, Ev) -> (N, ..., L, Ev).
    Routed to attnkit's Triton flash kernel when the call is 4-D with no mask and no
    dropout, ``is_causal`` only with L == S (where torch's top-left and attnkit's
    bottom-right alignment agree), on tensors the kernel supports (``backend="auto"``:
    CUDA); otherwise torch computes it. ``attnkit.sdpa_route(...)`` lists why a call
    is not routed. ``backend="triton"`` also routes CPU tensors under the interpreter.
    """
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto' or 'triton' for the SDPA drop-in, got {backend!r}")
    if not sdpa_route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
        from .flash import flash_kernel

        return flash_kernel(query, key, value, causal=bool(is_causal), scale=scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
