"""Merging partial attention results by their log-sum-exp: the one implementation of
the LSE merge (split-KV decoding, ring attention, sinks kept apart from a window)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_same, check_tensor, checking_values


def _check_parts(outputs: Any, lses: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parts as lists, checked: as many outputs as lses (at least one), every output
    (B, H, N, Dv) of one shape and dtype, every lse (B, H, N) floating of one dtype, all on
    one device."""
    for name, parts in (("outputs", outputs), ("lses", lses)):
        # a tensor would be iterated along its first dim, silently taken for the parts
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(parts).__name__}")
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"need as many outputs as lses (at least one), got {len(outputs)} and {len(lses)}")
    outs = [check_tensor(f"outputs[{i}]", o) for i, o in enumerate(outputs)]
    lse_list = [check_tensor(f"lses[{i}]", lse) for i, lse in enumerate(lses)]
    first = outs[0]
    if first.dim() != 4:
        raise ValueError(f"outputs[0] must have rank 4 (B, H, N, Dv), got shape {tuple(first.shape)}")
    for i, (o, lse) in enumerate(zip(outs, lse_list)):
        if o.shape != first.shape:
            raise ValueError(f"outputs[{i}] must have shape {tuple(first.shape)} like outputs[0], "
                             f"got {tuple(o.shape)}")
        # an LSE of another shape would broadcast against the others and give an LSE of the wrong shape
        if lse.shape != first.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape (B, H, N) = {tuple(first.shape[:-1])} (the outputs' "
                             f"shape without Dv), got {tuple(lse.shape)}")
        for name, t in ((f"outputs[{i}]", o), (f"lses[{i}]", lse)):
            if t.device != first.device:
                raise ValueError(f"{name} is on {t.device} but outputs[0] is on {first.device}; "
                                 "all parts must be on one device")
    # the outputs share a dtype, the LSEs share one (float32 LSEs of half outputs, as the ops return)
    check_same([f"outputs[{i}]" for i in range(len(outs))], outs)
    check_same([f"lses[{i}]" for i in range(len(lse_list))], lse_list)
    return outs, lse_list


def merge_attention(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets into attention over their union.

    Args:
        outputs: a list (or tuple) of partial outputs, each (B, H, N, Dv), normalized over
            its own keys; one shape, dtype and device for all.
        lses: their log-sum-exps, each (B, H, N), floating, one dtype for all (it may differ
            from the outputs', e.g. float32 LSEs of float16 outputs), on the outputs' device;
            -inf where a part saw no key.

    Returns:
        out (B, H, N, Dv) in the outputs' dtype and lse (B, H, N) float32 (float64 for
        float64 LSEs):
        out = sum_i exp(lse_i - lse) * out_i, lse = log(sum_i exp(lse_i)). A part whose
        LSE is -inf in a row contributes nothing there; rows that no part saw get out 0 and
        lse -inf (with zero gradients). Differentiable in outputs and lses.

    Raises:
        TypeError / ValueError naming the argument for parts that are not tensors, or of
        the wrong shape, dtype or device. ValueError when an LSE is +inf (an overflowed
        sum: the merge is undefined there); this value check is skipped while
        torch.compile traces, and such a row then comes out NaN.
    """
    outputs, lses = _check_parts(outputs, lses)
    work = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    lse_stack = torch.stack([x.to(work) for x in lses])  # (P, B, H, N)
    if checking_values():
        bad = torch.isposinf(lse_stack).flatten(1).any(1).tolist()  # one host sync for all parts
        if any(bad):
            raise ValueError(f"lses[{bad.index(True)}] holds +inf; an LSE must be finite, or -inf where a part "
                             "saw no key (+inf is an overflowed sum, whose merge is undefined)")
    # A softmax over the parts; the max is a constant shift (detached, exact), guarded
    # so that rows no part saw give weights 0 rather than NaN.
    shift = lse_stack.amax(dim=0).detach()
    shift = torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)
    e = torch.exp(lse_stack - shift)
    denom = e.sum(dim=0)
    empty = denom == 0
    weights = e / torch.where(empty, torch.ones_like(denom), denom)
    out = sum(w.unsqueeze(-1) * o.to(work) for w, o in zip(weights, outputs))
    # log(0) = -inf in rows no part saw, but its derivative 1/0 would turn their (zero)
    # incoming gradient into NaN: take the log of 1 there and put -inf back as a constant
    lse = torch.log(torch.where(empty, torch.ones_like(denom), denom)) + shift
    return out.to(outputs[0].dtype), torch.where(empty, torch.full_like(lse, float("-inf")), lse)
