"""Building blocks shared by the PyTorch references of the softmax variants.

Kept deliberately plain: a reference is the specification the kernels are tested
against, so it must be easy to trust at a glance. These helpers hold the pieces
every softmax reference needs exactly once: the GQA head mapping, a masked softmax
with optional softcap and sink logit that never produces NaN, and query chunking
so memory stays proportional to ``chunk * keys`` rather than ``N * N``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.utils.checkpoint

#: a score modification bound to the positions of one chunk: score (B, H, M, L) -> score
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def expand_kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """GQA/MQA mapping: (B, Hkv, ...) -> (B, Hq, ...); query head h reads kv head h // (Hq // Hkv).
    With Hq = 0 (an empty problem) no kv head is read: (B, 0, ...)."""
    if x.shape[1] == heads_q:
        return x
    return x.repeat_interleave(heads_q // x.shape[1], dim=1)


def softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                   mask: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                   sink_logits: Optional[torch.Tensor] = None, score_mod: Optional[ScoreFn] = None,
                   dropout: Callable[[torch.Tensor], torch.Tensor] | None = None, return_probs: bool = False):
    """Exact softmax attention on one block of queries.

    q: (B, H, M, D), k: (B, H, L, D), v: (B, H, L, Dv); ``mask`` is boolean,
    broadcastable to (B, H, M, L), True where a query may see a key. ``sink_logits``
    (H,) adds one logit per head to every row's denominator, with no value.
    ``score_mod`` maps the scores after scale and softcap, before the mask (see
    :func:`bind_score_mod`). ``dropout`` maps the probabilities (B, H, M, L) before they
    multiply v (attention dropout, see :func:`attnkit.dropout.bind_dropout`); the LSE is
    the undropped softmax's. Returns out (B, H, M, Dv) and lse (B, H, M); a row that
    sees nothing has out 0 and lse -inf (with a sink: lse = the sink logit), and
    finite gradients.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if score_mod is not None:
        s = score_mod(s)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    if sink_logits is not None:
        sink = sink_logits.to(s.dtype).view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        s = torch.cat([s, sink], dim=-1)
    # The row max is a constant shift: detaching it is exact and keeps empty rows NaN-free.
    if s.shape[-1] == 0:  # no keys at all (an empty sequence of a packed batch): amax has nothing to reduce
        row_max = s.new_zeros(s.shape[:-1] + (1,))
    else:
        row_max = s.amax(dim=-1, keepdim=True).detach()
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(s - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    if sink_logits is not None:
        p = p[..., :-1]
    if dropout is not None:
        p = dropout(p)
    out = torch.matmul(p.to(v.dtype), v)
    return (out, lse, p) if return_probs else (out, lse)


#: the fewest query rows of a chunk whose keys follow its rows (a sliding window) when the
#: budget allows more: fewer Python steps, and since torch.compile fixes the number of chunks
#: when it traces, one graph serves every length up to a chunk
MIN_CHUNK_ROWS = 128


def query_chunk_rows(batch_heads: int, keys: int, budget: int = 1 << 23) -> int:
    """Rows per query chunk so that one chunk's score matrix holds about ``budget`` elements."""
    return max(16, budget // max(1, batch_heads * keys))


def map_query_chunks(fn: Callable[[torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor,
                     rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply ``fn(q_chunk, first_row) -> (out, lse)`` to query chunks of ``rows`` along dim 2.

    Under autograd each chunk is checkpointed, so the backward pass also keeps only
    one chunk's scores alive instead of all of them. Chunk results are written into
    preallocated outputs rather than kept in a list and concatenated: small retained
    chunks between large freed score buffers fragment the CPU allocator's heap (seen:
    ~1.9 GiB instead of ~0.2 GiB peak for a 32k-token sliding-window reference).
    """
    grad = torch.is_grad_enabled()
    out = lse = None
    # split (not range over the length) keeps the length symbolic under torch.compile: only the
    # number of chunks is fixed when tracing. With no query rows it still gives one (empty) chunk,
    # so fn runs once and the outputs get their shapes.
    for i, chunk in enumerate(q.split(rows, dim=2)):
        start = i * rows
        if grad:
            o, o_lse = torch.utils.checkpoint.checkpoint(fn, chunk, start, use_reentrant=False)
        else:
            o, o_lse = fn(chunk, start)
        if out is None:
            out = o.new_empty(q.shape[:3] + o.shape[3:])
            lse = o_lse.new_empty(q.shape[:3])
        out[:, :, start:start + rows] = o
        lse[:, :, start:start + rows] = o_lse
    return out, lse


def map_sequences(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch as its sequences one by one: the reference form of ``cu_seqlens``.

    q (1, Hq, Nq, D), k (1, Hkv, Nk, D), v (1, Hkv, Nk, Dv) hold S sequences packed along
    N at the (S + 1,) offsets ``cu_seqlens_q/k``. ``fn(q_s, k_s, v_s, s) -> (out, lse)``
    runs sequence s alone (its own positions from 0, bottom-right within it); the
    results are concatenated along N: out (1, Hq, Nq, Dv), lse (1, Hq, Nq).
    """
    outs, lses = [], []
    spans = zip(itertools.pairwise(cu_seqlens_q.tolist()), itertools.pairwise(cu_seqlens_k.tolist()))
    for seq, ((q0, q1), (k0, k1)) in enumerate(spans):
        o, o_lse = fn(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], seq)
        outs.append(o)
        lses.append(o_lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def lse_dtype(x: torch.Tensor) -> torch.dtype:
    """LSE is float32 for half inputs, float64 for the float64 oracle."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def mod_positions(batch: int, heads: int, q_idx: torch.Tensor, kv_idx: torch.Tensor, *, first_batch: int = 0
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (b, h, q_idx, kv_idx) tensors mods see for one chunk, shaped to broadcast against
    scores (B, H, M, L): b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, M, 1) from a (M,)
    tensor, kv_idx (1, 1, 1, L) from (L,) or (1, 1, M, L) from (M, L) (keys gathered per
    query). ``first_batch`` offsets b (the sequence index of a packed batch)."""
    device = q_idx.device
    b = torch.arange(first_batch, first_batch + batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    kv = kv_idx.view(1, 1, 1, -1) if kv_idx.dim() == 1 else kv_idx.view(1, 1, *kv_idx.shape)
    return b, h, q_idx.view(1, 1, -1, 1), kv


def bind_score_mod(score_mod, positions) -> Optional[ScoreFn]:
    """``score_mod`` (an attnkit.ScoreMod, or None) bound to one chunk's positions."""
    if score_mod is None:
        return None
    return lambda s: score_mod.apply(s, *positions)


def bottom_right(first_row: int, rows: int, seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """Key-axis positions of query rows [first_row, first_row + rows): row i sits at i + Nk - Nq."""
    return torch.arange(first_row, first_row + rows, device=device) + (seqlen_k - seqlen_q)
