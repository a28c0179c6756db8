"""The fused softmax engine as differentiable PyTorch ops, shared by every softmax variant.

A variant builds an ``attnkit.kernels.engine.Schedule`` (its block schedule and
token mask) and calls :func:`fused_attention`; GQA, softcap, sink logits and packed
variable-length batches are handled here and in the engine, once for all variants.

The forward and backward kernels are registered as the custom ops
``attnkit::fused_attention_fwd`` / ``attnkit::fused_attention_bwd`` (torch.library,
with fake implementations and an autograd formula), so models using attnkit compile
under ``torch.compile(fullgraph=True)`` without graph breaks. A schedule's
``@triton.jit`` hooks cannot cross the op boundary, so they travel by name: every
hook is recorded in a table the first time it is used.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .checks import constant_under_compile

_HOOKS: Dict[str, Any] = {}

#: largest head dim (of q/k and of v) the fused engine's tiles and autotune tables cover
MAX_HEAD_DIM = 256


def head_dim_blockers(q: torch.Tensor, v: torch.Tensor) -> List[str]:
    """Reasons the fused engine cannot take these head dims (empty if it can); every
    softmax variant's ``kernel_support`` starts from this."""
    reasons = []
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the kernel")
    if v.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM} is not supported by the kernel")
    return reasons


def _kernels():
    from . import kernels  # imported lazily: importing it imports triton

    return kernels


@constant_under_compile  # run eagerly while tracing: the name is a constant
def _hook_name(fn: Any) -> str:
    if fn is None:
        return ""
    inner = getattr(fn, "fn", fn)
    name = f"{inner.__module__}.{inner.__qualname__}"
    _HOOKS.setdefault(name, fn)
    return name


def _encode(schedule: Any) -> Tuple[str, List[int], List[torch.Tensor], Optional[torch.Tensor]]:
    """Schedule -> (hook names joined by "|", integers, list tensors, mask tensor): what a custom op can carry."""
    names = "|".join([_hook_name(schedule.mask), _hook_name(schedule.kv_range), _hook_name(schedule.q_range)])
    ints = [schedule.mask_cfg, *schedule.mask_strides, *schedule.mask_args]
    lists: List[torch.Tensor] = []
    if schedule.lists is not None:
        b = schedule.lists
        ints += [b.block_q, b.block_k]
        lists = [b.kv_full_count, b.kv_full_index, b.kv_part_count, b.kv_part_index,
                 b.q_full_count, b.q_full_index, b.q_part_count, b.q_part_index]
    return names, ints, lists, schedule.mask_tensor


def _decode(names: str, ints: List[int], lists: List[torch.Tensor], mask_tensor: Optional[torch.Tensor]):
    engine = _kernels().engine
    block_lists = None
    if lists:
        block_lists = engine.BlockLists(ints[5], ints[6], *lists)
    mask, kv_range, q_range = (_HOOKS[n] if n else None for n in names.split("|"))
    return engine.Schedule(mask=mask, kv_range=kv_range, q_range=q_range, lists=block_lists, mask_cfg=ints[0],
                           mask_tensor=mask_tensor, mask_strides=(ints[1], ints[2]), mask_args=(ints[3], ints[4]))


@torch.library.custom_op("attnkit::fused_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink_logits: Optional[torch.Tensor],
            mask_tensor: Optional[torch.Tensor], lists: List[torch.Tensor], hooks: str, ints: List[int],
            sm_scale: float, softcap: Optional[float], cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor],
            max_q: int, max_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    schedule = _decode(hooks, ints, lists, mask_tensor)
    sink = None if sink_logits is None else sink_logits.float().contiguous()
    return _kernels().engine.attention_forward(
        q, k, v, schedule, sm_scale=sm_scale, softcap=softcap, sink_logits=sink,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


@_fwd_op.register_fake
def _(q, k, v, sink_logits, mask_tensor, lists, hooks, ints, sm_scale, softcap, cu_q, cu_k, max_q, max_k):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("attnkit::fused_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, mask_tensor: Optional[torch.Tensor], lists: List[torch.Tensor], hooks: str,
            ints: List[int], sm_scale: float, softcap: Optional[float], cu_q: Optional[torch.Tensor],
            cu_k: Optional[torch.Tensor], max_q: int, max_k: int
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    schedule = _decode(hooks, ints, lists, mask_tensor)
    return _kernels().engine.attention_backward(
        do, q, k, v, o, lse, schedule, sm_scale=sm_scale, softcap=softcap,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, mask_tensor, lists, hooks, ints, sm_scale, softcap, cu_q, cu_k, max_q, max_k):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(q.shape[:-1], dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, sink_logits, mask_tensor, lists, hooks, ints, sm_scale, softcap, cu_q, cu_k, max_q, max_k = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, sink_logits, mask_tensor, cu_q, cu_k, *lists)
    ctx.params = (hooks, ints, sm_scale, softcap, max_q, max_k)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, sink_logits, mask_tensor, cu_q, cu_k, *lists = ctx.saved_tensors
    hooks, ints, sm_scale, softcap, max_q, max_k = ctx.params
    dq, dk, dv, delta = _bwd_op(do.contiguous(), q, k, v, o, lse, mask_tensor, lists, hooks, ints, sm_scale,
                                softcap, cu_q, cu_k, max_q, max_k)
    d_sink = None
    if sink_logits is not None and ctx.needs_input_grad[3]:
        # d sink_h = -sum_rows P_sink * rowsum(dO * O), with P_sink = exp(sink_h - lse)
        p_sink = torch.exp(sink_logits.float().view(1, -1, 1) - lse)
        d_sink = -(p_sink * delta).sum(dim=(0, 2)).to(sink_logits.dtype)
    no_grad_lists = [None] * len(lists)  # the autograd formula mirrors the inputs' structure
    return dq, dk, dv, d_sink, None, no_grad_lists, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def dense_to_lists(dense: torch.Tensor, capacity: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block lists from a tile map: boolean (..., R, C) -> counts int32 (..., R) and indices int32 (..., R, L), ascending.

    L is ``capacity`` or the largest count (at least 1, so no list is zero-sized);
    entries past a row's count are 0 and never read.
    """
    counts = dense.sum(dim=-1, dtype=torch.int32)
    if capacity is None:
        capacity = int(counts.max().item()) if counts.numel() else 0
    capacity = max(1, min(capacity, dense.shape[-1]))
    # a stable sort of "not listed" puts the listed columns first, in ascending order
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True)[..., :capacity]
    index = torch.where(torch.arange(capacity, device=dense.device) < counts[..., None], order,
                        torch.zeros_like(order))
    return counts.contiguous(), index.to(torch.int32).contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Any, *, sm_scale: float,
                    softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
                    cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                    max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fused attention with a variant's schedule.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); packed varlen with B = 1
    and cu_seqlens_q/k (S + 1,) int32 (the longest lengths are computed from them
    unless given). ``sink_logits`` (Hq,) is differentiable.
    Returns out (B, Hq, Nq, Dv) and lse (B, Hq, Nq) float32 (not differentiable).
    """
    max_q, max_k = 0, 0
    if cu_seqlens_q is not None:
        max_q = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        max_k = max_seqlen_k if max_seqlen_k is not None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    hooks, ints, lists, mask_tensor = _encode(schedule)
    return _fwd_op(q, k, v, sink_logits, mask_tensor, lists, hooks, ints, sm_scale, softcap, cu_seqlens_q,
                   cu_seqlens_k, max_q, max_k)
