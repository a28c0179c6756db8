"""Merging partial attention results by their log-sum-exp: the one implementation of
the LSE merge (split-KV decoding, ring attention, sinks kept apart from a window)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def merge_attention(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    Args:
        outputs: partial outputs, each (B, H, N, Dv), normalized over its own keys.
        lses: their log-sum-exps, each (B, H, N); -inf where a part saw no key.

    Returns:
        out (B, H, N, Dv) in the dtype of ``outputs[0]`` and lse (B, H, N) float32 (float64
        for float64 inputs):
        out = sum_i exp(lse_i - lse) * out_i, lse = log(sum_i exp(lse_i)). Rows that
        no part saw get out 0 and lse -inf. Differentiable in outputs and lses.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"need as many outputs as lses (at least one), got {len(outputs)} and {len(lses)}")
    work = torch.float64 if any(l.dtype == torch.float64 for l in lses) else torch.float32
    lse_stack = torch.stack([l.to(work) for l in lses])  # (P, B, H, N)
    # A softmax over the parts; the max is a constant shift (detached, exact), guarded
    # so that rows no part saw give weights 0 rather than NaN.
    shift = lse_stack.amax(dim=0).detach()
    shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)
    e = torch.exp(lse_stack - shift)
    denom = e.sum(dim=0)
    weights = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = sum(w.unsqueeze(-1) * o.to(work) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), torch.log(denom) + shift
