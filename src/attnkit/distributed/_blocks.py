"""Local attention on one block of a distributed computation, with the backward
written from the *final* output and LSE (FlashAttention-2's backward).

The forward of a block is the library's flash attention (``return_lse=True``: the
Triton kernel on GPUs, the reference on CPU). The kernel's LSE output is not
differentiable, so the distributed schemes never differentiate through it: they
save the merged output O and LSE and, per block, recompute

    P = exp(S - lse),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),
    dQ += scale dS K,  dK += scale dS^T Q,   delta = rowsum(dO * O) - dlse

(with the softcap chain rule dS *= 1 - tanh^2(S_raw / c)). Because P uses the final
lse, the per-block gradients simply add up. On CUDA (and when no gradient flows into
the LSE) the fused engine's backward kernel does exactly this; otherwise
:func:`block_backward_torch` does it in PyTorch, chunked over query rows so that
memory stays O(chunk x keys).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._reference import expand_kv_heads, query_chunk_rows, softmax_attend
from ..engine import head_dim_blockers
from ..flash import flash_attention

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, M, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) -> out (B, Hq, M, Dv) in the
    compute dtype (float32, float64 for float64), lse (B, Hq, M). Bottom-right causal."""
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, causal=causal, scale=scale, softcap=softcap, return_lse=True)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(compute), lse.to(compute)


def _kernel_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and not head_dim_blockers(q, v)


def block_backward(q, k, v, o, lse, do, delta, dlse, *, causal: bool, scale: float, softcap: float | None,
                   use_kernel: bool | None = None) -> Grads:
    """Gradients of one block given the final output rows and LSE.

    q (B, Hq, M, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv); o, do (B, Hq, M, Dv): the final
    output rows and their gradient; lse (B, Hq, M): the final LSE; delta (B, Hq, M) =
    rowsum(do * o); dlse (B, Hq, M) or None: gradient flowing into the final LSE.
    Returns dq (B, Hq, M, D), dk (B, Hkv, L, D), dv (B, Hkv, L, Dv) in the compute dtype.
    ``use_kernel=None`` picks the engine's kernel on CUDA when ``dlse`` is None.
    """
    if use_kernel is None:
        use_kernel = dlse is None and _kernel_ok(q, v)
    if use_kernel and dlse is None:
        return block_backward_kernel(q, k, v, o, lse, do, causal=causal, scale=scale, softcap=softcap)
    return block_backward_torch(q, k, v, lse, do, delta if dlse is None else delta - dlse, causal=causal,
                                scale=scale, softcap=softcap)


def block_backward_kernel(q, k, v, o, lse, do, *, causal: bool, scale: float, softcap: float | None) -> Grads:
    """The fused engine's backward with flash's schedule, run on the final o and lse."""
    from ..flash import flash_schedule
    from ..kernels import engine

    q, k, v = (t.contiguous() for t in (q, k, v))
    dq, dk, dv, _, _ = engine.attention_backward(do.to(q.dtype).contiguous(), q, k, v, o.to(q.dtype).contiguous(),
                                                 lse.float().contiguous(), flash_schedule(causal), sm_scale=scale,
                                                 softcap=softcap)
    return dq.float(), dk.float(), dv.float()


def block_forward_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
                         softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A block under an explicit mask (windows, sinks, packed sequences): q (B, Hq, M, D),
    k (B, Hkv, L, D), v (B, Hkv, L, Dv), mask (1 or Hq, M, L) bool, True = visible ->
    out (B, Hq, M, Dv), lse (B, Hq, M) in the compute dtype; a row that sees nothing
    gets out 0 and lse -inf. PyTorch, chunked over query rows (memory O(chunk x L))."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, M, L = q.shape[1], q.shape[2], k.shape[2]
    ke, ve = expand_kv_heads(k.to(compute), Hq), expand_kv_heads(v.to(compute), Hq)
    outs, lses = [], []
    rows = query_chunk_rows(q.shape[0] * Hq, L)
    with torch.no_grad():
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            o, lse = softmax_attend(q[:, :, r0:r1].to(compute), ke, ve, scale=scale, mask=mask[None, :, r0:r1],
                                    softcap=softcap)
            outs.append(o)
            lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def block_backward_torch(q, k, v, lse, do, delta, *, causal: bool, scale: float, softcap: float | None,
                         mask: torch.Tensor | None = None) -> Grads:
    """FlashAttention-2's backward in PyTorch (delta already includes -dlse); ``mask``
    (1 or Hq, M, L) bool, True = visible, applies on top of ``causal``."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, M, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    q, do = q.to(compute), do.to(compute)
    ke, ve = expand_kv_heads(k.to(compute), Hq), expand_kv_heads(v.to(compute), Hq)
    # A row that saw no key anywhere has lse = -inf: make its P exactly 0.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(compute)
    delta = delta.to(compute)
    dq = torch.zeros_like(q)
    dke, dve = torch.zeros_like(ke), torch.zeros_like(ve)
    key_pos = torch.arange(L, device=q.device)
    rows = query_chunk_rows(B * Hq, L)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        s = torch.matmul(q[:, :, r0:r1], ke.transpose(-1, -2)) * scale
        if softcap is not None:
            t = torch.tanh(s / softcap)
            s = softcap * t
        if causal:  # bottom-right: query i sits at key position i + L - M
            qpos = torch.arange(r0, r1, device=q.device) + (L - M)
            s = s.masked_fill(key_pos[None, :] > qpos[:, None], float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask[None, :, r0:r1], float("-inf"))
        p = torch.exp(s - lse[:, :, r0:r1, None])
        dve += torch.matmul(p.transpose(-1, -2), do[:, :, r0:r1])
        dp = torch.matmul(do[:, :, r0:r1], ve.transpose(-1, -2))
        ds = p * (dp - delta[:, :, r0:r1, None])
        if softcap is not None:
            ds = ds * (1 - t * t)
        dq[:, :, r0:r1] = torch.matmul(ds, ke) * scale
        dke += torch.matmul(ds.transpose(-1, -2), q[:, :, r0:r1]) * scale
    groups = Hq // Hkv
    dk = dke.view(B, Hkv, groups, L, -1).sum(2)
    dv = dve.view(B, Hkv, groups, L, -1).sum(2)
    return dq, dk, dv


class LocalAttention(torch.autograd.Function):
    """Flash attention whose output *and LSE* are differentiable on every backend
    (the forward may run the kernel; the backward is :func:`block_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, softcap: float | None):
        ctx.set_materialize_grads(False)
        out, lse = block_forward(q, k, v, causal=causal, scale=scale, softcap=softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, softcap)
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable  # the GPU backward is a kernel: a second-order gradient would be silently lost
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, softcap = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        delta = (dout.to(out.dtype) * out).sum(-1)
        dq, dk, dv = block_backward(q, k, v, out, lse, dout, delta, dlse, causal=causal, scale=scale,
                                    softcap=softcap)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
