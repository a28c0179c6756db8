"""The torch backend of ``linear`` and ``lightning`` (``backend="torch"``).

Lightning Attention-2's chunked form in batched matmuls: the sequence is cut into
chunks of :data:`CHUNK` rows and every chunk's intra-chunk product (Q K^T masked by
the decay) V, its contribution to the state and its queries' read of the incoming
state are computed for all chunks, batch entries and heads at once; only the
recurrence of the (F x Dv) states from chunk to chunk is a loop (one small
multiply-add per chunk index). States and products are float32 (float64 for float64
inputs). Packed batches (``cu_seqlens``) are cut per sequence, so the decay and the
state restart at each sequence, and run in the same few calls as an unpacked batch.
Everything around the causal core (feature maps, normalization, the non-causal form)
is :func:`attnkit.linear.reference.run_linear`, shared with the other backends.
Gradients come from autograd through these pieces (to q, k, v, the decay and the
initial state).
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad

from .._reference import expand_kv_heads
from .reference import resolve_offsets, run_linear

#: rows per chunk: the intra-chunk work grows with it, the number of (small) state
#: steps and their Python overhead shrink with it
CHUNK = 64


def chunk_layout(lengths: list[int], chunk: int) -> tuple[list[int], list[int]]:
    """Per sequence: its first chunk in the flat chunk list and its number of chunks."""
    first, counts, total = [], [], 0
    for n in lengths:
        first.append(total)
        counts.append(-(-n // chunk))
        total += counts[-1]
    return first, counts


def to_chunks(x: torch.Tensor, lengths: list[int], chunk: int) -> torch.Tensor:
    """Tokens (H, Ntot, E) of sequences of ``lengths`` laid end to end -> (H, T, chunk, E):
    each sequence cut into chunks, its last one padded with zeros."""
    H, total, E = x.shape
    if all(n % chunk == 0 for n in lengths):  # nothing to pad
        return x.reshape(H, total // chunk, chunk, E)
    index, start = [], 0
    for n in lengths:
        padded = -(-n // chunk) * chunk
        index.extend(range(start, start + n))
        index.extend([total] * (padded - n))  # the zero row appended below
        start += n
    padded_x = torch.cat([x, x.new_zeros(H, 1, E)], dim=1)
    gathered = padded_x.index_select(1, torch.tensor(index, dtype=torch.long, device=x.device))
    return gathered.view(H, -1, chunk, E)


def from_chunks(y: torch.Tensor, lengths: list[int], chunk: int) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: (H, T, chunk, E) -> (H, Ntot, E), the padding dropped."""
    H, T, _, E = y.shape
    flat = y.reshape(H, T * chunk, E)
    if all(n % chunk == 0 for n in lengths):
        return flat
    index, start = [], 0
    for n in lengths:
        index.extend(range(start, start + n))
        start += -(-n // chunk) * chunk
    return flat.index_select(1, torch.tensor(index, dtype=torch.long, device=y.device))


def chunked_linear_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
                         scale: float, initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None,
                         chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention, S_t = exp(-s_h) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    q (B, Hq, N, F), k (B, Hkv, N, F), v (B, Hkv, N, Dv); slopes (Hq,) decay rates or
    None; initial_state (B, Hq, F, Dv) or None. Returns out (B, Hq, N, Dv) and the final
    state (B, Hq, F, Dv), both float32 (float64 for float64 inputs). With ``cu_seqlens``
    (S + 1,) (B = 1, S sequences packed along N) each sequence runs alone: initial_state
    and the returned state are (S, Hq, F, Dv). The contract of the reference's causal core.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, N, F = q.shape
    Dv = v.shape[-1]
    dev = q.device
    k, v = expand_kv_heads(k, Hq), expand_kv_heads(v, Hq)
    q, k, v = (x.to(compute) for x in (q, k, v))
    # chunks (P, Hq, T, C, E): an unpacked batch is (B, Hq, N / C chunks) as it lies (the
    # last chunk padded); a packed one (1, Hq, all sequences' chunks), cut per sequence
    if cu_seqlens is None:
        lengths = [N] * B
        T = -(-N // chunk)
        # (reshape: q, k, v may be strided views, e.g. layout="bshd")
        qc, kc, vc = ((x if T * chunk == N else pad(x, (0, 0, 0, T * chunk - N))).reshape(B, Hq, T, chunk, x.shape[-1])
                      for x in (q, k, v))
        valid = torch.tensor([min(chunk, N - j * chunk) for j in range(T)], dtype=compute, device=dev)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        qc, kc, vc = (to_chunks(x[0], lengths, chunk).unsqueeze(0) for x in (q, k, v))
        T = qc.shape[2]
        valid = torch.tensor([min(chunk, n - j * chunk) for n in lengths for j in range(-(-n // chunk))],
                             dtype=compute, device=dev)
    valid = valid.view(1, 1, T, 1, 1)                                      # rows of each chunk
    pos = torch.arange(chunk, dtype=compute, device=dev)
    dist = pos[:, None] - pos[None, :]                                     # t - s in the chunk
    causal = dist >= 0
    zero = torch.zeros((), dtype=compute, device=dev)
    if slopes is None:
        intra_mask = causal.to(compute)                                    # (C, C)
        q_decay = k_weight = chunk_decay = None
    else:
        rate = slopes.to(compute).view(1, Hq, 1, 1, 1)
        intra_mask = torch.where(causal, torch.exp(-rate * dist.clamp(min=0)), zero)   # (1, Hq, 1, C, C)
        q_decay = torch.exp(-rate * (pos + 1).view(chunk, 1))             # lambda^(t+1) (1, Hq, 1, C, 1)
        to_end = valid - 1 - pos.view(chunk, 1)                            # n_c - 1 - s (1, 1, T, C, 1)
        # lambda^(n_c - 1 - s); padded rows (negative exponent) hold zero keys: weight 0, never inf * 0
        k_weight = torch.where(to_end >= 0, torch.exp(-rate * to_end.clamp(min=0)), zero)
        chunk_decay = torch.exp(-rate * valid)                             # lambda^(n_c) (1, Hq, T, 1, 1)
    intra = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * intra_mask, vc)
    kv = torch.matmul((kc if k_weight is None else kc * k_weight).transpose(-1, -2), vc)   # (P, Hq, T, F, Dv)
    state = (torch.zeros(len(lengths), Hq, F, Dv, dtype=compute, device=dev) if initial_state is None
             else initial_state.to(compute))
    if cu_seqlens is None:  # every row has T chunks: the state of each chunk index in one step
        incoming = []
        for j in range(T):
            incoming.append(state)
            # one fused op per step (each step is a parallel region: fewer of them, less waiting)
            if chunk_decay is None:
                state = kv[:, :, j] + state
            else:
                state = torch.addcmul(kv[:, :, j], chunk_decay[:, :, j], state)
        final = state
        s_in = torch.stack(incoming, dim=2) if T else None                 # (B, Hq, T, F, Dv)
    else:
        s_in, final = _packed_states(kv[0], None if chunk_decay is None else chunk_decay[0], state, lengths, chunk)
        s_in = s_in.unsqueeze(0) if s_in is not None else None
    if s_in is not None:
        reader = qc if q_decay is None else qc * q_decay
        out_c = (intra + torch.matmul(reader, s_in)) * scale
    else:
        out_c = intra * scale
    if cu_seqlens is None:
        out = out_c.view(B, Hq, T * chunk, Dv)[:, :, :N]
    else:
        out = from_chunks(out_c[0], lengths, chunk).unsqueeze(0)          # (1, Hq, N, Dv)
    return out, final


def _packed_states(kv: torch.Tensor, chunk_decay: torch.Tensor | None, state: torch.Tensor, lengths: list[int],
                   chunk: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The states entering each chunk of packed sequences, and their final states.

    kv (Hq, T, F, Dv) each chunk's contribution, chunk_decay (Hq, T, 1, 1) or None, state
    (S, Hq, F, Dv) the initial ones -> (Hq, T, F, Dv) (None when T = 0), (S, Hq, F, Dv). The
    recurrence runs over chunk indices, all sequences at once: sorted by their number of
    chunks (longest first), the ones still running are a prefix that shrinks.
    """
    dev = kv.device
    rows = len(lengths)
    first, counts = chunk_layout(lengths, chunk)
    T = kv.shape[1]
    order = sorted(range(rows), key=lambda s: -counts[s])
    state = state.transpose(0, 1)[:, torch.tensor(order, dtype=torch.long, device=dev)]   # (Hq, rows, F, Dv)
    incoming, incoming_ids, finals = [], [], []
    active = rows
    for j in range(max(counts, default=0) + 1):
        still = sum(1 for s in order if counts[s] > j)
        if still < active:  # sequences whose last chunk was j - 1: their state is final
            finals.append(state[:, still:active])
            state = state[:, :still]
            active = still
        if active == 0:
            break
        ids = torch.tensor([first[s] + j for s in order[:active]], dtype=torch.long, device=dev)
        incoming.append(state)
        incoming_ids.append(ids)
        step = kv.index_select(1, ids)
        state = step + (state if chunk_decay is None else chunk_decay.index_select(1, ids) * state)
    finals.reverse()  # shortest sequences finished first: back to the sorted order
    unsort = torch.empty(rows, dtype=torch.long)
    unsort[torch.tensor(order, dtype=torch.long)] = torch.arange(rows)
    final = torch.cat(finals, dim=1)[:, unsort.to(dev)].transpose(0, 1)    # (rows, Hq, F, Dv)
    if not T:
        return None, final
    ids = torch.cat(incoming_ids)
    back = torch.empty_like(ids)
    back[ids] = torch.arange(T, device=dev)
    return torch.cat(incoming, dim=1)[:, back], final                       # chunk order


def linear_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                 decay: torch.Tensor | None = None, scale: float | None = None, normalize: bool = False,
                 feature_map=None, initial_state: torch.Tensor | None = None, return_state: bool = False,
                 cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                 cu_seqlens_k: torch.Tensor | None = None):
    """The torch path of :func:`attnkit.linear_attention` (same arguments, no dispatch):
    q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) -> out (B, Hq, N, Dv) in q's dtype
    [, state (B or S, Hq, F, Dv[+1]) float32]. The causal core is :func:`chunked_linear_torch`;
    the non-causal form is two GEMMs on every backend."""
    cu_q, cu_k = resolve_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    return run_linear(chunked_linear_torch, q, k, v, causal=causal, decay=decay, scale=scale, normalize=normalize,
                      feature_map=feature_map, initial_state=initial_state, return_state=return_state,
                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def lightning_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, slopes: torch.Tensor,
                    initial_state: torch.Tensor | None = None, return_state: bool = False,
                    cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None):
    """The torch path of :func:`attnkit.lightning_attention`: causal, scale 1, decay = slopes."""
    return linear_torch(q, k, v, causal=True, decay=slopes, scale=1.0, initial_state=initial_state,
                        return_state=return_state, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                        cu_seqlens_k=cu_seqlens_k)
