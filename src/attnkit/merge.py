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
    # A softmax over the parts; the max is a constant shift (detached, exact)
    shift = _finite(lse_stack.amax(dim=0).detach())
    e = torch.exp(lse_stack - shift)
    denom, safe = _denominator(e.sum(dim=0))
    weights = e / safe
    out = sum(w.unsqueeze(-1) * o.to(work) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), _merged_lse(denom, safe, shift)


def _finite(shift: torch.Tensor) -> torch.Tensor:
    """The softmax shift, 0 in rows no part saw (their max is -inf: exp(-inf - -inf) is NaN)."""
    return torch.where(torch.isinf(shift), torch.zeros_like(shift), shift)


def _denominator(denom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax denominator and a copy with 1 in the rows no part saw (weights 0 there, not NaN)."""
    return denom, torch.where(denom == 0, torch.ones_like(denom), denom)


def _merged_lse(denom: torch.Tensor, safe: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """log(denom) + shift, -inf in rows no part saw. log(0) = -inf there, but its derivative
    1/0 would turn their (zero) incoming gradient into NaN: the log of 1 is taken there and
    -inf put back as a constant."""
    lse = torch.log(safe) + shift
    return torch.where(denom == 0, torch.full_like(lse, float("-inf")), lse)


def merge_attention_rows(out: torch.Tensor, lse: torch.Tensor,
                         parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_attention` when the other parts cover only some rows, each its own number.

    For sparse variants whose rows see different numbers of extra key sets (MoBA's selected
    blocks), without a dense (rows x parts) layout: the parts are indexed by row.

    Args:
        out: (R, Dv), each row's attention over a first key set; lse: (R,) floating, its
            log-sum-exp (-inf where the row saw no key).
        parts: (part_out (P, Dv) in out's dtype, part_lse (P,) in lse's dtype, rows (P,)
            int64) triples: part p is row ``rows[p]``'s attention over another key set,
            disjoint from the row's others. A row may appear any number of times; a part
            with LSE -inf contributes nothing (e.g. padding, with any finite output).

    Returns:
        out (R, Dv) in out's dtype and lse (R,) float32 (float64 for float64), as
        :func:`merge_attention` over each row's parts. Differentiable. Internal inputs:
        no checks.
    """
    work = torch.float64 if lse.dtype == torch.float64 else torch.float32
    first_lse = lse.to(work)
    part_lses = [p_lse.to(work) for _, p_lse, _ in parts]
    shift = first_lse.detach().clone()
    for (_, _, rows), p_lse in zip(parts, part_lses):
        shift.scatter_reduce_(0, rows, p_lse.detach(), "amax")
    shift = _finite(shift)
    e_first = torch.exp(first_lse - shift)
    e_parts = [torch.exp(p_lse - shift[rows]) for (_, _, rows), p_lse in zip(parts, part_lses)]
    # accumulated in place (fresh tensors whose backward needs no saved value): one pass per part
    denom = e_first.clone()
    for (_, _, rows), e in zip(parts, e_parts):
        denom.index_add_(0, rows, e)
    denom, safe = _denominator(denom)
    merged = out.to(work) * (e_first / safe).unsqueeze(-1)
    for (p_out, _, rows), e in zip(parts, e_parts):
        merged.index_add_(0, rows, p_out.to(work) * (e / safe[rows]).unsqueeze(-1))
    return merged.to(out.dtype), _merged_lse(denom, safe, shift)
