"""PyTorch reference of linear and lightning attention (the specification).

Per head, with decay rate s >= 0 (lambda = exp(-s); no decay: s = 0) and scale c:

    S_t = lambda S_{t-1} + k_t^T v_t          (S_0 = initial_state, (D, Dv))
    o_t = c q_t S_t

Three equal forms are written out below, all computing in the dtype they are given:

* :func:`recurrent_form` - the recurrence itself, one token at a time;
* :func:`parallel_form`  - O = c ((Q K^T) * M) V + c (lambda^(t+1) Q) S_0 with
  M_ts = lambda^(t-s) for t >= s: an N x N matrix, for short sequences only;
* :func:`chunked_form`   - the parallel form inside chunks of C rows and the
  recurrence between them (Lightning Attention-2): memory O(N (D + Dv) + C^2 + D Dv).

:func:`linear_reference` (the ``linear`` variant) applies the feature map, the GQA
head mapping and the normalization around them; :func:`lightning_reference` is the
``lightning`` variant (scale 1, decay = slopes). A packed batch (``cu_seqlens``) is
each sequence through the same reference, with its own state row, concatenated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._reference import expand_kv_heads, map_sequences
from ..checks import check_scale
from . import feature_maps

#: added to the normalizer phi(q_t) . z_t when ``normalize=True``
NORMALIZE_EPS = 1e-6
#: rows per chunk of the reference's chunked form (a sequence this short is one parallel block)
REFERENCE_CHUNK = 128

Core = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _rates(slopes: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Decay rates s as (1, H, 1, 1) in like's dtype (zeros without decay)."""
    if slopes is None:
        return torch.zeros(1, like.shape[1], 1, 1, dtype=like.dtype, device=like.device)
    return slopes.to(like.dtype).view(1, -1, 1, 1)


def _zero_state(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])


def recurrent_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                   state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, D), v (B, H, N, Dv), slopes (H,) or None, state (B, H, D, Dv) or None
    -> out (B, H, N, Dv), final state (B, H, D, Dv). One token at a time."""
    lam = torch.exp(-_rates(slopes, q))
    S = _zero_state(q, v) if state is None else state
    outs = []
    for t in range(q.shape[2]):
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def parallel_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`recurrent_form`, computed with the N x N decay mask
    M_ts = lambda^(t-s) (t >= s). Memory O(N^2): short sequences (one chunk) only."""
    s = _rates(slopes, q)
    n = q.shape[2]
    pos = torch.arange(n, device=q.device, dtype=q.dtype)
    dist = pos[:, None] - pos[None, :]                                     # t - s
    mask = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=q.dtype,
                                                                                 device=q.device))
    out = scale * torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * mask, v)
    k_to_end = k * torch.exp(-s * (n - 1 - pos)[:, None])                  # lambda^(N-1-s) k_s
    final = torch.matmul(k_to_end.transpose(-1, -2), v)
    if state is not None:
        out = out + scale * torch.matmul(q * torch.exp(-s * (pos + 1)[:, None]), state)
        final = final + torch.exp(-s * n) * state
    return out, final


def chunked_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                 state: torch.Tensor | None = None, chunk: int = REFERENCE_CHUNK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`recurrent_form`: the parallel form on chunks of ``chunk``
    rows, the state carried from chunk to chunk. Memory O(N (D + Dv) + chunk^2 + D Dv)."""
    outs = []
    # split (not range over N) keeps N symbolic under torch.compile: only the number of chunks is
    # fixed when tracing. N = 0 still gives one (empty) chunk: out (B, H, 0, Dv), and the state
    # passes through unchanged.
    for q_c, k_c, v_c in zip(q.split(chunk, dim=2), k.split(chunk, dim=2), v.split(chunk, dim=2)):
        out, state = parallel_form(q_c, k_c, v_c, slopes, scale, state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def reference_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                   state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal core of the reference: q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv)."""
    heads = q.shape[1]
    return chunked_form(q, expand_kv_heads(k, heads), expand_kv_heads(v, heads), slopes, scale, state)


def noncausal_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   state: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None = None,
                   cu_seqlens_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """O = scale Q (S_0 + K^T V): q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).
    Shared by both backends (two GEMMs; there is nothing for a custom kernel to fuse).
    Packed (B = 1, ``cu_seqlens_q/k`` (S + 1,)): each sequence's queries read only its own
    keys and state row; state (S, Hq, D, Dv)."""
    if cu_seqlens_q is not None:
        return per_sequence(lambda q_s, k_s, v_s, s0: noncausal_core(q_s, k_s, v_s, scale, s0), q, k, v,
                            cu_seqlens_q, cu_seqlens_k, state)
    kv = expand_kv_heads(torch.matmul(k.transpose(-1, -2), v), q.shape[1])   # (B, Hq, D, Dv)
    if state is not None:
        kv = kv + state
    return scale * torch.matmul(q, kv), kv


def resolve_offsets(cu_seqlens: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                    cu_seqlens_k: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (cu_seqlens_q, cu_seqlens_k) of a call: flash-linear-attention's one ``cu_seqlens``
    stands for both (the variants' validate checks that any pair given with it equals it);
    (None, None) for an unpacked batch."""
    if cu_seqlens is None:
        return cu_seqlens_q, cu_seqlens_k
    return (cu_seqlens if cu_seqlens_q is None else cu_seqlens_q,
            cu_seqlens if cu_seqlens_k is None else cu_seqlens_k)


def per_sequence(fn: Core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, initial_state: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch as its sequences one by one, each with its own state row.

    q (1, Hq, Nq, D), k (1, Hkv, Nk, D), v (1, Hkv, Nk, Dv) at the (S + 1,) offsets
    ``cu_seqlens_q/k``; initial_state (S, Hq, F, Dv) or None. ``fn(q_s, k_s, v_s, s0) ->
    (out, state)`` runs one sequence with s0 (1, Hq, F, Dv) or None. Returns out
    (1, Hq, Nq, Dv) and the states (S, Hq, F, Dv).
    """
    def one(q_s, k_s, v_s, seq):
        out, state = fn(q_s, k_s, v_s, None if initial_state is None else initial_state[seq:seq + 1])
        return out, state.unsqueeze(2)    # map_sequences concatenates along dim 2: one slot per state

    out, states = map_sequences(one, q, k, v, cu_seqlens_q, cu_seqlens_k)
    return out, states[0].transpose(0, 1)


def run_linear(core: Core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               decay: torch.Tensor | None, scale: float | None, normalize: bool,
               feature_map: None | str | Callable, initial_state: torch.Tensor | None,
               return_state: bool, cu_seqlens_q: torch.Tensor | None = None,
               cu_seqlens_k: torch.Tensor | None = None):
    """Everything around the causal core, shared by the reference and the kernel path:
    feature map, normalization (a column of ones appended to v carries z), non-causal
    form, state dtypes. Inputs are validated already. A packed batch (``cu_seqlens_q/k``,
    equal when causal) reaches the causal core as ``core(..., cu_seqlens=cu_seqlens_q)``."""
    c = check_scale(scale, q.shape[-1])
    q, k = feature_maps.apply(feature_map, q, k)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dv = v.shape[-1]
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    rows = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    _check_mapped_state(initial_state, rows, q, v, normalize)
    if causal:
        packed = {} if cu_seqlens_q is None else {"cu_seqlens": cu_seqlens_q}
        out, state = core(q, k, v, decay, c, initial_state, **packed)
    else:
        out, state = noncausal_core(q, k, v, c, None if initial_state is None else initial_state.to(q.dtype),
                                    cu_seqlens_q, cu_seqlens_k)
    if normalize:
        out = out[..., :dv] / (out[..., dv:] + NORMALIZE_EPS)
    out = out.to(q.dtype)
    return (out, state.to(compute)) if return_state else out


def _check_mapped_state(state: torch.Tensor | None, rows: int, q: torch.Tensor, v: torch.Tensor,
                        normalize: bool) -> None:
    # The feature dim of a user callable is known only now. rows: B, or S packed sequences.
    if state is None:
        return
    want = (rows, q.shape[1], q.shape[-1], v.shape[-1])
    if tuple(state.shape) != want:
        extra = " (normalize=True adds one column holding z)" if normalize else ""
        raise ValueError(f"initial_state must have shape (B or S, Hq, F, Dv{' + 1' if normalize else ''}) = {want} "
                         f"for these inputs and feature map{extra}, got {tuple(state.shape)}")


def _reference_core_in_dtype(q, k, v, slopes, scale, state):
    return reference_core(q, k, v, slopes, scale, None if state is None else state.to(q.dtype))


def linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     decay: torch.Tensor | None = None, scale: float | None = None, normalize: bool = False,
                     feature_map=None, initial_state: torch.Tensor | None = None, return_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                     cu_seqlens_k: torch.Tensor | None = None):
    """Reference of :func:`attnkit.linear_attention` (same arguments, computed in q's dtype).

    q (B, Hq, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv) -> out (B, Hq, N, Dv)
    [, state (B, Hq, F, Dv) (Dv + 1 with normalize), float32 (float64 for float64 inputs)].
    Packed (B = 1, ``cu_seqlens`` or ``cu_seqlens_q/k`` (S + 1,)): sequence s is rows
    cu[s]:cu[s + 1] run alone with ``initial_state[s]``; outputs concatenated along N,
    states stacked (S, Hq, F, Dv).
    """
    options = {"causal": causal, "decay": decay, "scale": scale, "normalize": normalize, "feature_map": feature_map}
    cu_q, cu_k = resolve_offsets(cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    if cu_q is None:
        return run_linear(_reference_core_in_dtype, q, k, v, initial_state=initial_state,
                          return_state=return_state, **options)

    def alone(q_s, k_s, v_s, s0):
        return run_linear(_reference_core_in_dtype, q_s, k_s, v_s, initial_state=s0, return_state=True, **options)

    out, state = per_sequence(alone, q, k, v, cu_q, cu_k, initial_state)
    return (out, state) if return_state else out


def lightning_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, slopes: torch.Tensor,
                        initial_state: torch.Tensor | None = None, return_state: bool = False,
                        cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                        cu_seqlens_k: torch.Tensor | None = None):
    """Reference of :func:`attnkit.lightning_attention`: causal, scale 1, decay = slopes."""
    return linear_reference(q, k, v, causal=True, decay=slopes, scale=1.0, initial_state=initial_state,
                            return_state=return_state, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k)
