"""Caches that keep less than every key: per-head streaming caches and heavy-hitter eviction.

Both follow :class:`attnkit.SlidingWindowCache`'s protocol: build one, then each
``attend(q, k, v, ...)`` appends the new keys and values (B, Hkv, n, D) and returns the
attention of the n new queries (B, Hq, n, D) over what the cache keeps, causally;
``memory_bytes()`` reports the key and value storage held. Every call checks its inputs
before it changes anything.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import check_cache_entries, check_int, check_qkv
from ..dispatch import check_call
from ..sliding_window.cache import SlidingWindowCache


def check_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", **options: Any) -> None:
    """Check one step of a decode cache before the cache changes anything.

    q (B, Hq, n, D) are the n new queries, k (B, Hkv, n, D) and v (B, Hkv, n, Dv) their keys
    and values; ``options`` and ``backend`` are :func:`attnkit.decode_attention`'s. The decode
    call is checked on the new tokens alone, as if they were the whole cache, so every option
    the step's attention would refuse is refused here, before a key is stored. Whether the new
    tokens match what the cache already stores is each cache's check (``check_cache_entries``).
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same new tokens: q has {q.shape[2]}, k has {k.shape[2]}")
    check_call(q, k, v, "decode", backend, **options)


class GrowingKV:
    """Keys (B, Hkv, slots, D) and values (B, Hkv, slots, Dv) of every token seen, in buffers
    that double when full (appending one token is amortized O(1) copies). Stored detached:
    the caches are for inference."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.seen = 0

    def check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New k (B, Hkv, n, D), v (B, Hkv, n, Dv) against what is stored."""
        check_cache_entries(k, v, self.keys, self.values)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store n new tokens (checked with :meth:`check` first)."""
        n = k.shape[2]
        if self.keys is None:
            self.keys = k.new_empty(k.shape[:2] + (max(16, n),) + k.shape[3:])
            self.values = v.new_empty(v.shape[:2] + (max(16, n),) + v.shape[3:])
        if self.seen + n > self.keys.shape[2]:
            size = max(2 * self.keys.shape[2], self.seen + n)

            def grow(x: torch.Tensor) -> torch.Tensor:
                fresh = x.new_empty(x.shape[:2] + (size,) + x.shape[3:])
                fresh[:, :, :self.seen] = x[:, :, :self.seen]
                return fresh

            self.keys, self.values = grow(self.keys), grow(self.values)
        self.keys[:, :, self.seen:self.seen + n] = k.detach()
        self.values[:, :, self.seen:self.seen + n] = v.detach()
        self.seen += n

    def memory_bytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def decode(self, q: torch.Tensor, **options: Any):
        """:func:`attnkit.decode_attention` of q (B, Hq, n, D) over every stored token (the n
        newest are q's own)."""
        from . import decode_attention

        lengths = torch.full((q.shape[0],), self.seen, dtype=torch.int32, device=q.device)
        return decode_attention(q, self.keys, self.values, lengths, **options)


class StreamingHeadsCache:
    """Retrieval heads keep every key; streaming heads keep the sinks and the last ``window`` keys
    (DuoAttention, Xiao et al., 2024, https://arxiv.org/abs/2410.10819; MoA; RazorAttention).

    Memory is the sum over heads of what each keeps — not Hkv times the longest head.
    Decoding through the cache equals :func:`attnkit.sliding_window_attention` with the
    per-head windows it stands for: ``(-1, 0)`` for a retrieval head's query heads and
    ``(window - 1, 0)`` with ``sinks`` for a streaming head's.

    Args:
        full_heads: bool tensor (Hkv,): True for a retrieval (full) kv head.
        window: W >= 1 keys a streaming head keeps (the newest included).
        sinks: S >= 0 first keys a streaming head keeps forever.

    ``attend(q, k, v, *, scale=None, softcap=None, sink_logits=None, return_lse=False,
    backend="auto")``: q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv).
    """

    def __init__(self, full_heads: torch.Tensor, window: int, sinks: int = 0):
        if not isinstance(full_heads, torch.Tensor) or full_heads.dtype != torch.bool or full_heads.dim() != 1:
            raise TypeError(f"full_heads must be a bool tensor (Hkv,), got "
                            f"{getattr(full_heads, 'dtype', type(full_heads).__name__)}")
        self.window = check_int("window", window, minimum=1)
        self.sinks = check_int("sinks", sinks, minimum=0)
        self.full_heads = full_heads.cpu()
        self.full = GrowingKV()
        self.streaming = SlidingWindowCache(self.window, self.sinks)
        self.seen = 0

    def memory_bytes(self) -> int:
        return self.full.memory_bytes() + self.streaming.memory_bytes

    def per_head_windows(self, heads_q: int) -> torch.Tensor:
        """The (Hq, 2) windows of :func:`attnkit.sliding_window_attention` this cache equals."""
        groups = heads_q // self.full_heads.numel()
        full = self.full_heads.repeat_interleave(groups)
        return torch.where(full[:, None], torch.tensor([-1, 0]), torch.tensor([self.window - 1, 0]))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               softcap: float | None = None, sink_logits: torch.Tensor | None = None,
               return_lse: bool = False, backend: str = "auto"):
        options = {"scale": scale, "softcap": softcap, "sink_logits": sink_logits, "return_lse": return_lse,
                  "backend": backend}
        check_step(q, k, v, **options)
        Hq, Hkv = q.shape[1], k.shape[1]
        if Hkv != self.full_heads.numel():
            raise ValueError(f"k has {Hkv} kv heads but full_heads names {self.full_heads.numel()}")
        full_kv = self.full_heads.nonzero().flatten().tolist()
        stream_kv = (~self.full_heads).nonzero().flatten().tolist()
        groups = Hq // Hkv

        def query_heads(kv_heads):
            return torch.tensor([h * groups + g for h in kv_heads for g in range(groups)], dtype=torch.long)

        parts = []
        if full_kv:
            self.full.check(k[:, full_kv], v[:, full_kv])
        if stream_kv:
            self.streaming._check_buffers(k[:, stream_kv], v[:, stream_kv])
        # inputs checked: now write and attend
        out = q.new_empty(q.shape[:3] + (v.shape[-1],))
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
        for kv_heads, run in ((full_kv, "full"), (stream_kv, "streaming")):
            if not kv_heads:
                continue
            heads = query_heads(kv_heads).to(q.device)
            index = torch.tensor(kv_heads, device=q.device)
            q_part, k_part, v_part = q.index_select(1, heads), k.index_select(1, index), v.index_select(1, index)
            part_options = dict(options, sink_logits=None if sink_logits is None else sink_logits[heads])
            if run == "full":
                self.full.append(k_part, v_part)
                result = self.full.decode(q_part, **part_options)
            else:
                result = self.streaming.attend(q_part, k_part, v_part, **part_options)
            parts.append((heads, result))
        for heads, result in parts:
            o = result[0] if return_lse else result
            out[:, heads] = o
            if return_lse:
                lse[:, heads] = result[1]
        self.seen += q.shape[2]
        return (out, lse) if return_lse else out


class HeavyHitterCache:
    """H2O's eviction (Zhang et al., 2023, https://arxiv.org/abs/2306.14048): per (sequence, kv
    head), keep the ``recent`` newest keys plus the ``budget - recent`` older keys with the
    largest accumulated attention (the key scores of every call so far, summed over the
    query heads of the group).

    Attention in a call runs over the keys kept before it plus the new ones (causally among
    the new ones), then the cache evicts down to ``budget`` keys: memory is bounded by
    ``budget`` keys per head. Positions between kept keys are gone, so position-dependent
    score mods (ALiBi) do not apply; scale, softcap and sink logits do.

    Args:
        budget: keys kept per (sequence, kv head) after each call (>= 1).
        recent: the newest keys always kept (0 <= recent <= budget).

    ``attend(q, k, v, *, scale=None, softcap=None, sink_logits=None, return_lse=False,
    backend="auto")``: q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> (B, Hq, n, Dv).
    ``positions`` (B, Hkv, kept) and ``scores`` (B, Hkv, kept) say which keys are kept.
    """

    def __init__(self, budget: int, recent: int = 0):
        self.budget = check_int("budget", budget, minimum=1)
        self.recent = check_int("recent", recent, minimum=0)
        if recent > budget:
            raise ValueError(f"recent ({recent}) must be <= budget ({budget})")
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.seen = 0

    def memory_bytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
               softcap: float | None = None, sink_logits: torch.Tensor | None = None,
               return_lse: bool = False, backend: str = "auto"):
        from . import decode_attention

        check_step(q, k, v, scale=scale, softcap=softcap, sink_logits=sink_logits, return_lse=return_lse,
                   backend=backend)
        check_cache_entries(k, v, self.keys, self.values)
        B, Hq, n, _ = q.shape
        Hkv = k.shape[1]
        new_pos = torch.arange(self.seen, self.seen + n, device=q.device).expand(B, Hkv, n)
        if self.keys is None:
            keys, values, positions = k.detach(), v.detach(), new_pos
            scores = torch.zeros(B, Hkv, n, dtype=torch.float32, device=q.device)
        else:
            keys = torch.cat([self.keys, k.detach()], dim=2)
            values = torch.cat([self.values, v.detach()], dim=2)
            positions = torch.cat([self.positions, new_pos], dim=2)
            scores = torch.cat([self.scores, torch.zeros(B, Hkv, n, dtype=torch.float32, device=q.device)], dim=2)
        lengths = torch.full((B,), keys.shape[2], dtype=torch.int32, device=q.device)
        result = decode_attention(q, keys, values, lengths, scale=scale, softcap=softcap, sink_logits=sink_logits,
                                  return_lse=return_lse, return_key_scores=True, backend=backend)
        key_scores = result[-1].float()                                          # (B, Hq, kept + n)
        scores = scores + key_scores.view(B, Hkv, Hq // Hkv, -1).sum(dim=2)
        self._evict(keys, values, positions, scores)
        self.seen += n
        return result[:-1] if return_lse else result[0]

    def _evict(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor) -> None:
        total = keys.shape[2]
        if total > self.budget:
            older = total - self.recent                                        # keys are in position order
            ranked = torch.sort(-scores[..., :older], dim=-1, stable=True).indices[..., :self.budget - self.recent]
            recent = torch.arange(older, total, device=keys.device).expand(*keys.shape[:2], self.recent)
            keep = torch.sort(torch.cat([ranked, recent], dim=-1), dim=-1).values   # back in position order
            keys = keys.gather(2, keep[..., None].expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[-1]))
            positions, scores = positions.gather(2, keep), scores.gather(2, keep)
        self.keys, self.values, self.positions, self.scores = keys, values, positions, scores
