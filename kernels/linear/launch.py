"""Host side of the chunked linear-attention engine: launchers for the forward pass,
the backward passes and the recurrent (decoding) kernel, plus the chunk-size config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton

from ..common import INTERPRET, block_dim, new_output
from .chunked import linear_chunk_kernel, linear_recurrent_kernel

#: (BLOCK_C, BLOCK_E): rows per chunk and value columns per program.
DEFAULT_CONFIG = (64, 64)
INTERPRETER_CONFIG = (32, 32)
_forced: tuple[int, int] | None = None


@contextlib.contextmanager
def force_chunk(block_c: int, block_e: int) -> Iterator[None]:
    """Run the linear kernels with this chunk size and value-column block (tests use it
    to cover several tilings). Both must be powers of two >= 16."""
    global _forced
    for name, value in (("block_c", block_c), ("block_e", block_e)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    previous, _forced = _forced, (block_c, block_e)
    try:
        yield
    finally:
        _forced = previous


def _config() -> tuple[int, int]:
    if _forced is not None:
        return _forced
    return INTERPRETER_CONFIG if INTERPRET else DEFAULT_CONFIG


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    # fp32 inputs: IEEE products everywhere. Half inputs: intra-chunk dots in the input dtype,
    # state dots on fp32 operands as TF32 (keeps fp16's exponent range away from the state).
    if dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", "tf32"


def _state_strides(p: torch.Tensor | None, transpose: bool) -> tuple[int, int, int, int]:
    if p is None:
        return (0, 0, 0, 0)
    sb, sh, sr, sc = p.stride()
    return (sb, sh, sc, sr) if transpose else (sb, sh, sr, sc)


def chunk_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, num_heads: int,
               groups: tuple[int, int, int], slopes: torch.Tensor | None, scale: float, out_scale: float,
               upd_scale: float, p0: torch.Tensor | None = None, p0_transposed: bool = False,
               pn: torch.Tensor | None = None, reverse: bool = False,
               cu_seqlens: torch.Tensor | None = None) -> None:
    """One launch of ``linear_chunk_kernel`` (see chunked.py for the math).

    q (B, Hq/gq, N, K), k (B, H/gk, N, K), v (B, H/gv, N, E) with unit last stride;
    out (B, H, N, E); p0 fp32 (B, H, K, E) (or (B, H, E, K) read transposed); pn fp32
    (B, H, K, E) receives the final state. ``slopes`` fp32 (H,) or None (no decay).
    ``cu_seqlens`` (S + 1,) int32: B = 1 holds S packed sequences, each run on its own
    with its own state row: p0 and pn are then (S, H, ...).
    """
    N = q.shape[2]
    B = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1  # programs per head
    dim_k, dim_e = q.shape[-1], v.shape[-1]
    block_c, block_e = _config()
    block_k = block_dim(dim_k)
    if block_k > 128 and _forced is None:  # keep the fp32 state and operand tiles within shared memory
        block_c, block_e = min(block_c, 32), min(block_e, 32)
    block_e = min(block_e, block_dim(dim_e))
    dot_precision, state_precision = _precisions(q.dtype)
    grid = (triton.cdiv(dim_e, block_e), B * num_heads)
    num_warps = 8 if block_k * block_e >= 8192 else 4
    linear_chunk_kernel[grid](
        q, k, v, out, p0, pn, slopes, cu_seqlens,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *_state_strides(p0, p0_transposed), *_state_strides(pn, False),
        num_heads, groups[0], groups[1], groups[2], N,
        scale, out_scale, upd_scale,
        DIM_K=dim_k, DIM_E=dim_e, BLOCK_K=block_k, BLOCK_E=block_e, BLOCK_C=block_c,
        HAS_DECAY=slopes is not None, HAS_P0=p0 is not None, STORE_PN=pn is not None, REVERSE=reverse,
        VARLEN=cu_seqlens is not None, DOT_PRECISION=dot_precision, STATE_PRECISION=state_precision,
        num_warps=num_warps, num_stages=2,  # pipelined chunk loads (cp.async): the next chunk arrives during this one
    )


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
                   scale: float, initial_state: torch.Tensor | None, recurrent: bool = False,
                   cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward. q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (last dim
    contiguous); slopes fp32 (Hq,) or None; initial_state fp32 contiguous (B, Hq, D, Dv)
    or None. Returns out (B, Hq, N, Dv) in q's dtype and the final state fp32 (B, Hq, D, Dv).
    ``recurrent=True`` runs the token-by-token kernel (decoding). With ``cu_seqlens``
    (S + 1,) int32 (B = 1, S packed sequences) the states are (S, Hq, D, Dv), one per sequence."""
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = new_output((B, Hq, N, Dv), q.dtype, q.device)
    state = new_output((rows, Hq, D, Dv), torch.float32, q.device)
    if recurrent:
        block_k, block_e = block_dim(D), min(64, block_dim(Dv))
        grid = (triton.cdiv(Dv, block_e), rows * Hq)
        linear_recurrent_kernel[grid](
            q, k, v, out, initial_state, state, slopes, cu_seqlens,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *state.stride()[:3],
            Hq, Hq // Hkv, N, scale,
            DIM_K=D, DIM_E=Dv, BLOCK_K=block_k, BLOCK_E=block_e,
            HAS_DECAY=slopes is not None, HAS_S0=initial_state is not None, VARLEN=cu_seqlens is not None,
            num_warps=4, num_stages=1)
        return out, state
    chunk_pass(q, k, v, out, num_heads=Hq, groups=(1, Hq // Hkv, Hq // Hkv), slopes=slopes, scale=scale,
               out_scale=scale, upd_scale=1.0, p0=initial_state, pn=state, cu_seqlens=cu_seqlens)
    return out, state


def linear_backward(do: torch.Tensor, d_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`linear_forward`, in fp32.

    do (B, Hq, N, Dv) in q's dtype; d_state fp32 (B, Hq, D, Dv) or None (the gradient of
    the returned state). Returns dq (B, Hq, N, D), and dk (B, Hq, N, D), dv (B, Hq, N, Dv)
    **per query head** (the caller sums each GQA group), and d initial_state
    (B, Hq, D, Dv), all float32. With ``cu_seqlens`` (S + 1,) the states and their
    gradients are (S, Hq, D, Dv), one per packed sequence.
    """
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    g = Hq // Hkv
    do = do.contiguous()
    dq = new_output((B, Hq, N, D), torch.float32, q.device)
    dk = new_output((B, Hq, N, D), torch.float32, q.device)
    dv = new_output((B, Hq, N, Dv), torch.float32, q.device)
    d_s0 = new_output((rows, Hq, D, Dv), torch.float32, q.device)
    # dq_t = scale [sum_{j<=t} lambda^(t-j) (do_t . v_j) k_j + lambda^(i+1) do_t S_prev^T]
    chunk_pass(do, v, k, dq, num_heads=Hq, groups=(1, g, g), slopes=slopes, scale=scale, out_scale=scale,
               upd_scale=1.0, p0=initial_state, p0_transposed=True, cu_seqlens=cu_seqlens)
    # dv_j = k_j dS_j, with dS_j = lambda dS_{j+1} + scale q_j^T do_j (reverse time), dS_N = d_state
    chunk_pass(k, q, do, dv, num_heads=Hq, groups=(g, 1, 1), slopes=slopes, scale=scale, out_scale=1.0,
               upd_scale=scale, p0=d_state, pn=d_s0, reverse=True, cu_seqlens=cu_seqlens)
    # dk_j = v_j dS_j^T
    chunk_pass(v, do, q, dk, num_heads=Hq, groups=(g, 1, 1), slopes=slopes, scale=scale, out_scale=1.0,
               upd_scale=scale, p0=d_state, p0_transposed=True, reverse=True, cu_seqlens=cu_seqlens)
    return dq, dk, dv, d_s0
