"""The library of score and mask mods (``attnkit.mods``).

Each constructor returns a :class:`ScoreMod` or :class:`MaskMod` whose kernel lives in
``attnkit.kernels.mods`` (named by import path, so building a mod imports no triton)
and whose PyTorch reference is written here. A library mod keeps the user's tensors
as given; at call time its ``specialize`` checks them against the problem, makes them
contiguous (a no-op for the usual parameters, and part of the current autograd graph
otherwise) and adds a small int32 ``META`` tensor with the sizes its kernel needs,
built on the call's device and cached.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple, Union

import torch

from .core import MaskMod, Problem, ScoreMod

_K = "attnkit.kernels.mods:"
_META: Dict[Tuple, torch.Tensor] = {}


def _meta(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A cached int32 tensor of ``values`` on ``device`` (no host-to-device copy per call)."""
    key = (tuple(int(v) for v in values), str(device))
    if key not in _META:
        _META[key] = torch.tensor(key[0], dtype=torch.int32, device=device)
    return _META[key]


def _float_tensor(owner: str, name: str, x: object, dims: Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be a floating tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: {name} must be a floating tensor, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{owner}: {name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    return x


def _int_tensor(owner: str, name: str, x: object, dims: Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be an integer tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be an integer tensor, got {x.dtype}")
    if x.dim() not in dims:
        raise ValueError(f"{owner}: {name} must have {' or '.join(map(str, dims))} dims, got shape {tuple(x.shape)}")
    return x


def _batch_rows(owner: str, name: str, rows: int, problem: Problem) -> int:
    """Batch stride factor: 0 when one row is shared by every batch entry, 1 for one row per entry."""
    if rows == 1:
        return 0
    if rows != problem.batch:
        raise ValueError(f"{owner}: {name} has {rows} batch rows but the call has batch {problem.batch} "
                         "(a packed batch counts sequences); use 1 row to share it")
    return 1


def _gather_rows(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row b of x, or row 0 when x has a single (shared) row."""
    return b.clamp(max=x.shape[0] - 1)


# ----------------------------------------------------------------------------- ALiBi

def _alibi_reference(score, b, h, q_idx, kv_idx, slopes, meta):
    slope = slopes[_gather_rows(slopes, b), h].to(score.dtype)
    return score - slope * (q_idx - kv_idx).abs().to(score.dtype)


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi (Press et al., 2022, https://arxiv.org/abs/2108.12409): a linear distance penalty.

    ``score - slope[b, h] * |q_idx - kv_idx|``, FlashAttention's ``alibi_slopes``
    convention (bottom-right positions, so decoding with Nq < Nk is right).

    Args:
        slopes: (Hq,) or (B, Hq) floating (computed in float32); may require grad.
            :func:`alibi_slopes` gives the paper's geometric slopes.

    Example::

        mod = attnkit.mods.alibi(attnkit.mods.alibi_slopes(16).cuda())
        out = attnkit.flash_attention(q, k, v, causal=True, score_mod=mod)
    """
    owner = "alibi"
    _float_tensor(owner, "slopes", slopes, (1, 2))

    def specialize(p: Problem) -> ScoreMod:
        if slopes.shape[-1] != p.heads_q:
            raise ValueError(f"alibi: slopes has {slopes.shape[-1]} heads but q has {p.heads_q}; slopes must be "
                             f"({p.heads_q},) or (B, {p.heads_q})")
        table = (slopes if slopes.dim() == 2 else slopes[None]).contiguous()  # (B or 1, Hq); Hq may be 0
        shared = _batch_rows(owner, "slopes", table.shape[0], p)
        return ScoreMod(_K + "alibi_score", _alibi_reference, name=owner, tensors=(table, _meta([shared * p.heads_q],
                                                                                                 p.device)),
                        tensor_grads=_K + "alibi_grads")

    return ScoreMod(_K + "alibi_score", _alibi_reference, tensors=(slopes,), name=owner,
                    tensor_grads=_K + "alibi_grads", specialize=specialize)


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes for ``heads`` heads, float32 (Hq,): a geometric sequence
    starting at 2^(-8/n) for the closest power of two n, interleaved beyond it."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {heads!r}")

    def power_of_two(n: int):
        start = 2 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(heads)))
    values = power_of_two(closest)
    if closest < heads:
        values += power_of_two(2 * closest)[0::2][:heads - closest]
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- T5 relative position bias

def t5_bucket(relative_position: torch.Tensor, *, num_buckets: int = 32, max_distance: int = 128,
              bidirectional: bool = True) -> torch.Tensor:
    """T5's bucket of ``relative_position = kv_idx - q_idx`` (int tensor), exactly as T5
    computes it: half the buckets per direction when bidirectional; within a direction
    the first half exact, the rest logarithmic up to ``max_distance`` (float32), clamped."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(relative_position.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def relative_position_bias(table: torch.Tensor, *, num_buckets: int = 32, max_distance: int = 128,
                           bidirectional: bool = True) -> ScoreMod:
    """T5's relative position bias (Raffel et al., 2020, https://arxiv.org/abs/1910.10683).

    ``score + table[h, bucket(kv_idx - q_idx)]`` with T5's bucketing (:func:`t5_bucket`).
    A decoder uses ``bidirectional=False`` (with a causal mask).

    Args:
        table: (Hq, num_buckets) floating; learnable (its gradient comes from the Triton
            backward, one atomic add per attended pair).
        num_buckets, max_distance, bidirectional: T5's bucketing parameters.

    Example::

        table = torch.nn.Parameter(torch.zeros(8, 32, device="cuda"))
        out = attnkit.flex_attention(q, k, v, score_mod=attnkit.mods.relative_position_bias(table))
    """
    owner = "relative_position_bias"
    for name, val in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{owner}: {name} must be an int, got {type(val).__name__}")
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    if per_direction < 2:
        raise ValueError(f"{owner}: num_buckets={num_buckets} leaves {per_direction} bucket(s) per direction; "
                         "it needs at least 2 (4 when bidirectional)")
    if max_distance <= per_direction // 2:
        raise ValueError(f"{owner}: max_distance must exceed the exact range {per_direction // 2}, got {max_distance}")
    _float_tensor(owner, "table", table, (2,))
    if table.shape[1] != num_buckets:
        raise ValueError(f"{owner}: table must have shape (H, num_buckets) = (H, {num_buckets}), "
                         f"got {tuple(table.shape)}")
    options = dict(num_buckets=num_buckets, max_distance=max_distance, bidirectional=bidirectional)

    def reference(score, b, h, q_idx, kv_idx, table, buckets, meta):
        return score + table[h, t5_bucket(kv_idx - q_idx, **options)].to(score.dtype)

    def specialize(p: Problem) -> ScoreMod:
        if table.shape[0] != p.heads_q:
            raise ValueError(f"{owner}: table has {table.shape[0]} heads but q has {p.heads_q}; "
                             f"it must be ({p.heads_q}, {num_buckets})")
        key = ("t5", num_buckets, max_distance, bidirectional, str(p.device))
        if key not in _META:
            rel = torch.arange(-max_distance, max_distance + 1)
            _META[key] = t5_bucket(rel, **options).to(torch.int32).to(p.device)
        return ScoreMod(_K + "relative_position_bias_score", reference, name=owner,
                        tensors=(table.contiguous(), _META[key], _meta([num_buckets, max_distance], p.device)),
                        tensor_grads=_K + "relative_position_bias_grads")

    return ScoreMod(_K + "relative_position_bias_score", reference, tensors=(table,), name=owner,
                    tensor_grads=_K + "relative_position_bias_grads", specialize=specialize)


# ----------------------------------------------------------------------------- NATTEN 2-D relative position bias

def _pair(owner: str, name: str, value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or \
            any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{owner}: {name} must be an int >= 1 or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


def relative_position_bias_2d(table: torch.Tensor, kernel_size: Union[int, Sequence[int]]) -> ScoreMod:
    """NATTEN's 2-D relative positional bias ``rpb`` for neighborhood attention
    (Hassani et al., 2023, https://arxiv.org/abs/2204.07143).

    ``score + table[h, (kx - qx) / dx + Kx - 1, (ky - qy) / dy + Ky - 1]`` where (qx, qy),
    (kx, ky) are the 2-D coordinates of query and key and (dx, dy) the dilation: the
    bias depends on the key's offset inside the neighborhood, in dilation-group units.
    Only for 2-D :func:`attnkit.neighborhood_attention` with stride 1 (the geometry comes
    from the call).

    Args:
        table: (Hq, 2 Kx - 1, 2 Ky - 1) floating; learnable.
        kernel_size: K or (Kx, Ky), the neighborhood size of the call.

    Example::

        rpb = torch.nn.Parameter(torch.zeros(4, 13, 13, device="cuda"))
        out = attnkit.neighborhood_attention(q, k, v, kernel_size=7,
                                             score_mod=attnkit.mods.relative_position_bias_2d(rpb, 7))
    """
    owner = "relative_position_bias_2d"
    kx, ky = _pair(owner, "kernel_size", kernel_size)
    _float_tensor(owner, "table", table, (3,))
    if tuple(table.shape[1:]) != (2 * kx - 1, 2 * ky - 1):
        raise ValueError(f"{owner}: table must have shape (H, 2 * {kx} - 1, 2 * {ky} - 1) = (H, {2 * kx - 1}, "
                         f"{2 * ky - 1}) for kernel_size {(kx, ky)}, got {tuple(table.shape)}")

    def reference(score, b, h, q_idx, kv_idx, table, meta):
        width, dx, dy = int(meta[0]), int(meta[1]), int(meta[2])
        ix = torch.div(kv_idx // width - q_idx // width, dx, rounding_mode="floor") + kx - 1
        iy = torch.div(kv_idx % width - q_idx % width, dy, rounding_mode="floor") + ky - 1
        return score + table[h, ix.clamp(0, 2 * kx - 2), iy.clamp(0, 2 * ky - 2)].to(score.dtype)

    def specialize(p: Problem) -> ScoreMod:
        if p.spatial is None or len(p.spatial) != 2:
            raise ValueError(f"{owner} is NATTEN's bias for 2-D neighborhood attention; the {p.variant} call has "
                             f"{'no spatial axes' if p.spatial is None else f'{len(p.spatial)} spatial axes'}")
        if tuple(p.kernel_size) != (kx, ky):
            raise ValueError(f"{owner} was built for kernel_size {(kx, ky)} but the call has {tuple(p.kernel_size)}")
        if any(s != 1 for s in p.stride):
            raise ValueError(f"{owner} needs stride 1 (a query's window must be centred on it); got {p.stride}")
        if table.shape[0] != p.heads_q:
            raise ValueError(f"{owner}: table has {table.shape[0]} heads but q has {p.heads_q}")
        meta = _meta([p.spatial[1], p.dilation[0], p.dilation[1], kx, ky], p.device)
        return ScoreMod(_K + "rpb_2d_score", reference, name=owner, tensors=(table.contiguous(), meta),
                        tensor_grads=_K + "rpb_2d_grads")

    return ScoreMod(_K + "rpb_2d_score", reference, tensors=(table,), name=owner, tensor_grads=_K + "rpb_2d_grads",
                    specialize=specialize)


# ----------------------------------------------------------------------------- per-key bias

def key_bias(bias: torch.Tensor) -> ScoreMod:
    """A per-head, per-key additive bias: ``score + bias[b, h, kv_idx]``.

    The form of many recent per-key corrections: attention-sink calibration and
    ZeroTuning (a learned bias on the first token), RazorAttention's compensation token,
    Dynamic Mask Attention's content-dependent key bias.

    Args:
        bias: (B or 1, Hq, Nk) floating; learnable (one atomic add per key per tile).

    Example::

        bias = torch.zeros(1, 8, 4096, device="cuda", requires_grad=True)
        out = attnkit.flash_attention(q, k, v, causal=True, score_mod=attnkit.mods.key_bias(bias))
    """
    owner = "key_bias"
    _float_tensor(owner, "bias", bias, (3,))

    def reference(score, b, h, q_idx, kv_idx, bias, meta):
        return score + bias[_gather_rows(bias, b), h, kv_idx].to(score.dtype)

    def specialize(p: Problem) -> ScoreMod:
        if bias.shape[1] != p.heads_q or bias.shape[2] != p.seqlen_k:
            raise ValueError(f"{owner}: bias must have shape (B or 1, Hq, Nk) = (B or 1, {p.heads_q}, {p.seqlen_k}), "
                             f"got {tuple(bias.shape)}")
        shared = _batch_rows(owner, "bias", bias.shape[0], p)
        meta = _meta([shared * p.heads_q * p.seqlen_k, p.seqlen_k], p.device)
        return ScoreMod(_K + "key_bias_score", reference, name=owner, tensors=(bias.contiguous(), meta),
                        tensor_grads=_K + "key_bias_grads")

    return ScoreMod(_K + "key_bias_score", reference, tensors=(bias,), name=owner,
                    tensor_grads=_K + "key_bias_grads", specialize=specialize)


# ----------------------------------------------------------------------------- softcap

def softcap(cap: float) -> ScoreMod:
    """Logit soft-capping (Gemma 2, Grok): ``cap * tanh(score / cap)``, a non-additive mod.

    Equal to the built-in ``softcap=`` option of the softmax variants (which costs less:
    it is folded into the scale).

    Args:
        cap: a finite float > 0.
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"softcap: cap must be a finite number > 0, got {cap!r}")
    cap = float(cap)

    def reference(score, b, h, q_idx, kv_idx, cap_tensor):
        c = cap_tensor.to(score.dtype)
        return c * torch.tanh(score / c)

    def specialize(p: Problem) -> ScoreMod:
        key = ("softcap", cap, str(p.device))
        if key not in _META:
            _META[key] = torch.tensor([cap], dtype=torch.float32, device=p.device)
        return ScoreMod(_K + "softcap_score", reference, tensors=(_META[key],), derivative=_K + "softcap_derivative",
                        name=f"softcap({cap:g})")

    cap_cpu = torch.tensor([cap], dtype=torch.float32)
    return ScoreMod(_K + "softcap_score", reference, tensors=(cap_cpu,), derivative=_K + "softcap_derivative",
                    name=f"softcap({cap:g})", specialize=specialize)


# ----------------------------------------------------------------------------- masks

def _causal_reference(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal() -> MaskMod:
    """Causal attention: ``q_idx >= kv_idx`` (bottom-right aligned like every attnkit position,
    so with Nq < Nk the last query sees every key)."""
    return MaskMod(_K + "causal_mask", _causal_reference, name="causal")


def sliding_window(left: int, right: int = 0) -> MaskMod:
    """A local window (Longformer, Mistral): ``q_idx - left <= kv_idx <= q_idx + right``, inclusive;
    -1 leaves a side unbounded. ``sliding_window(W - 1, 0)`` is Mistral's window of W keys.

    The same mask as :func:`attnkit.sliding_window_attention`'s ``window=(left, right)``
    (which visits only the blocks inside the window by arithmetic instead of a BlockMask).
    """
    for name, val in (("left", left), ("right", right)):
        if isinstance(val, bool) or not isinstance(val, int) or val < -1:
            raise ValueError(f"sliding_window: {name} must be an int >= -1 (-1 = unbounded), got {val!r}")

    def reference(b, h, q_idx, kv_idx, meta):
        keep = torch.ones_like(q_idx - kv_idx, dtype=torch.bool)
        if left >= 0:
            keep = keep & (kv_idx >= q_idx - left)
        if right >= 0:
            keep = keep & (kv_idx <= q_idx + right)
        return keep

    def specialize(p: Problem) -> MaskMod:
        return MaskMod(_K + "sliding_window_mask", reference, tensors=(_meta([left, right], p.device),),
                       name=f"sliding_window({left}, {right})")

    return MaskMod(_K + "sliding_window_mask", reference, tensors=(_meta([left, right], torch.device("cpu")),),
                   name=f"sliding_window({left}, {right})", specialize=specialize)


def prefix_lm(prefix_lengths: Union[int, torch.Tensor]) -> MaskMod:
    """Prefix-LM (T5, UniLM): the first ``L_b`` keys are seen by every query, the rest causally:
    ``kv_idx < L_b or kv_idx <= q_idx`` (attention-gym's definition).

    Args:
        prefix_lengths: an int L, or an integer tensor (B,) with one length per batch entry.
    """
    owner = "prefix_lm"
    if isinstance(prefix_lengths, torch.Tensor):
        _int_tensor(owner, "prefix_lengths", prefix_lengths, (1,))
    elif isinstance(prefix_lengths, bool) or not isinstance(prefix_lengths, int) or prefix_lengths < 0:
        raise ValueError(f"{owner}: prefix_lengths must be an int >= 0 or an integer tensor (B,), "
                         f"got {prefix_lengths!r}")

    def reference(b, h, q_idx, kv_idx, lengths, meta):
        return (kv_idx < lengths[_gather_rows(lengths, b)]) | (kv_idx <= q_idx)

    def specialize(p: Problem) -> MaskMod:
        if isinstance(prefix_lengths, torch.Tensor):
            if prefix_lengths.device != p.device:
                raise ValueError(f"{owner}: prefix_lengths is on {prefix_lengths.device} but q is on {p.device}")
            lengths = prefix_lengths.to(dtype=torch.int32).contiguous()
        else:
            lengths = _meta([prefix_lengths], p.device)
        shared = _batch_rows(owner, "prefix_lengths", lengths.shape[0], p)
        return MaskMod(_K + "prefix_lm_mask", reference, tensors=(lengths, _meta([shared], p.device)), name=owner)

    initial = prefix_lengths if isinstance(prefix_lengths, torch.Tensor) else torch.tensor([prefix_lengths])
    return MaskMod(_K + "prefix_lm_mask", reference, tensors=(initial, torch.zeros(1, dtype=torch.int32)),
                   name=owner, specialize=specialize)


def document(doc_ids: torch.Tensor, global_tokens: int = 0) -> MaskMod:
    """Document masking for packed sequences, with AnchorAttention's shared anchor tokens
    (Wang et al., 2024, https://arxiv.org/abs/2411.13476): ``doc[q_idx] == doc[kv_idx] or
    kv_idx < global_tokens``. Not causal by itself: combine with ``and_masks(causal(), ...)``.

    Args:
        doc_ids: integer (N,) or (B, N): the document of every key position (Nk = N); a
            query uses the id at its own key-axis position (a query before the first key,
            possible when Nq > Nk, belongs to no document).
        global_tokens: the first ``global_tokens`` keys are seen by every query (>= 0).
    """
    owner = "document"
    _int_tensor(owner, "doc_ids", doc_ids, (1, 2))
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"{owner}: global_tokens must be an int >= 0, got {global_tokens!r}")

    def reference(b, h, q_idx, kv_idx, docs, meta):
        rows = _gather_rows(docs, b)
        same = (docs[rows, q_idx.clamp(min=0)] == docs[rows, kv_idx]) & (q_idx >= 0)
        return same | (kv_idx < global_tokens)

    def specialize(p: Problem) -> MaskMod:
        if doc_ids.device != p.device:
            raise ValueError(f"{owner}: doc_ids is on {doc_ids.device} but q is on {p.device}")
        docs = doc_ids.reshape(-1, doc_ids.shape[-1]).to(dtype=torch.int32).contiguous()
        if docs.shape[1] != p.seqlen_k:
            raise ValueError(f"{owner}: doc_ids covers {docs.shape[1]} key positions but the call has Nk = "
                             f"{p.seqlen_k}")
        shared = _batch_rows(owner, "doc_ids", docs.shape[0], p)
        return MaskMod(_K + "document_mask", reference, name=owner,
                       tensors=(docs, _meta([shared * docs.shape[1], global_tokens], p.device)))

    return MaskMod(_K + "document_mask", reference, tensors=(doc_ids, torch.zeros(2, dtype=torch.int32)),
                   name=owner, specialize=specialize)
