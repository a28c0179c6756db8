"""The ``linear`` and ``lightning`` variants: attention without softmax, with a per-head
decay, recurrent states for chunked prefill and decoding, and feature maps.

Both run on the library's second engine (``attnkit.kernels.linear``, shared with ``gla``'s
scalar gates): flash-linear-attention's two stages, a pass that writes the state at every
chunk boundary and an output pass over all chunks at once (the masked, decayed QK^T V
inside a chunk plus the query times the state entering it), forward and backward; and a
recurrent kernel for one-token decoding steps. See docs/linear.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import (
    Shapes,
    check_cu_seqlens,
    check_flag,
    check_head_vector,
    check_int,
    check_qkv,
    check_scale,
    check_varlen,
    checking_values,
)
from ..dispatch import attention
from ..registry import Case, Variant, packed_offsets, register_variant
from . import feature_maps
from .function import chunked_linear, gla_kernel, lightning_kernel, linear_kernel
from .reference import (
    NORMALIZE_EPS,
    lightning_reference,
    linear_reference,
    resolve_offsets,
)
from .torch_backend import lightning_torch, linear_torch

LINEAR_OPTIONS: dict[str, Any] = {"causal": True, "decay": None, "scale": None, "normalize": False,
                                  "feature_map": None, "initial_state": None, "return_state": False,
                                  "cu_seqlens": None, "cu_seqlens_q": None, "cu_seqlens_k": None}
LIGHTNING_OPTIONS: dict[str, Any] = {"slopes": None, "initial_state": None, "return_state": False,
                                     "cu_seqlens": None, "cu_seqlens_q": None, "cu_seqlens_k": None}
#: largest feature dim (after the feature map) and value dim (+1 with normalize) the kernels take: the
#: chunked passes tile both dims, the recurrent (decoding) kernel holds a (feature dim, value block)
#: fp32 state slice in registers
MAX_KERNEL_DIM = 1024


def _check_rates(name: str, x: Any, heads: int, q: torch.Tensor) -> torch.Tensor:
    x = check_head_vector(name, x, heads, q)
    values = x.detach()
    if not checking_values():
        return x
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite (decay rates s_h, lambda_h = exp(-s_h)), got {values.tolist()}")
    if bool((values < 0).any()):
        raise ValueError(f"{name} must be >= 0 (decay rates s_h, lambda_h = exp(-s_h) <= 1), got {values.tolist()}")
    return x


def check_packing(options: dict[str, Any], shapes: Shapes, q: torch.Tensor, causal: bool) -> int | None:
    """A packed batch: flash's ``cu_seqlens_q/k`` (checks.check_varlen) and/or flash-linear-attention's
    one ``cu_seqlens`` for q, k and v, which any of the pair given with it must equal. Causal
    sequences need as many queries as keys. Returns S, the number of sequences (None if unpacked)."""
    cu = options["cu_seqlens"]
    cu_q, cu_k = resolve_offsets(cu, options["cu_seqlens_q"], options["cu_seqlens_k"])
    if cu is not None:
        if shapes.batch != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along N and the batch size must be 1, "
                             f"got {shapes.batch}")
        check_cu_seqlens("cu_seqlens", cu, shapes.seqlen_q, q.device)
        if shapes.seqlen_k != shapes.seqlen_q:
            raise ValueError(f"cu_seqlens (one set of offsets for q, k and v) needs Nq == Nk, got {shapes.seqlen_q} "
                             f"and {shapes.seqlen_k}; give cu_seqlens_q and cu_seqlens_k instead")
    if not check_varlen(shapes, cu_q, cu_k, q.device):
        return None
    if checking_values():
        for name, given in (("cu_seqlens_q", options["cu_seqlens_q"]), ("cu_seqlens_k", options["cu_seqlens_k"])):
            if cu is not None and given is not None and not torch.equal(given, cu):
                raise ValueError(f"{name} must equal cu_seqlens when both are given, got {given.tolist()} and "
                                 f"{cu.tolist()}")
        if causal and not torch.equal(cu_q, cu_k):
            raise ValueError(f"causal attention needs as many queries as keys in each packed sequence: "
                             f"cu_seqlens_q must equal cu_seqlens_k, got {cu_q.tolist()} and {cu_k.tolist()}")
    return cu_q.numel() - 1


def check_state(state: Any, shapes: Shapes, feature_dim: int | None, value_dim: int, q: torch.Tensor,
                 normalize: bool = False, sequences: int | None = None) -> None:
    """initial_state: (B, Hq, F, Dv), or (S, Hq, F, Dv) for ``sequences`` = S packed sequences."""
    if state is None:
        return
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"initial_state must be a tensor of shape (B, Hq, D, Dv), got {type(state).__name__}")
    if state.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"initial_state must have dtype torch.float32 (the dtype of returned states) or q's "
                        f"dtype {q.dtype}, got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"initial_state is on {state.device} but q is on {q.device}")
    if state.dim() != 4:
        raise ValueError(f"initial_state must have rank 4, (B, Hq, D, Dv), got shape {tuple(state.shape)}")
    rows, form = (shapes.batch, "(B, Hq, D, Dv)") if sequences is None else (sequences, "(S, Hq, D, Dv)")
    want = (rows, shapes.heads_q, feature_dim if feature_dim is not None else state.shape[2], value_dim)
    if tuple(state.shape) != want:
        extra = " (normalize=True adds one column to Dv, holding z)" if normalize else ""
        if sequences is not None:
            extra += f", one row per packed sequence ({sequences} in cu_seqlens)"
        raise ValueError(f"initial_state must have shape {form} = {want}{extra}, got {tuple(state.shape)}")


def validate_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    causal = check_flag("causal", options["causal"])
    normalize = check_flag("normalize", options["normalize"])
    check_flag("return_state", options["return_state"])
    check_scale(options["scale"], shapes.head_dim)
    fmap = options["feature_map"]
    feature_maps.resolve(fmap)
    if causal and shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"causal linear attention needs Nq == Nk (got {shapes.seqlen_q} and {shapes.seqlen_k}); "
                         "to attend to a prefix, pass its state as initial_state")
    if options["decay"] is not None:
        if not causal:
            raise ValueError("decay needs causal=True: the non-causal form O = phi(Q) (phi(K)^T V) has no order "
                             "for a decay to follow")
        _check_rates("decay", options["decay"], shapes.heads_q, q)
    sequences = check_packing(options, shapes, q, causal)
    check_state(options["initial_state"], shapes, feature_maps.output_dim(fmap, shapes.head_dim),
                 shapes.head_dim_v + int(normalize), q, normalize, sequences)
    return shapes


def validate_lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_flag("return_state", options["return_state"])
    if options["slopes"] is None:
        raise TypeError("lightning attention needs slopes: a tensor of shape (Hq,) of decay rates, "
                        "e.g. attnkit.lightning_slopes(Hq, layer_idx, num_layers)")
    _check_rates("slopes", options["slopes"], shapes.heads_q, q)
    if shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"lightning attention is causal and needs Nq == Nk (got {shapes.seqlen_q} and "
                         f"{shapes.seqlen_k}); to attend to a prefix, pass its state as initial_state")
    sequences = check_packing(options, shapes, q, True)
    check_state(options["initial_state"], shapes, shapes.head_dim, shapes.head_dim_v, q, sequences=sequences)
    return shapes


def kernel_support_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    reasons = []
    feature_dim = feature_maps.output_dim(options["feature_map"], q.shape[-1])
    value_dim = v.shape[-1] + int(bool(options["normalize"]))
    if feature_dim is not None and feature_dim > MAX_KERNEL_DIM:
        reasons.append(f"feature dim {feature_dim} (head dim after the feature map) > {MAX_KERNEL_DIM} is not "
                       "supported by the kernel")
    if value_dim > MAX_KERNEL_DIM:
        reasons.append(f"value dim {value_dim} > {MAX_KERNEL_DIM} is not supported by the kernel")
    return reasons


def kernel_support_lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    return kernel_support_linear(q, k, v, {"feature_map": None, "normalize": False})


def kernel_support_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    """What the chunked engine cannot take of a ``gla`` call with scalar gates (B, Hq, N): its
    head-dim limits. Per-channel gates run on their own kernels (``attnkit.gla.kernel``)."""
    return kernel_support_linear(q, k, v, {"feature_map": None, "normalize": False})


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     decay: torch.Tensor | None = None, scale: float | None = None, normalize: bool = False,
                     feature_map=None, initial_state: torch.Tensor | None = None, return_state: bool = False,
                     cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                     cu_seqlens_k: torch.Tensor | None = None, backend: str = "auto", layout: str = "bhsd"):
    """Linear attention (no softmax), optionally with a per-head decay.

    Causal form, per head h: S_t = lambda_h S_{t-1} + phi(k_t)^T v_t, o_t = scale phi(q_t) S_t,
    lambda_h = exp(-decay[h]). Non-causal form: O = scale phi(Q) (S_0 + phi(K)^T V).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D). v: (B, Hkv, N, Dv); Hkv divides Hq (GQA/MQA:
            query head h reads kv head h // (Hq // Hkv)). Causal needs Nq == Nk; the
            non-causal form allows Nq != Nk.
        causal: the recurrent (autoregressive) form; False gives phi(Q) (phi(K)^T V).
        decay: (Hq,) decay rates s_h >= 0 (lambda_h = exp(-s_h)), or None (lambda = 1).
            Causal only. Differentiable when it requires grad.
        scale: multiplies phi(q_t) S_t; None means 1/sqrt(D) with D the head dim of q
            before the feature map.
        normalize: divide by scale phi(q_t) . z_t + 1e-6, where z_t = lambda z_{t-1} + phi(k_t)
            (causal) or z = sum_t phi(k_t) (non-causal). The state then has Dv + 1
            columns, the last one holding z.
        feature_map: phi applied to q and k first: None, "identity", "elu+1", "relu",
            "taylor" (Based), or a callable such as ``attnkit.feature_maps.Hedgehog(D)``;
            it maps (..., D) to (..., F).
        initial_state: (B, Hq, F, Dv) (Dv + 1 with normalize), float32 or q's dtype: the
            state after a previous piece of the sequence (default zeros); (S, Hq, F, Dv) for
            S packed sequences, one row each. Differentiable.
        return_state: also return the final state (B, Hq, F, Dv[+1]), float32 ((S, ...) packed).
        cu_seqlens: (S + 1,) int32 offsets of S sequences packed along N (B = 1), for q, k and
            v together, as flash-linear-attention's ``cu_seqlens``: each sequence runs alone
            (its own state row, its own keys, the decay restarting) and the output is theirs
            concatenated. Sequences may be empty.
        cu_seqlens_q, cu_seqlens_k: the same as flash's pair (given together); equal to
            ``cu_seqlens`` when given with it, and to each other when causal. The non-causal
            form may pack Nq != Nk: sequence s's queries read sequence s's keys.
        layout: "bhsd" (default) or "bshd": q (B, N, Hq, D), k/v (B, N, Hkv, D) and out
            (B, N, Hq, Dv) (flash-linear-attention's layout); read without a copy. States keep
            their shape (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.

    Processing a sequence in pieces, each call given the previous call's state, equals
    one call on the whole sequence; a call with N = 1 is a decoding step (the kernel
    runs a recurrent step for it, with no padding to a chunk).

    Examples::

        >>> q, k, v = (torch.randn(2, 4, 100, 32) for _ in range(3))
        >>> decay = attnkit.lightning_slopes(4)
        >>> out, state = attnkit.linear_attention(q, k, v, decay=decay, feature_map="elu+1", return_state=True)
        >>> out.shape, state.shape
        (torch.Size([2, 4, 100, 32]), torch.Size([2, 4, 32, 32]))
        >>> cu = torch.tensor([0, 17, 17, 100], dtype=torch.int32)     # three sequences, one empty
        >>> out, state = attnkit.linear_attention(q[:1], k[:1], v[:1], decay=decay, cu_seqlens=cu,
        ...                                       return_state=True)
        >>> state.shape                                                   # one state per sequence
        torch.Size([3, 4, 32, 32])
    """
    return attention(q, k, v, "linear", backend, causal=causal, decay=decay, scale=scale, normalize=normalize,
                     feature_map=feature_map, initial_state=initial_state, return_state=return_state,
                     cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, layout=layout)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                        initial_state: torch.Tensor | None = None, return_state: bool = False,
                        cu_seqlens: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
                        cu_seqlens_k: torch.Tensor | None = None, backend: str = "auto", layout: str = "bhsd"):
    """Lightning attention (TransNormerLLM, Lightning Attention-2, MiniMax-01): causal linear
    attention with scale 1 and a per-head decay.

    S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t, o_t = q_t S_t (no feature map, no normalization:
    models apply their activation before and their norm and gate after).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D). v: (B, Hkv, N, Dv); Hkv divides Hq.
        slopes: (Hq,) decay rates >= 0, e.g. ``attnkit.lightning_slopes(Hq, layer_idx, num_layers)``.
            Differentiable when it requires grad.
        initial_state: (B, Hq, D, Dv), float32 or q's dtype, or None (zeros); (S, Hq, D, Dv)
            for S packed sequences.
        return_state: also return the final state (B, Hq, D, Dv), float32 ((S, ...) packed).
        cu_seqlens: (S + 1,) int32 offsets of S sequences packed along N (B = 1), as
            flash-linear-attention's: each sequence runs alone, with its own state row and
            its decay restarting at its first token.
        cu_seqlens_q, cu_seqlens_k: flash's pair, accepted too; both equal (causal), and
            equal to ``cu_seqlens`` when given with it.
        layout: "bhsd" (default) or "bshd": q (B, N, Hq, D), k/v (B, N, Hkv, D) and out
            (B, N, Hq, Dv) (flash-linear-attention's layout); read without a copy. States keep
            their shape (see ``attnkit.attention``).
        backend: "auto", "triton", "torch" or "reference".

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.

    Examples::

        >>> q, k, v = (torch.randn(1, 8, 64, 32) for _ in range(3))
        >>> slopes = attnkit.lightning_slopes(8, layer_idx=2, num_layers=12)
        >>> attnkit.lightning_attention(q, k, v, slopes).shape
        torch.Size([1, 8, 64, 32])
        >>> cu = torch.tensor([0, 1, 40, 64], dtype=torch.int32)
        >>> s0 = torch.zeros(3, 8, 32, 32)                                # one state per sequence
        >>> out, state = attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0,
        ...                                          return_state=True)
        >>> state.shape
        torch.Size([3, 8, 32, 32])
    """
    return attention(q, k, v, "lightning", backend, slopes=slopes, initial_state=initial_state,
                     return_state=return_state, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, layout=layout)


def lightning_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> torch.Tensor:
    """Lightning/MiniMax decay rates: s_h = 2^(-8 (h + 1) / H) * (1 - l / (L - 1) + 1e-5).

    The first factor is ALiBi's slope of head h; the layer factor (TransNormerLLM, MiniMax-01)
    makes early layers decay fast and the last layer almost not at all. With
    ``num_layers == 1`` there is no layer factor. Returns a float32 CPU tensor (H,);
    move it to your device. For a power-of-two H these are exactly ALiBi's/MiniMax's
    slopes; for other H this formula is used as stated (ALiBi interpolates instead).
    """
    check_int("num_heads", num_heads, minimum=1)
    check_int("num_layers", num_layers, minimum=1)
    check_int("layer_idx", layer_idx, minimum=0)
    if layer_idx >= num_layers:
        raise ValueError(f"layer_idx must be < num_layers ({num_layers}), got {layer_idx}")
    heads = torch.arange(1, num_heads + 1, dtype=torch.float64)
    slopes = torch.pow(2.0, -8.0 * heads / num_heads)
    if num_layers > 1:
        slopes = slopes * (1.0 - layer_idx / (num_layers - 1) + 1e-5)
    return slopes.to(torch.float32)


def _rates(heads: int):
    return lambda g: torch.rand(heads, generator=g, dtype=torch.float64) * 0.5 + 0.02


def _state(*shape: int):
    return lambda g: torch.randn(shape, generator=g, dtype=torch.float64) * 0.5


def _lightning(heads: int):
    return lambda g: lightning_slopes(heads).to(torch.float64)


def linear_examples() -> list[Case]:
    return [
        Case((1, 2, 37, 32), (1, 2, 37, 32), (1, 2, 37, 32), name="causal"),
        Case((1, 2, 45, 40), (1, 2, 45, 40), (1, 2, 45, 24), {},
             {"decay": _rates(2), "initial_state": _state(1, 2, 40, 24)}, name="decay_state_d40_dv24"),
        Case((2, 4, 33, 16), (2, 2, 33, 16), (2, 2, 33, 16), {"scale": 0.5}, {"decay": _rates(4)},
             name="gqa_decay"),
        Case((1, 2, 50, 16), (1, 2, 50, 16), (1, 2, 50, 20), {"normalize": True, "feature_map": "elu+1"},
             {"decay": _rates(2)}, name="normalize_elu"),
        Case((1, 2, 20, 16), (1, 1, 37, 16), (1, 1, 37, 24), {"causal": False, "feature_map": "relu"},
             name="noncausal_nq<nk_mqa"),
        Case((2, 2, 1, 32), (2, 2, 1, 32), (2, 2, 1, 32), {},
             {"decay": _rates(2), "initial_state": _state(2, 2, 32, 32)}, name="decode_step"),
        Case((1, 2, 23, 4), (1, 2, 23, 4), (1, 2, 23, 8), {"feature_map": "taylor", "scale": 1.0}, name="taylor"),
        Case((1, 2, 53, 16), (1, 1, 53, 16), (1, 1, 53, 16), {"feature_map": "elu+1"},
             {"decay": _rates(2), "initial_state": _state(4, 2, 16, 16),
              "cu_seqlens": packed_offsets(1, 17, 0, 35)}, name="varlen_decay_state"),
        Case((1, 2, 20, 16), (1, 2, 31, 16), (1, 2, 31, 8),
             {"causal": False, "normalize": True, "feature_map": "relu"},
             {"cu_seqlens_q": packed_offsets(3, 0, 17), "cu_seqlens_k": packed_offsets(10, 6, 15)},
             name="varlen_noncausal"),
    ]


def lightning_examples() -> list[Case]:
    return [
        Case((1, 4, 70, 32), (1, 4, 70, 32), (1, 4, 70, 32), {}, {"slopes": _lightning(4)}, name="slopes"),
        Case((1, 2, 41, 24), (1, 2, 41, 24), (1, 2, 41, 48), {},
             {"slopes": _rates(2), "initial_state": _state(1, 2, 24, 48)}, name="state_d24_dv48"),
        Case((1, 4, 1, 16), (1, 4, 1, 16), (1, 4, 1, 16), {},
             {"slopes": _lightning(4), "initial_state": _state(1, 4, 16, 16)}, name="decode_step"),
        Case((1, 2, 50, 16), (1, 2, 50, 16), (1, 2, 50, 24), {},
             {"slopes": _lightning(2), "initial_state": _state(3, 2, 16, 24),
              "cu_seqlens": packed_offsets(17, 0, 33)}, name="varlen_state"),
    ]


def linear_demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, {"feature_map": "elu+1"}, {"decay": _rates(heads)}, name=f"decay_n{seqlen}")


def lightning_demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, {}, {"slopes": _lightning(heads)}, name=f"slopes_n{seqlen}")


register_variant(Variant(
    name="linear",
    reference=linear_reference,
    kernel=linear_kernel,
    torch_impl=linear_torch,
    options=LINEAR_OPTIONS,
    validate=validate_linear,
    kernel_support=kernel_support_linear,
    extra_outputs={"return_state": "state"},
    examples=linear_examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="linear attention: per-head decay, states for chunked prefill/decoding, feature maps, normalize",
    demo=linear_demo,
))

register_variant(Variant(
    name="lightning",
    reference=lightning_reference,
    kernel=lightning_kernel,
    torch_impl=lightning_torch,
    options=LIGHTNING_OPTIONS,
    validate=validate_lightning,
    kernel_support=kernel_support_lightning,
    extra_outputs={"return_state": "state"},
    examples=lightning_examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="lightning attention (Lightning Attention-2 / MiniMax): scale 1, ALiBi-style decay slopes, states",
    demo=lightning_demo,
))

__all__ = ["NORMALIZE_EPS", "chunked_linear", "feature_maps", "gla_kernel", "kernel_support_gla",
           "lightning_attention", "lightning_reference",
           "lightning_slopes", "linear_attention", "linear_reference"]
