"""Shared primitives of the ``"torch"`` backend: fast PyTorch attention pieces with the
references' semantics, built from torch's fused kernels.

The variants' fast implementations (``attnkit.<variant>.torch_backend``) are written
from these pieces:

- :func:`sdpa_with_lse`: SDPA (the CPU flash kernel) returning the output and the LSE,
  both differentiable, with bottom-right causal for Nq != Nk, GQA and Dv != D;
- :func:`add_sink_logits`: a per-head sink logit (one extra logit with no value) merged
  into a result by its LSE;
- :func:`softmax_with_lse`: a softmax over scores that may hold -inf (rows that see
  nothing give p = 0, lse = -inf);
- :func:`grouped_scores` / :func:`grouped_values`: GQA batched matmuls without copying
  the kv heads;
- :func:`blocked_attention`: query chunks against only the keys they may see (causal
  chunks skip the keys past their last row), for what SDPA cannot express: softcap,
  score and mask mods, attention dropout.

Everything computes in the input dtype (the LSE is float32 for half inputs, float64
for float64), as the kernels do; the references stay the specification.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._reference import (
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    mod_positions,
    query_chunk_rows,
)
from .merge import merge_attention

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
#: the CPU flash kernel reads kv head h // (Hq // Hkv) itself since torch 2.5 (SDPA's enable_gqa);
#: older versions get the kv heads expanded
_CPU_FLASH_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_lse_any_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of top-left causal or dense attention, heads already matched, one width.
    Off CPU there is no public fused op returning the LSE: scores in query chunks
    (differentiable through autograd)."""
    return blocked_attention(q, k, v, scale=scale, causal=causal)


class _FlashCpu(torch.autograd.Function):
    """The CPU flash kernel with a differentiable LSE.

    q (B, Hq, Nq, W), k/v (B, Hkv, Nk, W), Hkv dividing Hq (the kernel reads kv head
    h // (Hq // Hkv)), top-left causal; ``mask``, if given, an additive float mask in q's
    dtype broadcastable to (B, Hq, Nq, Nk) (0 or -inf; a row of only -inf gives out 0 and
    lse 0: the caller sets its lse). The kernel's backward takes no LSE gradient; it
    is folded in exactly: dS = P * (dP - Δ) with Δ = rowsum(dO * O), and an LSE gradient
    g adds P * g, i.e. Δ becomes Δ - g. One more (zero) column in q, k and v, with
    O's column -g and dO's column 1, makes the kernel compute exactly that Δ.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                mask: torch.Tensor | None = None):
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.mask = causal, scale, mask
        # an unused LSE then arrives as None, not zeros: the plain backward (no padded column)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out.contiguous(), q, k, v, out, lse, 0.0, ctx.causal,
                                             attn_mask=ctx.mask, scale=ctx.scale)
            return dq, dk, dv, None, None, None
        pad = (0, 1)
        out1 = torch.cat([out, (-grad_lse).to(out.dtype).unsqueeze(-1)], dim=-1)
        grad1 = torch.cat([grad_out, grad_out.new_ones(grad_out.shape[:-1] + (1,))], dim=-1)
        dq, dk, dv = _FLASH_CPU_BACKWARD(grad1, F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), out1, lse, 0.0,
                                         ctx.causal, attn_mask=ctx.mask, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None, None


def _fused_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left causal or dense (out, lse) on the fastest fused op of q's device; q, k, v
    non-empty, any head dims (padded to one width: zero columns change no score)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    if q.device.type == "cpu":
        if k.shape[1] != q.shape[1] and not _CPU_FLASH_GQA:
            k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
        out, lse = _FlashCpu.apply(q, k, v, causal, scale, mask)
    else:  # (masked calls run on CPU only: see masked_attention)
        out, lse = _sdpa_lse_any_device(q, k, v, causal, scale)
    return out[..., :dv], lse


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp, both differentiable.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with Hkv dividing Hq (query
    head h reads kv head h // (Hq // Hkv)) -> out (B, Hq, Nq, Dv) in q's dtype and
    lse (B, Hq, Nq) (float32 for half inputs, float64 for float64; natural log).
    ``causal`` is bottom-right aligned (query i sees keys j <= i + Nk - Nq), as every
    attnkit variant's: for Nq > Nk the first Nq - Nk rows see nothing (out 0, lse -inf);
    for Nq < Nk the keys before the diagonal are one dense call merged by LSE with the
    causal square. ``scale`` defaults to 1/sqrt(D). Runs on CPU on torch's flash kernel
    (``_scaled_dot_product_flash_attention_for_cpu``), elsewhere in query chunks.
    """
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if min(B, Hq, Nq, Nk) == 0:
        # nothing to attend: matmuls of empty operands give the zeros, connected to the graph
        out = torch.matmul(torch.matmul(q, expand_kv_heads(k, Hq).transpose(-1, -2)), expand_kv_heads(v, Hq))
        return out, q.new_full((B, Hq, Nq), -math.inf, dtype=lse_dtype(q))
    if not causal or Nq == 1 and Nk >= 1:
        # one query row, bottom-right aligned, sees every key
        return _fused_lse(q, k, v, False, scale)
    if Nq == Nk:
        return _fused_lse(q, k, v, True, scale)
    if Nq > Nk:
        skip = Nq - Nk  # rows that see no key
        out, lse = _fused_lse(q[:, :, skip:], k, v, True, scale)
        out = torch.cat([out.new_zeros(B, Hq, skip, Dv), out], dim=2)
        lse = torch.cat([lse.new_full((B, Hq, skip), -math.inf), lse], dim=2)
        return out, lse
    prefix = Nk - Nq  # keys every row sees
    dense = _fused_lse(q, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    square = _fused_lse(q, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    return merge_attention([dense[0], square[0]], [dense[1], square[1]])


def add_sink_logits(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a per-head sink logit (one more logit in every row's softmax, with no value)
    into a result: out (B, H, N, Dv), lse (B, H, N), sink_logits (H,) or None ->
    out * exp(lse - lse'), lse' = logaddexp(lse, sink). Differentiable in all three; a row
    that saw no key keeps out 0 and gets lse' = the sink logit."""
    if sink_logits is None:
        return out, lse
    sink = sink_logits.to(lse.dtype).view(1, -1, 1)
    total = torch.logaddexp(lse, sink.expand_as(lse))
    return out * torch.exp(lse - total).unsqueeze(-1).to(out.dtype), total


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, M, D) @ k (B, Hkv, L, D)^T -> (B, Hq, M, L) for Hkv dividing Hq, as one
    batched matmul per kv head (the query heads of a group are stacked along M: no copy
    of k per query head)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    if Hkv == Hq:
        return torch.matmul(q, k.transpose(-1, -2))
    s = torch.matmul(q.reshape(B, Hkv, (Hq // Hkv) * M, D), k.transpose(-1, -2))
    return s.view(B, Hq, M, k.shape[2])


def grouped_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, Hq, M, L) @ v (B, Hkv, L, Dv) -> (B, Hq, M, Dv) for Hkv dividing Hq (the
    transpose of :func:`grouped_scores`)."""
    B, Hq, M, L = p.shape
    Hkv = v.shape[1]
    if Hkv == Hq:
        return torch.matmul(p, v)
    out = torch.matmul(p.reshape(B, Hkv, (Hq // Hkv) * M, L), v)
    return out.view(B, Hq, M, v.shape[-1])


class _LseOfSoftmax(torch.autograd.Function):
    """lse = m - log(max p) of rows with softmax p and maximum m, with the gradient p itself:
    differentiating through log(max p) would cancel 1 - (1 - p) in the input dtype (a flat
    bfloat16 row's LSE gradient off by ~10%)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        return m - torch.log(p.amax(dim=-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * p, None, None


def softmax_with_lse(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of scores s (..., L) that may hold -inf -> (p (..., L), lse (...)), both
    differentiable and in s's dtype; a row of only -inf (it sees nothing) gives p = 0 and
    lse = -inf, with zero gradients, as the references'.

    One fused softmax pass; the LSE comes from the row maximum m and the largest
    probability, p_max = exp(m - lse), so lse = m - log(p_max) (exact to rounding, and
    its gradient is p, applied as such) instead of a second pass of exponentials.
    """
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], -math.inf)
    m = s.amax(dim=-1)
    dead = torch.isneginf(m)
    any_dead = bool(dead.any())
    if any_dead:
        s = s.masked_fill(dead.unsqueeze(-1), 0.0)
    p = torch.softmax(s, dim=-1)
    lse = _LseOfSoftmax.apply(s, m.detach(), p.detach())
    if any_dead:
        p = p.masked_fill(dead.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(dead, -math.inf)
    return p, lse


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                      softcap: float | None = None, score_mod: Any = None, mask_mod: Any = None,
                      sink_logits: torch.Tensor | None = None, dropout: Any = None, first_batch: int = 0,
                      rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in query chunks, each against only the keys it may see.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hkv dividing Hq ->
    out (B, Hq, Nq, Dv), lse (B, Hq, Nq) (float32 for half inputs). The reference's
    semantics in its order: scores times ``scale``, ``softcap``, the (specialized)
    ``score_mod``, then the bottom-right ``causal`` mask and the (specialized)
    ``mask_mod``; ``sink_logits`` (Hq,) merged by LSE; ``dropout`` (an
    :class:`attnkit.dropout.Dropout`) on the probabilities, keyed by the same positions
    as the reference's. Mods see batch ``first_batch + b``. A chunk scores only the span
    of keys some of its rows see (``causal``: up to its last row's diagonal; a
    ``mask_mod``: between the first and the last key it keeps), so fully masked key
    blocks are skipped; chunks of ``rows`` query rows (default: ~8M scores per chunk) are
    checkpointed under autograd, so the backward keeps one chunk's scores alive.
    """
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    offset = Nk - Nq  # bottom-right: row i sits at key position i + offset
    needs_positions = score_mod is not None or mask_mod is not None or dropout is not None

    def attend(q_chunk: torch.Tensor, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        R = q_chunk.shape[2]
        lo, hi = 0, min(Nk, max(0, first_row + R + offset)) if causal else Nk
        query_pos = torch.arange(first_row, first_row + R, device=q.device) + offset
        keep = None
        if mask_mod is not None:
            keep = mask_mod.apply(*mod_positions(B, Hq, query_pos, torch.arange(hi, device=q.device),
                                                 first_batch=first_batch))
            keep = torch.broadcast_to(keep, (B, Hq, R, hi))
            # score only the span between the first and the last key some row of the chunk sees
            seen = keep.any(dim=2).flatten(0, 1).any(dim=0).nonzero()
            lo, hi = (int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 0)
            keep = keep[..., lo:hi]
        k_c, v_c = k[:, :, lo:hi], v[:, :, lo:hi]
        s = grouped_scores(q_chunk, k_c) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        key_pos = torch.arange(lo, hi, device=q.device)
        positions = mod_positions(B, Hq, query_pos, key_pos, first_batch=first_batch) if needs_positions else None
        if score_mod is not None:
            s = score_mod.apply(s, *positions)
        mask = None
        if causal and first_row + offset < hi - 1:  # the chunk's first row does not see its last key
            mask = key_pos[None, :] <= query_pos[:, None]
        if keep is not None:
            mask = keep if mask is None else keep & mask
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        p, lse = softmax_with_lse(s)
        if dropout is not None:
            p = dropout.apply(p, positions)
        out = grouped_values(p.to(v.dtype), v_c)
        return out, lse.to(lse_dtype(q))

    step = rows if rows is not None else query_chunk_rows(B * Hq, Nk)
    out, lse = map_query_chunks(attend, q, step)
    return add_sink_logits(out, lse, sink_logits)


__all__ = ["add_sink_logits", "blocked_attention", "grouped_scores", "grouped_values", "sdpa_with_lse",
           "softmax_with_lse"]


#: explicit scores (softcap, mods, dropout) per piece of :func:`masked_attention`'s blocks, at most
_EXPLICIT_SCORES = 1 << 23


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
                     softcap: float | None = None, score_mod: Any = None, sink_logits: torch.Tensor | None = None,
                     dropout: Any = None, positions: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of gathered blocks under a boolean mask, the references' semantics.

    q (Bx, Hq, M, D), k (Bx, Hkv, L, D), v (Bx, Hkv, L, Dv), Hkv dividing Hq; ``mask`` bool
    (Bx or 1, Hq or 1, M, L), True where a query sees a key -> out (Bx, Hq, M, Dv),
    lse (Bx, Hq, M) (float32 for half inputs); a row that sees nothing has out 0 and lse
    -inf (the sink logit with ``sink_logits`` (Hq,)). ``softcap``, ``score_mod`` (specialized)
    and ``dropout`` (an :class:`attnkit.dropout.Dropout`) as in the references, with
    ``positions`` = (b, h, q_idx, kv_idx) broadcastable to the scores (what mods and dropout
    see). Without those three, on CPU, it is one call of the flash kernel with the mask
    added to the scores; otherwise explicit scores, in pieces of the blocks (along Bx) of
    about 8M scores, checkpointed under autograd.
    """
    Bx, Hq, M = q.shape[:3]
    L = k.shape[2]
    if min(Bx, Hq, M, L) == 0:
        out = torch.matmul(torch.matmul(q, expand_kv_heads(k, Hq).transpose(-1, -2)), expand_kv_heads(v, Hq))
        lse = q.new_full((Bx, Hq, M), -math.inf, dtype=lse_dtype(q))
        return add_sink_logits(out, lse, sink_logits)
    if softcap is None and score_mod is None and dropout is None and q.device.type == "cpu":
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -math.inf)
        out, lse = _fused_lse(q, k, v, False, scale, bias.expand(Bx, bias.shape[1], M, L))
        seen = mask.any(dim=-1)  # the kernel gives a row that sees nothing lse 0
        lse = torch.where(seen, lse.to(lse_dtype(q)), -math.inf)
        return add_sink_logits(out, lse, sink_logits)
    step = max(1, _EXPLICIT_SCORES // (Hq * M * L))
    if Bx > step:
        # explicit scores of every block at once could take gigabytes: blocks in pieces of about
        # _EXPLICIT_SCORES scores, each checkpointed under autograd (recomputed in the backward)
        def piece(first: int, q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor):
            def cut(t: torch.Tensor) -> torch.Tensor:
                return t[first:first + step] if t.dim() and t.shape[0] == Bx else t

            cut_positions = None if positions is None else tuple(map(cut, positions))
            return masked_attention(q_, k_, v_, cut(mask), scale=scale, softcap=softcap, score_mod=score_mod,
                                    dropout=dropout, positions=cut_positions)

        from torch.utils.checkpoint import checkpoint

        outs, lses = [], []
        for first in range(0, Bx, step):
            args = (first, q[first:first + step], k[first:first + step], v[first:first + step])
            if torch.is_grad_enabled():
                o, o_lse = checkpoint(piece, *args, use_reentrant=False)
            else:
                o, o_lse = piece(*args)
            outs.append(o)
            lses.append(o_lse)
        return add_sink_logits(torch.cat(outs), torch.cat(lses), sink_logits)
    s = grouped_scores(q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if score_mod is not None:
        s = score_mod.apply(s, *positions)
    p, lse = softmax_with_lse(s.masked_fill(~mask, -math.inf))
    if dropout is not None:
        p = dropout.apply(p, positions)
    return add_sink_logits(grouped_values(p.to(v.dtype), v), lse.to(lse_dtype(q)), sink_logits)


def _softcap_plan(q: torch.Tensor, k: torch.Tensor, causal: bool):
    """(first row that sees a key, rows per chunk, chunk key end) of :func:`softcap_attention`."""
    Nq, Nk = q.shape[2], k.shape[2]
    first = max(0, Nq - Nk) if causal else 0  # bottom-right causal: earlier rows see nothing
    rows = query_chunk_rows(q.shape[0] * q.shape[1], Nk, budget=1 << 23)

    def key_end(r1: int) -> int:
        return min(Nk, r1 + Nk - Nq) if causal else Nk

    return first, rows, key_end


def _causal_cut(t: torch.Tensor, groups: int, r0: int, r1: int, offset: int, hi: int) -> None:
    """Set to -inf, in place, the scores of t (BHkv, G * R, hi) (rows r0..r1 of each group)
    past the bottom-right diagonal: key j > row + offset."""
    c0 = max(0, r0 + offset + 1)
    if c0 >= hi:
        return
    rows = torch.arange(r0, r1, device=t.device)[:, None] + offset
    cut = torch.arange(c0, hi, device=t.device)[None, :] > rows
    t.view(t.shape[0], groups, r1 - r0, hi)[..., c0:hi].masked_fill_(cut, -math.inf)


class _SoftcapAttention(torch.autograd.Function):
    """Softcapped softmax attention in query chunks with a hand-written backward.

    softcap * tanh(z / softcap) = 2 softcap * sigmoid(2 z / softcap) - softcap (one
    sigmoid pass instead of tanh, scale and 2 / softcap folded into q); scores are bounded
    by the softcap, so exp needs no row maximum when exp(softcap) cannot overflow a sum.
    Each chunk's scores live in one reused buffer (no fresh allocation per chunk); the
    backward recomputes them per chunk (FlashAttention-2's backward, with the softcap's
    derivative 4 sigmoid (1 - sigmoid)) and takes the LSE's gradient too.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, softcap: float,
                causal: bool):
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G, BH = Hq // Hkv, B * Hkv
        first, rows, key_end = _softcap_plan(q, k, causal)
        # without a row maximum exp(u) lies in [exp(-softcap), exp(softcap)]: safe in float32's range
        shift_free = softcap <= 60 and q.dtype != torch.float16
        qg = q.reshape(BH, G, Nq, D)
        kt, vg = k.reshape(BH, Nk, D).transpose(1, 2), v.reshape(BH, Nk, Dv)
        out = q.new_zeros(BH, G, Nq, Dv)
        lse = q.new_full((BH, G, Nq), -math.inf, dtype=lse_dtype(q))
        scratch = q.new_empty(BH * G * min(rows, Nq) * Nk)
        for r0 in range(first, Nq, rows):
            r1 = min(Nq, r0 + rows)
            hi = key_end(r1)
            t = scratch[:BH * G * (r1 - r0) * hi].view(BH, G * (r1 - r0), hi)
            qc = qg[:, :, r0:r1].reshape(BH, G * (r1 - r0), D) * (2 * scale / softcap)
            torch.bmm(qc, kt[:, :, :hi], out=t)
            t.sigmoid_().mul_(2 * softcap).sub_(softcap)  # the softcapped score u
            if causal:
                _causal_cut(t, G, r0, r1, Nk - Nq, hi)
            if shift_free:
                shift = None
            else:
                shift = t.amax(dim=-1, keepdim=True)
                t.sub_(shift)
            t.exp_()
            total = t.sum(dim=-1, dtype=lse.dtype)
            o = torch.bmm(t, vg[:, :hi]).div_(total.unsqueeze(-1).to(t.dtype))
            row_lse = total.log_() if shift is None else total.log_().add_(shift.squeeze(-1).to(lse.dtype))
            out[:, :, r0:r1] = o.view(BH, G, r1 - r0, Dv)
            lse[:, :, r0:r1] = row_lse.view(BH, G, r1 - r0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (scale, softcap, causal)
        ctx.set_materialize_grads(False)
        return out.view(B, Hq, Nq, Dv), lse.view(B, Hq, Nq)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        scale, softcap, causal = ctx.options
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G, BH = Hq // Hkv, B * Hkv
        first, rows, key_end = _softcap_plan(q, k, causal)
        qg = q.reshape(BH, G, Nq, D)
        kg, vg = k.reshape(BH, Nk, D), v.reshape(BH, Nk, Dv)
        dout = torch.zeros_like(out) if grad_out is None else grad_out.reshape(BH, G, Nq, Dv)
        # Δ = rowsum(dO * O) - dLSE: dS = P * (dP - Δ)
        delta = (dout.to(lse.dtype) * out.to(lse.dtype)).sum(-1)
        if grad_lse is not None:
            delta = delta - torch.where(torch.isinf(lse), 0, grad_lse.reshape(BH, G, Nq).to(lse.dtype))
        dq = torch.zeros_like(qg)
        dk = torch.zeros(BH, Nk, D, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype, device=q.device)
        dv = torch.zeros(BH, Nk, Dv, dtype=dk.dtype, device=q.device)
        size = BH * G * min(rows, Nq) * Nk
        sig_buf, p_buf, dp_buf = q.new_empty(size), q.new_empty(size), q.new_empty(size)
        for r0 in range(first, Nq, rows):
            r1 = min(Nq, r0 + rows)
            hi, M = key_end(r1), G * (r1 - r0)
            sig = sig_buf[:BH * M * hi].view(BH, M, hi)
            p = p_buf[:BH * M * hi].view(BH, M, hi)
            dp = dp_buf[:BH * M * hi].view(BH, M, hi)
            q_c = qg[:, :, r0:r1].reshape(BH, M, D)
            torch.bmm(q_c * (2 * scale / softcap), kg[:, :hi].transpose(1, 2), out=sig)
            sig.sigmoid_()
            row_lse = lse[:, :, r0:r1].reshape(BH, M, 1).to(q.dtype)
            torch.mul(sig, 2 * softcap, out=p).sub_(row_lse + softcap)  # u - lse
            if causal:
                _causal_cut(p, G, r0, r1, Nk - Nq, hi)
            p.exp_()  # the probabilities
            do_c = dout[:, :, r0:r1].reshape(BH, M, Dv)
            dv[:, :hi] += torch.bmm(p.transpose(1, 2), do_c).to(dv.dtype)
            torch.bmm(do_c, vg[:, :hi].transpose(1, 2), out=dp)
            dp.sub_(delta[:, :, r0:r1].reshape(BH, M, 1).to(q.dtype)).mul_(p)  # dL/du
            sig.addcmul_(sig, sig, value=-1)  # sigmoid (1 - sigmoid): du/dz = 4 of it
            dp.mul_(sig).mul_(4 * scale)  # dL/d(q.k)
            dq[:, :, r0:r1] = torch.bmm(dp, kg[:, :hi]).view(BH, G, r1 - r0, D)
            dk[:, :hi] += torch.bmm(dp.transpose(1, 2), q_c).to(dk.dtype)
        return (dq.view(B, Hq, Nq, D), dk.to(k.dtype).view(B, Hkv, Nk, D), dv.to(v.dtype).view(B, Hkv, Nk, Dv),
                None, None, None)


def softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, softcap: float,
                      causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of softcapped scores, softcap * tanh(scale * q.k / softcap).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hkv dividing Hq ->
    out (B, Hq, Nq, Dv), lse (B, Hq, Nq) (float32 for half inputs), both differentiable;
    ``causal`` bottom-right (rows that see no key: out 0, lse -inf). The fast path of the
    references' softcap without mods or dropout: query chunks against only the keys up to
    their diagonal, a hand-written backward; memory O(chunk x Nk).
    """
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    if min(B, Hq, Nq, Nk) == 0:
        return sdpa_with_lse(q, k, v, causal=causal, scale=scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        # the sigmoid form of tanh cancels near 0: in half precision that is a score error of
        # ~softcap * 2^-11, so half inputs run in float32 (the inputs are O(N) to convert)
        out, lse = _SoftcapAttention.apply(q.float(), k.float(), v.float(), scale, softcap, causal)
        return out.to(q.dtype), lse
    return _SoftcapAttention.apply(q, k, v, scale, softcap, causal)
