"""Host side of the fused softmax engine: the schedule description and the launchers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import triton

from ..common import block_dim, new_output
from . import configs
from .backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .forward import attn_fwd_kernel


@dataclass(frozen=True)
class BlockLists:
    """Per-query-block lists of key blocks (and the transposed lists for the dK/dV pass).

    Counts are int32 of shape (Bm, Hm, R) and indices int32 of shape (Bm, Hm, R, C),
    with Bm in {1, B} and Hm in {1, Hq} (broadcast by stride 0). ``kv_*`` lists key
    blocks of size ``block_k`` per query block of size ``block_q``; ``q_*`` lists query
    blocks per key block. ``full`` blocks skip the token mask; ``part`` blocks apply it.
    """

    block_q: int
    block_k: int
    kv_full_count: torch.Tensor
    kv_full_index: torch.Tensor
    kv_part_count: torch.Tensor
    kv_part_index: torch.Tensor
    q_full_count: torch.Tensor
    q_full_index: torch.Tensor
    q_part_count: torch.Tensor
    q_part_index: torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """How a variant plugs into the engine: which key blocks each query block visits
    and the token mask inside partial blocks.

    Range mode: ``kv_range`` / ``q_range`` are @triton.jit functions (see forward.py).
    List mode: ``lists`` holds the block lists; ``kv_range``/``q_range`` are unused.
    ``mask`` is the @triton.jit token mask; ``mask_tensor``, ``mask_strides``,
    ``mask_args`` and ``mask_cfg`` are handed to it (and to the range functions) unchanged.
    """

    mask: Any
    kv_range: Any = None
    q_range: Any = None
    lists: Optional[BlockLists] = None
    mask_cfg: int = 0
    mask_tensor: Optional[torch.Tensor] = None
    mask_strides: Tuple[int, int] = (0, 0)
    mask_args: Tuple[int, int] = (0, 0)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE products (TF32 would lose ~3 digits against the fp32 reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def _broadcast_strides(x: torch.Tensor) -> Tuple[int, ...]:
    """Strides with 0 on size-1 dims, so lists of shape (1, 1, ...) serve every batch and head."""
    return tuple(st if n > 1 else 0 for n, st in zip(x.shape, x.stride()))


def _schedule_args(schedule: Schedule, transposed: bool) -> Tuple[list, dict]:
    lists = schedule.lists
    mask_tensor = schedule.mask_tensor
    args = [mask_tensor, schedule.mask_strides[0], schedule.mask_strides[1],
            schedule.mask_args[0], schedule.mask_args[1]]
    if lists is None:
        args += [None, None, None, None] + [0] * 12
        meta = dict(RANGE_FN=schedule.q_range if transposed else schedule.kv_range, LIST=False, LIST_BQ=1,
                    LIST_BK=1)
    else:
        if transposed:
            cf, xf, cp, xp = lists.q_full_count, lists.q_full_index, lists.q_part_count, lists.q_part_index
        else:
            cf, xf, cp, xp = lists.kv_full_count, lists.kv_full_index, lists.kv_part_count, lists.kv_part_index
        args += [cf, xf, cp, xp, *_broadcast_strides(cf), *_broadcast_strides(xf)[:3],
                 *_broadcast_strides(cp), *_broadcast_strides(xp)[:3]]
        meta = dict(RANGE_FN=None, LIST=True, LIST_BQ=lists.block_q, LIST_BK=lists.block_k)
    meta.update(MASK_FN=schedule.mask, MASK_CFG=schedule.mask_cfg)
    return args, meta


def _launch(kernel, tuned, grid_rows: int, grid_cols: int, grid_block: str, args: list, meta: dict) -> None:
    fixed = configs.fixed_config()
    if fixed is not None:
        grid = (triton.cdiv(grid_rows, fixed[grid_block]), grid_cols)
        kernel[grid](*args, **meta, **fixed, num_warps=4, num_stages=1)
    else:
        tuned[lambda m: (triton.cdiv(grid_rows, m[grid_block]), grid_cols)](*args, **meta)


_fwd_tuned = triton.autotune(configs.autotune_configs("fwd"), key=configs.AUTOTUNE_KEY,
                             prune_configs_by={"early_config_prune": configs.prune})(attn_fwd_kernel)
_dkdv_tuned = triton.autotune(configs.autotune_configs("dkdv"), key=configs.AUTOTUNE_KEY,
                              prune_configs_by={"early_config_prune": configs.prune})(attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs.autotune_configs("dq"), key=configs.AUTOTUNE_KEY,
                            prune_configs_by={"early_config_prune": configs.prune})(attn_bwd_dq_kernel)


def _common_meta(q: torch.Tensor, v: torch.Tensor, varlen: bool, softcap: Optional[float], seqlen_q: int,
                 seqlen_k: int, schedule: Schedule) -> dict:
    lists = schedule.lists
    # With block lists, blocks of the list are aligned to the list's block sizes, so
    # only the sequence ends can be ragged; EVEN_* only drop bounds checks.
    return dict(
        VARLEN=varlen, HAS_SOFTCAP=softcap is not None,
        HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_D=block_dim(q.shape[-1]), BLOCK_DV=block_dim(v.shape[-1]),
        EVEN_M=(not varlen) and seqlen_q % 128 == 0 and (lists is None or seqlen_q % lists.block_q == 0),
        EVEN_N=(not varlen) and seqlen_k % 128 == 0 and (lists is None or seqlen_k % lists.block_k == 0),
        DOT_PRECISION=_dot_precision(q.dtype),
    )


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, *, sm_scale: float,
                      softcap: Optional[float] = None, sink_logits: Optional[torch.Tensor] = None,
                      cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), last dim contiguous.

    Packed varlen: B = 1 and cu_seqlens_q/k (S + 1,) int32. Returns out (B, Hq, Nq, Dv)
    in q's dtype and lse (B, Hq, Nq) float32.
    """
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else B
    rows = max_seqlen_q if varlen else Nq
    o = new_output((B, Hq, Nq, v.shape[-1]), q.dtype, q.device)
    lse = new_output((B, Hq, Nq), torch.float32, q.device)
    sched_args, sched_meta = _schedule_args(schedule, transposed=False)
    args = [q, k, v, o, lse, sink_logits,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride()[:2],
            Hq, Hq // Hkv, Nq, Nk, cu_seqlens_q, cu_seqlens_k, sm_scale, softcap if softcap else 1.0,
            *sched_args]
    meta = dict(sched_meta, HAS_SINK=sink_logits is not None, **_common_meta(q, v, varlen, softcap, Nq, Nk, schedule))
    _launch(attn_fwd_kernel, _fwd_tuned, rows, n_seqs * Hq, "BLOCK_M", args, meta)
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, schedule: Schedule, *, sm_scale: float, softcap: Optional[float] = None,
                       cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
                       max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: returns dq, dk, dv (in the inputs' dtypes) and delta = rowsum(dO * O)
    (B, Hq, Nq) float32, which the caller needs for the sink-logit gradient."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else B
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    common = dict(_common_meta(q, v, varlen, softcap, Nq, Nk, schedule))
    head = [q, k, v, do]
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3]]
    tail_common = [cu_seqlens_q, cu_seqlens_k, sm_scale, softcap if softcap else 1.0]

    sched_args, sched_meta = _schedule_args(schedule, transposed=True)
    args = head + [dk, dv, lse, delta] + strides + [*dk.stride()[:3], *dv.stride()[:3], *lse.stride()[:2],
                                                    Hkv, Hq // Hkv, Nq, Nk] + tail_common + sched_args
    _launch(attn_bwd_dkdv_kernel, _dkdv_tuned, max_seqlen_k if varlen else Nk, n_seqs * Hkv, "BLOCK_N", args,
            dict(sched_meta, **common))

    sched_args, sched_meta = _schedule_args(schedule, transposed=False)
    args = head + [dq, lse, delta] + strides + [*dq.stride()[:3], *lse.stride()[:2],
                                                Hq, Hq // Hkv, Nq, Nk] + tail_common + sched_args
    _launch(attn_bwd_dq_kernel, _dq_tuned, max_seqlen_q if varlen else Nq, n_seqs * Hq, "BLOCK_M", args,
            dict(sched_meta, **common))
    return dq, dk, dv, delta
