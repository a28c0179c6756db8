"""Host side of the chunk-parallel linear-attention engine: the two stages (states pass,
output pass), the forward and backward passes built from them, the recurrent (decoding)
kernel, and the tile config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton

from ..common import INTERPRET, block_dim, new_output
from .chunked import linear_output_kernel, linear_recurrent_kernel, linear_states_kernel

#: (BLOCK_C, BLOCK_E): rows per chunk and value columns per program.
DEFAULT_CONFIG = (64, 64)
INTERPRETER_CONFIG = (32, 32)
#: feature (Dk) columns per slice: the states pass's rows per program, the output pass's loop step
BLOCK_K_MAX = 64
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


def _block_k(dim: int) -> int:
    # the interpreter slices at 32 so that small test dims already take the Dk loop
    return min(block_dim(dim), 32 if INTERPRET else BLOCK_K_MAX)


@dataclass(frozen=True)
class Precision:
    """How each product runs for one input dtype.

    dot: the intra-chunk q k^T and (scores) v, on the input dtype ("ieee" for fp32).
    state: the input_precision of the state products that keep fp32 operands ("ieee" for fp32
        inputs, TF32 for half ones).
    half_update: the states pass's k^T v on the input dtype's tensor cores (fp32 accumulation):
        each chunk's update is a bounded sum of C products.
    half_state: q . S on the input dtype, the state cast to it: bfloat16 only. A state is a
        sum over the whole sequence (a linear attention without decay grows with N, and
        normalize's z column counts tokens), beyond float16's 65504, so float16 keeps fp32
        operands (TF32) there.
    state_dtype: the dtype of the per-chunk states the output pass reads (bfloat16 for
        bfloat16 inputs: half the bytes, float32's range).
    """

    dot: str
    state: str
    half_update: bool
    half_state: bool
    state_dtype: torch.dtype


def precision(dtype: torch.dtype) -> Precision:
    if dtype == torch.float32:
        return Precision("ieee", "ieee", False, False, torch.float32)
    if dtype == torch.bfloat16:
        return Precision("tf32", "tf32", True, True, torch.bfloat16)
    return Precision("tf32", "tf32", True, False, torch.float32)


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of a call are: ``rows`` state rows (batch entries or packed sequences),
    ``n_chunks`` per row (unpacked) and ``total`` chunks in all; for a packed batch the
    (S + 1,) first chunk of each sequence and the (total, 2) (sequence, chunk) table."""

    block_c: int
    rows: int
    n_chunks: int
    total: int
    cu_seqlens: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    table: torch.Tensor | None = None


def plan_chunks(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> ChunkPlan:
    block_c = _config()[0]
    N = q.shape[2]
    if cu_seqlens is None:
        n_chunks = triton.cdiv(N, block_c)
        return ChunkPlan(block_c, q.shape[0], n_chunks, q.shape[0] * n_chunks)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    per_seq = (lengths + block_c - 1) // block_c
    offsets = torch.cat([per_seq.new_zeros(1), per_seq.cumsum(0)])
    total = int(offsets[-1])   # sizes the grid: one host read per call
    seq = torch.repeat_interleave(torch.arange(per_seq.numel(), device=q.device), per_seq, output_size=total)
    table = torch.stack([seq, torch.arange(total, device=q.device) - offsets[seq]], dim=1).to(torch.int32)
    return ChunkPlan(block_c, per_seq.numel(), 0, total, cu_seqlens, offsets.to(torch.int32).contiguous(),
                  table.contiguous())


def _gate_args(gates: torch.Tensor | None, slopes: torch.Tensor | None) -> tuple[int, tuple[int, int, int]]:
    if gates is not None:
        return 2, gates.stride()
    return (1 if slopes is not None else 0), (0, 0, 0)


def states_pass(k: torch.Tensor, v: torch.Tensor, plan: ChunkPlan, *, num_heads: int, groups: tuple[int, int],
                gates: torch.Tensor | None, slopes: torch.Tensor | None, upd_scale: float,
                state_dtype: torch.dtype, p0: torch.Tensor | None = None, pn: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """Stage 1 (chunked.py): the state entering each chunk (in walk order; from the last
    chunk back when ``reverse``), as HS (total chunks, H, K, E) in ``state_dtype``.

    k (B, H/gk, N, K), v (B, H/gv, N, E) with unit last stride; gates fp32 (B, H, N) or
    slopes fp32 (H,) or neither; p0 fp32 contiguous (rows, H, K, E) (zeros if None); pn
    fp32 (rows, H, K, E) receives the last state.
    """
    dim_k, dim_e = k.shape[-1], v.shape[-1]
    block_c, block_e = plan.block_c, min(_config()[1], block_dim(dim_e))
    block_k = _block_k(dim_k)
    hs = new_output((plan.total, num_heads, dim_k, dim_e), state_dtype, k.device)
    gate, g_strides = _gate_args(gates, slopes)
    prec = precision(k.dtype)
    grid = (triton.cdiv(dim_k, block_k), triton.cdiv(dim_e, block_e), plan.rows * num_heads)
    linear_states_kernel[grid](
        k, v, gates, slopes, p0, pn, hs, plan.cu_seqlens, plan.offsets,
        *k.stride()[:3], *v.stride()[:3], *g_strides,
        *(p0.stride()[:3] if p0 is not None else (0, 0, 0)), *(pn.stride()[:3] if pn is not None else (0, 0, 0)),
        *hs.stride()[:3],
        num_heads, groups[0], groups[1], k.shape[2], plan.n_chunks, upd_scale,
        DIM_K=dim_k, DIM_E=dim_e, BLOCK_K=block_k, BLOCK_E=block_e, BLOCK_C=block_c,
        GATE=gate, HAS_P0=p0 is not None, STORE_PN=pn is not None, REVERSE=reverse,
        VARLEN=plan.cu_seqlens is not None, HALF_UPDATE=prec.half_update, STATE_PRECISION=prec.state,
        num_warps=4, num_stages=2,
    )
    return hs


def output_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, hs: torch.Tensor,
                plan: ChunkPlan, *, num_heads: int, groups: tuple[int, int, int], gates: torch.Tensor | None,
                slopes: torch.Tensor | None, scale: float, out_scale: float, transposed: bool = False,
                reverse: bool = False) -> None:
    """Stage 2 (chunked.py): every chunk of out (B, H, N, E) at once. q (B, H/gq, N, K),
    k (B, H/gk, N, K), v (B, H/gv, N, E); hs from :func:`states_pass`, (total, H, K, E), or
    (total, H, E, K) read transposed."""
    if plan.total == 0:
        return
    dim_k, dim_e = q.shape[-1], v.shape[-1]
    block_c, block_e = plan.block_c, min(_config()[1], block_dim(dim_e))
    block_k = _block_k(dim_k)
    sc, sh, sr, se = hs.stride()
    if transposed:
        sr, se = se, sr
    gate, g_strides = _gate_args(gates, slopes)
    prec = precision(q.dtype)
    heads_axis = num_heads if plan.cu_seqlens is not None else plan.rows * num_heads
    chunks_axis = plan.total if plan.cu_seqlens is not None else plan.n_chunks
    grid = (chunks_axis, triton.cdiv(dim_e, block_e), heads_axis)
    linear_output_kernel[grid](
        q, k, v, out, gates, slopes, hs, plan.cu_seqlens, plan.table,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *g_strides,
        sc, sh, sr, se,
        num_heads, groups[0], groups[1], groups[2], q.shape[2], plan.n_chunks, scale, out_scale,
        DIM_K=dim_k, DIM_E=dim_e, BLOCK_K=block_k, BLOCK_E=block_e, BLOCK_C=block_c,
        GATE=gate, REVERSE=reverse, VARLEN=plan.cu_seqlens is not None, DOT_PRECISION=prec.dot,
        HALF_STATE=prec.half_state, STATE_PRECISION=prec.state,
        num_warps=4, num_stages=2,  # pipelined Dk slices (cp.async): the next slice arrives during this one
    )


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
                   scale: float, initial_state: torch.Tensor | None, recurrent: bool = False,
                   cu_seqlens: torch.Tensor | None = None, gates: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal forward. q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) (last dim
    contiguous); slopes fp32 (Hq,) (g_t = -slope) or gates fp32 contiguous (B, Hq, N)
    (log-gates g_t) or neither; initial_state fp32 contiguous (B, Hq, D, Dv) or None.
    Returns out (B, Hq, N, Dv) in q's dtype and the final state fp32 (B, Hq, D, Dv).
    ``recurrent=True`` runs the token-by-token kernel (decoding). With ``cu_seqlens``
    (S + 1,) int32 (B = 1, S packed sequences) the states are (S, Hq, D, Dv), one per sequence."""
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    rows = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    out = new_output((B, Hq, N, Dv), q.dtype, q.device)
    state = new_output((rows, Hq, D, Dv), torch.float32, q.device)
    if recurrent:
        block_k = block_dim(D)
        block_e = max(16, min(64, block_dim(Dv), 8192 // block_k))   # a [K, E] fp32 state in registers
        grid = (triton.cdiv(Dv, block_e), rows * Hq)
        gate, g_strides = _gate_args(gates, slopes)
        linear_recurrent_kernel[grid](
            q, k, v, out, initial_state, state, gates, slopes, cu_seqlens,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *g_strides,
            *state.stride()[:3], Hq, Hq // Hkv, N, scale,
            DIM_K=D, DIM_E=Dv, BLOCK_K=block_k, BLOCK_E=block_e,
            GATE=gate, HAS_S0=initial_state is not None, VARLEN=cu_seqlens is not None,
            num_warps=8 if block_k * block_e > 4096 else 4, num_stages=1)
        return out, state
    plan = plan_chunks(q, cu_seqlens)
    g = Hq // Hkv
    hs = states_pass(k, v, plan, num_heads=Hq, groups=(g, g), gates=gates, slopes=slopes, upd_scale=1.0,
                     state_dtype=precision(q.dtype).state_dtype, p0=initial_state, pn=state)
    output_pass(q, k, v, out, hs, plan, num_heads=Hq, groups=(1, g, g), gates=gates, slopes=slopes,
                scale=scale, out_scale=scale)
    return out, state


def linear_backward(do: torch.Tensor, d_state: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                    gates: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`linear_forward`, in fp32.

    do (B, Hq, N, Dv) in q's dtype; d_state fp32 (B, Hq, D, Dv) or None (the gradient of
    the returned state). Returns dq (B, Hq, N, D), and dk (B, Hq, N, D), dv (B, Hq, N, Dv)
    **per query head** (the caller sums each GQA group), and d initial_state
    (B, Hq, D, Dv), all float32. With ``cu_seqlens`` (S + 1,) the states and their
    gradients are (S, Hq, D, Dv), one per packed sequence. Two states passes (S forward,
    dS reverse) feed three output passes; dq and dk read theirs transposed.
    """
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    g = Hq // Hkv
    do = do.contiguous()
    plan = plan_chunks(q, cu_seqlens)
    state_dtype = precision(q.dtype).state_dtype
    gate_kw = {"gates": gates, "slopes": slopes}
    dq = new_output((B, Hq, N, D), torch.float32, q.device)
    dk = new_output((B, Hq, N, D), torch.float32, q.device)
    dv = new_output((B, Hq, N, Dv), torch.float32, q.device)
    d_s0 = new_output((plan.rows, Hq, D, Dv), torch.float32, q.device)
    # dq_t = scale [sum_{j<=t} exp(b_t - b_j) (do_t . v_j) k_j + exp(b_t) do_t S_c^T]: the forward on (dO, v, k)
    hs = states_pass(k, v, plan, num_heads=Hq, groups=(g, g), upd_scale=1.0, state_dtype=state_dtype,
                     p0=initial_state, **gate_kw)
    output_pass(do, v, k, dq, hs, plan, num_heads=Hq, groups=(1, g, g), scale=scale, out_scale=scale,
                transposed=True, **gate_kw)
    del hs
    # dS_t = exp(g_{t+1}) dS_{t+1} + scale q_t^T do_t from dS_N = d_state; its last value is d initial_state
    hd = states_pass(q, do, plan, num_heads=Hq, groups=(1, 1), upd_scale=scale, state_dtype=state_dtype,
                     p0=d_state, pn=d_s0, reverse=True, **gate_kw)
    # dv_j = k_j dS_j, dk_j = v_j dS_j^T
    output_pass(k, q, do, dv, hd, plan, num_heads=Hq, groups=(g, 1, 1), scale=scale, out_scale=1.0,
                reverse=True, **gate_kw)
    output_pass(v, do, q, dk, hd, plan, num_heads=Hq, groups=(g, 1, 1), scale=scale, out_scale=1.0,
                transposed=True, reverse=True, **gate_kw)
    return dq, dk, dv, d_s0
