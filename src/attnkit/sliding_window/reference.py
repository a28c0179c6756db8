"""PyTorch reference of the sliding_window variant.

Memory is O(N * (W + S)), never N x N: queries are processed in chunks of rows, and a
chunk gathers only the keys it can see, the sinks [0, S) and the span of its rows'
windows. Heads are grouped by window, so a full causal head (window (-1, 0)) costs
O(N^2) work for itself but does not widen the key span of the windowed heads.
"""

from __future__ import annotations

import torch

from .._reference import (
    MIN_CHUNK_ROWS,
    bind_score_mod,
    bottom_right,
    expand_kv_heads,
    lse_dtype,
    map_query_chunks,
    map_sequences,
    mod_positions,
    query_chunk_rows,
    softmax_attend,
)
from ..checks import check_scale
from ..dropout import Dropout, bind_dropout
from ..mods import Problem, ScoreMod
from ..mods.core import check_score_mod
from .window import by_window, head_windows


def sliding_window_score_mod(q: torch.Tensor, k: torch.Tensor, score_mod: ScoreMod | None,
                             cu_seqlens_q: torch.Tensor | None = None,
                             cu_seqlens_k: torch.Tensor | None = None) -> ScoreMod | None:
    """``score_mod`` checked and specialized to the call, a packed batch counting its
    sequences (None stays None)."""
    if score_mod is None:
        return None
    return check_score_mod("score_mod", score_mod, Problem.of("sliding_window", q, k, cu_seqlens_q, cu_seqlens_k))


def visible_keys(first_row: int, rows: int, seqlen_q: int, seqlen_k: int, left: int, right: int, sinks: int,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys query rows [first_row, first_row + rows) may see, and their mask.

    Returns ``key_index`` (L,) int64, sorted, the union of the sinks and the rows'
    windows clipped to [0, seqlen_k) (possibly empty: a row over no keys gets out 0 and
    lse -inf from softmax_attend), and ``mask`` (rows, L) bool, True where row i
    sees key ``key_index[l]``: j <= p + right and (j >= p - left or j < sinks),
    with p = i + seqlen_k - seqlen_q (bottom-right aligned) and -1 = unbounded.
    """
    offset = seqlen_k - seqlen_q
    p_first, p_last = first_row + offset, first_row + rows - 1 + offset
    hi = seqlen_k if right < 0 else max(0, min(seqlen_k, p_last + right + 1))   # exclusive
    lo = 0 if left < 0 else min(max(0, p_first - left), hi)
    sink_hi = min(sinks, hi)
    if sink_hi >= lo:  # sinks and window touch: one span
        key_index = torch.arange(0, hi, device=device)
    else:
        key_index = torch.cat([torch.arange(0, sink_hi, device=device), torch.arange(lo, hi, device=device)])
    pos = torch.arange(p_first, p_last + 1, device=device)[:, None]
    j = key_index[None, :]
    in_window = torch.ones_like(j, dtype=torch.bool) if left < 0 else j >= pos - left
    before_right = torch.ones_like(j, dtype=torch.bool) if right < 0 else j <= pos + right
    mask = before_right & (in_window | (j < sinks))
    return key_index, mask


def _one_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, left: int, right: int, sinks: int,
                sm_scale: float, softcap: float | None, sink_logits: torch.Tensor | None,
                score_mod: ScoreMod | None, heads: torch.Tensor, first_batch: int,
                dropout: Dropout | None = None):
    """Heads ``heads`` (their indices among the query heads), which share one window.
    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv); mods (and dropout) see batch
    entry 0 as ``first_batch``."""
    Nq, Nk = q.shape[2], k.shape[2]
    span = min(Nk, (Nk if left < 0 else left) + (Nk if right < 0 else right) + 1) + min(sinks, Nk)
    # a chunk of rows sees at most rows + span keys: at least span rows (and MIN_CHUNK_ROWS), as
    # many as the memory budget allows
    rows = max(MIN_CHUNK_ROWS, span)
    rows = min(rows, query_chunk_rows(q.shape[0] * q.shape[1], rows + span))

    def attend(q_chunk: torch.Tensor, first_row: int):
        key_index, mask = visible_keys(first_row, q_chunk.shape[2], Nq, Nk, left, right, sinks, q.device)
        b, _, q_idx, kv_idx = mod_positions(q.shape[0], 1, bottom_right(first_row, q_chunk.shape[2], Nq, Nk, q.device),
                                            key_index, first_batch=first_batch)
        positions = (b, heads.view(1, -1, 1, 1), q_idx, kv_idx)
        return softmax_attend(q_chunk, k.index_select(2, key_index), v.index_select(2, key_index),
                              scale=sm_scale, mask=mask, softcap=softcap, sink_logits=sink_logits,
                              score_mod=bind_score_mod(score_mod, positions), dropout=bind_dropout(dropout, positions))

    return map_query_chunks(attend, q, rows)


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: list[tuple[int, int]], sinks: int,
              sm_scale: float, softcap: float | None, sink_logits: torch.Tensor | None,
              score_mod: ScoreMod | None, first_batch: int = 0, dropout: Dropout | None = None):
    """One (B, Hq, N, D) problem, k and v already expanded to Hq heads, one window per
    head: -> (out, lse). Heads are grouped by window, each group run by :func:`_one_window`."""
    def run(q, k, v, left, right, heads, sink_logits):
        return _one_window(q, k, v, left, right, sinks, sm_scale, softcap, sink_logits, score_mod, heads,
                           first_batch, dropout)

    return by_window(q, k, v, windows, sink_logits, run)


def sliding_window_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, sinks: int = 0,
                             scale: float | None = None, softcap: float | None = None,
                             sink_logits: torch.Tensor | None = None, score_mod: ScoreMod | None = None,
                             cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                             dropout_p: float = 0.0, return_lse: bool = False):
    """Sliding-window softmax attention computed in the dtype of the inputs.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); ``window`` an int, a pair
    (left, right) or an int tensor (Hq, 2); ``sink_logits`` (Hq,). Returns out
    (B, Hq, Nq, Dv) [, lse (B, Hq, Nq)]. A row that sees no key has out 0, lse -inf.
    Packed sequences (B = 1, ``cu_seqlens_q/k`` (S + 1,)) are run one at a time, each
    with its own window positions and sinks. With ``dropout_p`` > 0 the probabilities are
    dropped by the kernel's mask for the same generator state (attnkit.dropout).
    """
    sm_scale = check_scale(scale, q.shape[-1])
    Hq = q.shape[1]
    windows = head_windows(window, Hq)
    score_mod = sliding_window_score_mod(q, k, score_mod, cu_seqlens_q, cu_seqlens_k)
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    options = {"windows": windows, "sinks": sinks, "sm_scale": sm_scale, "softcap": softcap, "sink_logits": sink_logits,
                   "score_mod": score_mod, "dropout": Dropout.draw(dropout_p, q.device)}
    if cu_seqlens_q is not None:

        out, lse = map_sequences(lambda q_s, k_s, v_s, seq: _windowed(q_s, k_s, v_s, first_batch=seq, **options),
                                 q, k, v, cu_seqlens_q, cu_seqlens_k)
    else:
        out, lse = _windowed(q, k, v, **options)
    lse = lse.to(lse_dtype(q))
    return (out, lse) if return_lse else out
