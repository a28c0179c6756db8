"""The torch backend of sliding_window: SDPA over each query chunk's key slab plus the sinks.

Queries are cut into chunks of C rows. With a bounded window (left, right >= 0) chunk c sees
one contiguous slab of ``C + left + right`` keys (starting ``left`` before its first row's
position) plus the S sink keys, so every chunk has the same shape and all of them run in
one batched call: the chunks go to the batch dimension, and the keys are gathered once,
(B * chunks, H, S + C + left + right, D). Inside a slab the visible pairs form the same
band for every chunk; only the chunks near the sequence's ends (keys before 0 or past Nk,
window keys that are sinks) need their own mask, so those few run in a second call. Work
and memory are O(N * (W + C + S)), never O(N^2). A full causal (or dense) head is one causal
SDPA call; other unbounded windows run in chunks over the visible span, as the reference. Options SDPA cannot express
(softcap, score_mod, dropout) run on the same gathered blocks through explicit scores
(:func:`attnkit.torch_backend.masked_attention`).
"""

from __future__ import annotations

import torch

from .._reference import (
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    map_sequences,
    mod_positions,
)
from ..checks import check_scale
from ..dropout import Dropout
from ..merge import merge_attention
from ..mods import ScoreMod
from ..torch_backend import add_sink_logits, masked_attention, sdpa_with_lse
from .reference import sliding_window_score_mod, visible_keys
from .window import by_window, head_windows

#: query rows per chunk at most: bigger chunks waste more of the (C + W)-key slab on
#: masked pairs, smaller ones more on per-chunk overhead (CPU time at W = 512, N = 8k, fp32:
#: C = 64 and 128 alike, 256 ~10% slower)
MAX_CHUNK = 128
#: the fewest rows of a chunk (tiny windows would otherwise make tiny matrix products)
MIN_CHUNK = 32


def _chunk_rows(left: int, right: int, seqlen_q: int) -> int:
    return max(1, min(seqlen_q, max(MIN_CHUNK, min(MAX_CHUNK, left + right + 1))))


def _banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int, sinks: int, sm_scale: float,
            softcap: float | None, sink_logits: torch.Tensor | None, score_mod: ScoreMod | None,
            heads: torch.Tensor, first_batch: int, dropout: Dropout | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One bounded window (left, right >= 0) for heads ``heads``: q (B, H, Nq, D), k (B, H, Nk, D),
    v (B, H, Nk, Dv) already expanded to the query heads -> out (B, H, Nq, Dv), lse (B, H, Nq)."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    device = q.device
    C = _chunk_rows(left, right, Nq)
    nc = -(-Nq // C)
    L = C + left + right                     # window keys of a chunk
    S = min(sinks, Nk)
    offset = Nk - Nq
    first = torch.arange(nc, device=device) * C                        # first row of each chunk
    base = first + offset - left                                       # its first window key
    # chunks whose mask is the shared band: the slab inside [S, Nk) (no sink, no key out of
    # range), every row real; the others (near the ends) get their own masks
    interior = ((base >= S) & (base + L <= Nk) & (first + C <= Nq)).tolist()
    row, col = torch.arange(C, device=device)[:, None], torch.arange(L, device=device)[None, :]
    band = (col >= row) & (col <= row + left + right)                  # key base + col of row first + row

    # the slabs are overlapping views of k and v padded at both ends (no copy): (B, nc, H, L, D)
    pad_lo = max(0, -int(base[0]))
    pad_hi = max(0, int(base[-1]) + L - Nk)
    lo = int(base[0]) + pad_lo

    def slabs(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (0, 0, pad_lo, pad_hi)) if pad_lo or pad_hi else x
        return x[:, :, lo:].unfold(2, L, C)[:, :, :nc].transpose(-1, -2).transpose(1, 2)

    k_slabs, v_slabs = slabs(k), slabs(v)
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, nc * C - Nq)) if nc * C != Nq else q
    q_chunks = q_pad.view(B, H, nc, C, D).transpose(1, 2)                  # (B, nc, H, C, D)
    needs_positions = score_mod is not None or dropout is not None

    def run(c0: int, c1: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = c1 - c0
        pos = (first[c0:c1, None] + row.view(1, C)) + offset            # (n, C) query positions
        keys = base[c0:c1, None] + col                                  # (n, L) key positions
        if shared:
            mask = band.view(1, 1, C, L)
        else:
            p, j = pos[:, :, None], keys[:, None, :]
            mask = (band & (j >= S) & (j < Nk)).unsqueeze(1).repeat(B, 1, 1, 1)   # (B * n, 1, C, L)
            del p
        positions = None
        if needs_positions:  # padded rows and out-of-range keys (masked) get valid positions
            b = (torch.arange(B, device=device) + first_batch).repeat_interleave(n).view(-1, 1, 1, 1)
            positions = (b, heads.view(1, -1, 1, 1), pos.clamp(max=Nk - 1).repeat(B, 1).view(B * n, 1, C, 1),
                         keys.clamp(0, Nk - 1).repeat(B, 1).view(B * n, 1, 1, L))
        return masked_attention(q_chunks[:, c0:c1].reshape(B * n, H, C, D), k_slabs[:, c0:c1].reshape(B * n, H, L, D),
                                v_slabs[:, c0:c1].reshape(B * n, H, L, Dv), mask, scale=sm_scale, softcap=softcap,
                                score_mod=score_mod, dropout=dropout, positions=positions)

    # runs of consecutive chunks: the interior ones in one call, the edge ones in another
    outs, lses, c0 = [], [], 0
    for c in range(1, nc + 1):
        if c == nc or interior[c] != interior[c0]:
            o, o_lse = run(c0, c, interior[c0])
            outs.append(o.view(B, c - c0, H, C, Dv))
            lses.append(o_lse.view(B, c - c0, H, C))
            c0 = c
    out = torch.cat(outs, dim=1).transpose(1, 2).reshape(B, H, nc * C, Dv)[:, :, :Nq]
    lse = torch.cat(lses, dim=1).transpose(1, 2).reshape(B, H, nc * C)[:, :, :Nq]
    if S:  # the sinks: one call over every row, merged by LSE (row i sees sink j iff j <= p + right)
        pos = torch.arange(Nq, device=device) + offset
        mask = (torch.arange(S, device=device)[None, :] <= pos[:, None] + right).view(1, 1, Nq, S)
        positions = None
        if needs_positions:
            positions = mod_positions(B, 1, pos, torch.arange(S, device=device), first_batch=first_batch)
            positions = (positions[0], heads.view(1, -1, 1, 1)) + positions[2:]
        o_s, lse_s = masked_attention(q, k[:, :, :S], v[:, :, :S], mask, scale=sm_scale, softcap=softcap,
                                      score_mod=score_mod, dropout=dropout, positions=positions)
        out, lse = merge_attention([out, o_s], [lse, lse_s])
    return add_sink_logits(out, lse, sink_logits)


def _spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int, sinks: int, sm_scale: float,
           softcap: float | None, sink_logits: torch.Tensor | None, score_mod: ScoreMod | None,
           heads: torch.Tensor, first_batch: int, dropout: Dropout | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A window unbounded on one side (e.g. a full causal head): chunks of rows over the keys
    they may see (:func:`visible_keys`), the reference's form with SDPA inside."""
    Nq, Nk = q.shape[2], k.shape[2]
    B = q.shape[0]

    def attend(q_chunk: torch.Tensor, first_row: int):
        key_index, mask = visible_keys(first_row, q_chunk.shape[2], Nq, Nk, left, right, sinks, q.device)
        positions = None
        if score_mod is not None or dropout is not None:
            q_idx = torch.arange(first_row, first_row + q_chunk.shape[2], device=q.device) + (Nk - Nq)
            b, _, q_idx, kv_idx = mod_positions(B, 1, q_idx, key_index, first_batch=first_batch)
            positions = (b, heads.view(1, -1, 1, 1), q_idx, kv_idx)
        return masked_attention(q_chunk, k.index_select(2, key_index), v.index_select(2, key_index),
                                mask[None, None], scale=sm_scale, softcap=softcap, sink_logits=sink_logits,
                                score_mod=score_mod, dropout=dropout, positions=positions)

    return map_query_chunks(attend, q, 1024)


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: list[tuple[int, int]], sinks: int,
              sm_scale: float, softcap: float | None, sink_logits: torch.Tensor | None,
              score_mod: ScoreMod | None, dropout: Dropout | None, first_batch: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One (B, Hq, N, D) problem (k, v expanded to Hq heads), heads grouped by window."""
    B, Hq, Nq = q.shape[:3]
    Nk = k.shape[2]
    if Nq == 0 or Nk == 0:   # an empty sequence of a packed batch: rows see nothing
        lse = torch.full((B, Hq, Nq), float("-inf"), dtype=lse_dtype(q), device=q.device)
        return q.new_zeros(B, Hq, Nq, v.shape[-1]), lse
    # an extent past every key is unbounded in effect (p - left < 0 for every row once
    # left >= Nk, p + right >= Nk once right >= Nq): no slab padded by it, the unbounded paths
    windows = [(-1 if left >= Nk else left, -1 if right >= Nq else right) for left, right in windows]

    def run(qg, kg, vg, left, right, heads, sl):
        if left < 0 and right in (-1, 0) and softcap is None and score_mod is None and dropout is None:
            # a full causal (or dense) head, e.g. DuoAttention's retrieval heads: bottom-right
            # causal SDPA, whose kernel skips the blocks past the diagonal (sinks are inside it)
            return add_sink_logits(*sdpa_with_lse(qg, kg, vg, causal=right == 0, scale=sm_scale), sl)
        fn = _banded if left >= 0 and right >= 0 else _spans
        return fn(qg, kg, vg, left, right, sinks, sm_scale, softcap, sl, score_mod, heads, first_batch, dropout)

    return by_window(q, k, v, windows, sink_logits, run)


def _banded_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int, sinks: int,
                   sm_scale: float, softcap: float | None, sink_logits: torch.Tensor | None,
                   score_mod: ScoreMod | None, heads: torch.Tensor, dropout: Dropout | None,
                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bounded window over a packed batch: q (1, H, Nq, D), k (1, H, Nk, D), v (1, H, Nk, Dv)
    holding S sequences at ``cu_seqlens_q/k``. The chunks of every sequence, with their key slabs
    and their sinks gathered (one index_select each for q, k and v), run in one call, each with
    its own mask (a sequence's window and sinks restart at its start) -> out (1, H, Nq, Dv),
    lse (1, H, Nq)."""
    H, D, Dv = q.shape[1], q.shape[-1], v.shape[-1]
    device = q.device
    lq, lk = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    q_max, k_max = int(lq.max()), int(lk.max())
    # extents past every key of every sequence are unbounded in effect: cap the slab there
    left, right = min(left, k_max), min(right, q_max)
    C = _chunk_rows(left, right, max(q_max, 1))
    L = C + left + right
    S = min(sinks, k_max)
    chunks = (lq + C - 1) // C                                           # per sequence
    seq = torch.repeat_interleave(torch.arange(lq.shape[0], device=device), chunks)   # (n,) sequence of a chunk
    n = seq.shape[0]
    first = (torch.arange(n, device=device) - (torch.cumsum(chunks, 0) - chunks)[seq]) * C   # its first local row
    nq, nk = lq[seq, None], lk[seq, None]                                # (n, 1)
    row = first[:, None] + torch.arange(C, device=device)               # (n, C) local rows
    pos = row + nk - nq                                                  # their positions
    j = torch.cat([torch.arange(S, device=device).expand(n, S),
                   (first + (nk - nq)[:, 0] - left)[:, None] + torch.arange(L, device=device)], dim=1)  # (n, S + L)
    is_sink = (torch.arange(S + L, device=device) < S)[None, None, :]
    p, jj = pos[:, :, None], j[:, None, :]
    sink_count = nk.clamp(max=sinks)[:, :, None]
    mask = (jj <= p + right) & torch.where(is_sink, jj < sink_count,
                                           (jj >= p - left) & (jj >= sink_count) & (jj < nk[:, :, None]))
    kv_pos = torch.minimum(j.clamp(min=0), (nk - 1).clamp(min=0))       # valid positions (masked slots too)
    q_pos = torch.minimum(pos, nk - 1)
    k_index = (cu_seqlens_k.long()[seq, None] + kv_pos).clamp(max=k.shape[2] - 1).flatten()
    q_index = (cu_seqlens_q.long()[seq, None] + row).clamp(max=q.shape[2] - 1)   # padding rows: discarded
    real = (row < nq).flatten()
    qc = q.index_select(2, q_index.flatten()).view(H, n, C, D).transpose(0, 1)
    kc = k.index_select(2, k_index).view(H, n, S + L, D).transpose(0, 1)
    vc = v.index_select(2, k_index).view(H, n, S + L, Dv).transpose(0, 1)
    positions = None
    if score_mod is not None or dropout is not None:
        positions = (seq.view(n, 1, 1, 1), heads.view(1, -1, 1, 1), q_pos.view(n, 1, C, 1),
                     kv_pos.view(n, 1, 1, S + L))
    out, lse = masked_attention(qc, kc, vc, mask.unsqueeze(1), scale=sm_scale, softcap=softcap,
                                sink_logits=sink_logits, score_mod=score_mod, dropout=dropout, positions=positions)
    # the chunks' real rows, in order, are the packed rows
    return out.transpose(0, 1).reshape(H, n * C, Dv)[:, real][None], lse.transpose(0, 1).reshape(H, n * C)[:, real][None]


def sliding_window_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, sinks: int = 0,
                         scale: float | None = None, softcap: float | None = None,
                         sink_logits: torch.Tensor | None = None, score_mod: ScoreMod | None = None,
                         cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                         dropout_p: float = 0.0, return_lse: bool = False):
    """The torch backend of :func:`attnkit.sliding_window_attention` (same arguments and
    semantics as :func:`sliding_window_reference`), computed in the inputs' dtype.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv)
    [, lse (B, Hq, Nq) float32 (float64 for float64 inputs)]. Packed sequences
    (``cu_seqlens_q/k``) with a bounded window run in one call (their chunks side by side);
    with an unbounded one, one after the other.
    """
    sm_scale = check_scale(scale, q.shape[-1])
    Hq = q.shape[1]
    windows = head_windows(window, Hq)
    score_mod = sliding_window_score_mod(q, k, score_mod, cu_seqlens_q, cu_seqlens_k)
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    options = {"windows": windows, "sinks": sinks, "sm_scale": sm_scale, "softcap": softcap,
               "sink_logits": sink_logits, "score_mod": score_mod, "dropout": Dropout.draw(dropout_p, q.device)}
    if cu_seqlens_q is not None:
        def run(qg, kg, vg, left, right, heads, sl):
            group = dict(options, windows=[(left, right)] * qg.shape[1], sink_logits=sl)
            if left >= 0 and right >= 0:  # every sequence's chunks in one call
                return _banded_packed(qg, kg, vg, left, right, sinks, sm_scale, softcap, sl, score_mod, heads,
                                      group["dropout"], cu_seqlens_q, cu_seqlens_k)
            # unbounded: each sequence alone (a causal head is one causal SDPA call per sequence)
            return map_sequences(lambda q_s, k_s, v_s, seq: _windowed(q_s, k_s, v_s, first_batch=seq, **group),
                                 qg, kg, vg, cu_seqlens_q, cu_seqlens_k)

        out, lse = by_window(q, k, v, windows, sink_logits, run)
    else:
        out, lse = _windowed(q, k, v, **options)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
