"""Host side of the fused softmax engine: turns a Schedule and the mods into kernel
arguments and launches the forward and the two backward passes."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from attnkit.dropout import Dropout
from attnkit.engine import BlockLists, Const, Schedule
from attnkit.mods.core import ModKernel

from ..common import INTERPRET, block_dim, ensure_allocator, new_output
from . import configs
from .backward import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .forward import attn_fwd_kernel


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE products (TF32 would lose ~3 digits against the fp32 reference).
    return "ieee" if dtype == torch.float32 else "tf32"


def _broadcast_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides with 0 on size-1 dims, so lists of shape (1, 1, ...) serve every batch and head."""
    return tuple(st if n > 1 else 0 for n, st in zip(x.shape, x.stride()))


def _variant_args(schedule: Schedule) -> tuple:
    return tuple(tl.constexpr(a.value) if isinstance(a, Const) else a for a in schedule.args)


def _lists_arg(lists: BlockLists | None, transposed: bool):
    """The LISTS tuple of list mode (counts, indices, then their strides), None in range mode."""
    if lists is None:
        return None
    if transposed:
        cf, xf, cp, xp = lists.q_full_count, lists.q_full_index, lists.q_part_count, lists.q_part_index
    else:
        cf, xf, cp, xp = lists.kv_full_count, lists.kv_full_index, lists.kv_part_count, lists.kv_part_index
    return (cf, xf, cp, xp, *_broadcast_strides(cf), *_broadcast_strides(xf)[:3],
            *_broadcast_strides(cp), *_broadcast_strides(xp)[:3])


def _hook_meta(schedule: Schedule, score: ModKernel | None, mask: ModKernel | None, transposed: bool) -> dict:
    lists = schedule.lists
    return {"RANGE_FN": None if lists is not None else (schedule.q_range if transposed else schedule.kv_range),
            "VARIANT_MASK": schedule.mask, "POSITIONS": schedule.positions,
            "SCORE_MOD": score.kernel if score else None, "MASK_MOD": mask.kernel if mask else None,
            "MASK_FULL_BLOCKS": bool(mask.full_blocks) if mask else False,
            "LIST_BQ": lists.block_q if lists is not None else 1, "LIST_BK": lists.block_k if lists is not None else 1}


def _launch(kernel, tuned, grid_rows: int, grid_cols: int, grid_block: str, args: list, meta: dict) -> None:
    if not INTERPRET:
        ensure_allocator()  # the TMA configs make their tensor descriptors on the device
    # a fixed tile must divide a list schedule's block sizes (LIST_BQ is 1 in range mode)
    fixed = configs.fixed_config((meta["LIST_BQ"], meta["LIST_BK"]) if meta["LIST_BQ"] > 1 else None)
    if fixed is not None:
        grid = (triton.cdiv(grid_rows, fixed[grid_block]), grid_cols)
        kernel[grid](*args, **meta, **fixed, num_warps=4, num_stages=1)
    else:
        tuned[lambda m: (triton.cdiv(grid_rows, m[grid_block]), grid_cols)](*args, **meta)


def _tuned(kernel, kind: str):
    prune = functools.partial(configs.prune, kernel=kernel)  # the kernel lets the filter measure spills
    return triton.autotune(configs.autotune_configs(kind), key=configs.AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune})(kernel)


_fwd_tuned = _tuned(attn_fwd_kernel, "fwd")
_dkdv_tuned = _tuned(attn_bwd_dkdv_kernel, "dkdv")
_dq_tuned = _tuned(attn_bwd_dq_kernel, "dq")


def _dropout_arg(dropout: Dropout | None) -> tuple:
    """The kernels' DROPOUT_ARGS: (seed tensor, threshold, keep scale), or () without dropout."""
    if dropout is None:
        return ()
    return (dropout.seed, dropout.threshold, dropout.keep_scale)


def _common_meta(q: torch.Tensor, v: torch.Tensor, varlen: bool, softcap: float | None, seqlen_q: int,
                 seqlen_k: int, schedule: Schedule, dropout: Dropout | None) -> dict:
    lists = schedule.lists
    # With block lists, blocks of the list are aligned to the list's block sizes, so
    # only the sequence ends can be ragged; EVEN_* only drop bounds checks.
    return {
        "VARLEN": varlen, "HAS_SOFTCAP": softcap is not None, "DROPOUT": dropout is not None,
        "HEAD_DIM": q.shape[-1], "HEAD_DIM_V": v.shape[-1], "BLOCK_D": block_dim(q.shape[-1]),
        "BLOCK_DV": block_dim(v.shape[-1]),
        "EVEN_M": (not varlen) and seqlen_q % 128 == 0 and (lists is None or seqlen_q % lists.block_q == 0),
        "EVEN_N": (not varlen) and seqlen_k % 128 == 0 and (lists is None or seqlen_k % lists.block_k == 0),
        "DOT_PRECISION": _dot_precision(q.dtype),
    }


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) (B, H, N) float32, by one Triton pass over o and do (B, H, N, Dv)."""
    B, H, N, Dv = o.shape
    o = o if o.stride(-1) == 1 else o.contiguous()
    delta = new_output((B, H, N), torch.float32, o.device)
    block_dv = block_dim(Dv)
    block_m = max(16, 4096 // block_dv)  # ~32 fp32 values of each tensor per thread with 4 warps
    attn_bwd_delta_kernel[(triton.cdiv(N, block_m), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], *delta.stride()[:2], H, N,
        HEAD_DIM_V=Dv, BLOCK_DV=block_dv, BLOCK_M=block_m, num_warps=4)
    return delta


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, schedule: Schedule, *, sm_scale: float,
                      softcap: float | None = None, sink_logits: torch.Tensor | None = None,
                      score_mod: ModKernel | None = None, mask_mod: ModKernel | None = None,
                      cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                      max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                      dropout: Dropout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), last dim contiguous.

    Packed varlen: B = 1 and cu_seqlens_q/k (S + 1,) int32. ``dropout``: attention dropout
    on the probabilities (attnkit.dropout). Returns out (B, Hq, Nq, Dv) in q's dtype and
    lse (B, Hq, Nq) float32 (the undropped softmax's).
    """
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else B
    rows = max_seqlen_q if varlen else Nq
    o = new_output((B, Hq, Nq, v.shape[-1]), q.dtype, q.device)
    lse = new_output((B, Hq, Nq), torch.float32, q.device)
    args = [q, k, v, o, lse, sink_logits,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *lse.stride()[:2],
            Hq, Hq // Hkv, Nq, Nk, cu_seqlens_q, cu_seqlens_k, sm_scale, softcap if softcap else 1.0,
            _variant_args(schedule), _lists_arg(schedule.lists, False),
            score_mod.tensors if score_mod else (), mask_mod.tensors if mask_mod else (), _dropout_arg(dropout)]
    meta = dict(_hook_meta(schedule, score_mod, mask_mod, False), HAS_SINK=sink_logits is not None,
                POSITIVE_SCALE=sm_scale > 0,
                **_common_meta(q, v, varlen, softcap, Nq, Nk, schedule, dropout))
    _launch(attn_fwd_kernel, _fwd_tuned, rows, n_seqs * Hq, "BLOCK_M", args, meta)
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, schedule: Schedule, *, sm_scale: float, softcap: float | None = None,
                       score_mod: ModKernel | None = None, mask_mod: ModKernel | None = None,
                       cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                       max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                       dropout: Dropout | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Fused backward: returns dq, dk, dv (in the inputs' dtypes), delta = rowsum(dO * O)
    (B, Hq, Nq) float32 (the caller needs it for the sink-logit gradient), and the
    gradients of the score mod's tensors that need one (in their dtypes). ``dropout``
    must be the forward's (same key): the passes regenerate its mask."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else B
    do = do.contiguous()
    delta = _delta(o, do)
    lse = lse.contiguous()
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    common = _common_meta(q, v, varlen, softcap, Nq, Nk, schedule, dropout)
    drop = _dropout_arg(dropout)
    head = [q, k, v, do]
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3]]
    tail_common = [cu_seqlens_q, cu_seqlens_k, sm_scale, softcap if softcap else 1.0]
    score_args = score_mod.tensors if score_mod else ()
    mask_args = mask_mod.tensors if mask_mod else ()
    derivative = score_mod.derivative if score_mod else None

    args = head + [dk, dv, lse, delta] + strides + [*dk.stride()[:3], *dv.stride()[:3], *lse.stride()[:2],
                                                    Hkv, Hq // Hkv, Nq, Nk] + tail_common
    args += [_variant_args(schedule), _lists_arg(schedule.lists, True), score_args, mask_args, drop]
    meta = dict(_hook_meta(schedule, score_mod, mask_mod, True), SCORE_DERIV=derivative, **common)
    _launch(attn_bwd_dkdv_kernel, _dkdv_tuned, max_seqlen_k if varlen else Nk, n_seqs * Hkv, "BLOCK_N", args, meta)

    # a score mod's tensor gradients: fp32 buffers, accumulated atomically in the dQ pass
    needs = score_mod.needs_grad if score_mod is not None and score_mod.tensor_grads is not None else ()
    grad_buffers = tuple(torch.zeros(t.shape, dtype=torch.float32, device=t.device) if n else None
                         for t, n in zip(score_args, needs))
    grads_fn = score_mod.tensor_grads if any(needs) else None
    args = head + [dq, lse, delta] + strides + [*dq.stride()[:3], *lse.stride()[:2], Hq, Hq // Hkv, Nq, Nk]
    args += tail_common + [_variant_args(schedule), _lists_arg(schedule.lists, False), score_args,
                           grad_buffers if grads_fn is not None else (), mask_args, drop]
    meta = dict(_hook_meta(schedule, score_mod, mask_mod, False), SCORE_DERIV=derivative, SCORE_GRADS_FN=grads_fn,
                **common)
    _launch(attn_bwd_dq_kernel, _dq_tuned, max_seqlen_q if varlen else Nq, n_seqs * Hq, "BLOCK_M", args, meta)
    tensor_grads = [g.to(t.dtype) for t, g in zip(score_args, grad_buffers) if g is not None]
    return dq, dk, dv, delta, tensor_grads
