"""DeepSpeed-Ulysses: all-to-all from sequence shards to head shards.

Each rank holds (B, H, N/W, D) in the contiguous layout. One all-to-all per tensor
turns that into (B, H/W, N, D): a slice of the heads over the *whole* sequence, so
any registered variant runs unchanged on it (flash, sliding-window, 1-D
neighborhood, block-sparse, ...), and one all-to-all brings the output back to
sequence shards. Communication per rank: 4 all-to-alls of its shard (q, k, v, out),
a volume that does not grow with W; it needs H divisible by W.
"""

from __future__ import annotations

from typing import Any

import torch

from .._reference import expand_kv_heads
from ..checks import Shapes, check_qkv
from ..dispatch import attention, split_outputs
from ..registry import get_variant
from ._comm import AllToAll, Field, agree, input_fields, world


def _seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    return AllToAll.apply(x, 1, 2, group, size)    # (B, H, N/W, ...) -> (B, H/W, N, ...)


def _heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    return AllToAll.apply(x, 2, 1, group, size)    # (B, H/W, N, ...) -> (B, H, N/W, ...)


def _stand_ins(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes: Shapes):
    """q, k, v of the given sizes with the inputs' dtype and device, for a variant's
    validator (expanded from one element: no memory, no values read)."""
    B, Hq, Hkv, Nq, Nk, D, Dv = shapes
    return q.new_zeros(()).expand(B, Hq, Nq, D), k.new_zeros(()).expand(B, Hkv, Nk, D), \
        v.new_zeros(()).expand(B, Hkv, Nk, Dv)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None, variant: str = "flash",
                      **options: Any):
    """Run any registered attention variant on a sequence sharded across ranks.

    Args:
        q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D), v: (B, Hkv, N/W, Dv): this rank's
            shards in the **contiguous** layout (rank r holds tokens [r N/W, (r+1) N/W)),
            the same shapes and dtype on every rank. Hq must be divisible by W; when
            Hkv is not, K/V are expanded to Hq heads before the exchange.
        group: the process group (None: the default group; without torch.distributed
            initialized, one rank: a plain ``attnkit.attention`` call).
        variant: any registered variant name ("flash", "sliding_window", ...).
        **options: the variant's options, plus ``backend`` ("auto", "triton",
            "reference"). Tensor options whose first dimension is Hq (per-head
            parameters such as ``sink_logits`` or a per-head ``window`` tensor) are cut
            to the heads this rank runs; other options go through unchanged. Packed
            batches (``cu_seqlens_*``) are not supported.

    Returns:
        out (B, Hq, N/W, Dv) in q's dtype, this rank's sequence shard; with
        ``return_lse=True`` also lse (B, Hq, N/W). Differentiable (the backward runs
        the inverse all-to-alls).

    Raises:
        ValueError/TypeError on every rank, before any transfer, when a rank's input is
        invalid (the variant's own checks, run on the whole problem and on the heads this
        rank will run; the message names the rank) or when the ranks' shapes, dtypes,
        variant, backend or options differ (it lists every rank's value).
    """
    backend = options.pop("backend", "auto")
    rank, size = world(group)
    if size == 1:
        return attention(q, k, v, variant, backend, **options)

    def check():                # this rank's arguments; agree() makes every rank raise if one fails
        spec = get_variant(variant)
        shapes = check_qkv(q, k, v)
        packed = [name for name, value in options.items()
                  if name.startswith("cu_seqlens") and isinstance(value, torch.Tensor)]
        if packed:
            raise ValueError(f"ulysses_attention does not take packed batches ({packed[0]}): shard each sequence")
        resolved = spec.resolve_options(options)
        whole = shapes._replace(seqlen_q=shapes.seqlen_q * size, seqlen_k=shapes.seqlen_k * size)
        spec.validate(*_stand_ins(q, k, v, whole), resolved)       # the whole problem, as the user posed it
        if shapes.heads_q % size != 0:
            raise ValueError(f"ulysses_attention needs the number of query heads ({shapes.heads_q}) to be "
                             f"divisible by the world size ({size}); use ring_attention, or a group of a size "
                             "that divides it")
        wanted = [flag for flag in spec.extra_outputs if resolved.get(flag)]
        if any(flag != "return_lse" for flag in wanted):
            raise ValueError(f"ulysses_attention returns the output and the LSE only; options {wanted} ask for more")
        heads = shapes.heads_q // size
        local_options = {}
        for name, value in options.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == shapes.heads_q:
                value = value[rank * heads:(rank + 1) * heads]
            local_options[name] = value
        # What this rank will run after the exchange: checked now, so that no rank fails
        # between the all-to-alls and leaves the others waiting.
        heads_kv = shapes.heads_kv // size if shapes.heads_kv % size == 0 else heads
        local = whole._replace(heads_q=heads, heads_kv=heads_kv)
        spec.validate(*_stand_ins(q, k, v, local), spec.resolve_options(local_options))
        sizes = (shapes.batch, shapes.heads_q, shapes.heads_kv, shapes.seqlen_q, shapes.seqlen_k, shapes.head_dim,
                 shapes.head_dim_v)
        fields = input_fields("the shapes of q, k and v (B, Hq, Hkv, N/W, Nk/W, D, Dv)", sizes, "q, k and v", q)
        fields += [Field("variant", spec.name), Field("backend", backend)]
        fields += [Field(name, value) for name, value in resolved.items()]
        return (spec, resolved, local_options), fields

    spec, resolved, local_options = agree("ulysses_attention", check, group, size)
    if k.shape[1] % size != 0:
        k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    qh, kh, vh = (_seq_to_heads(t, group, size) for t in (q, k, v))
    result = attention(qh, kh, vh, spec.name, backend, **local_options)
    out, extras = split_outputs(spec, result, resolved)
    out = _heads_to_seq(out, group, size)
    if "lse" in extras:
        return out, _heads_to_seq(extras["lse"].unsqueeze(-1), group, size).squeeze(-1)
    return out
