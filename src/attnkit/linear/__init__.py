"""The ``linear`` and ``lightning`` variants: attention without softmax, with a per-head
decay, recurrent states for chunked prefill and decoding, and feature maps.

Both run on the library's second engine (``attnkit.kernels.linear``): Lightning
Attention-2's chunked computation, an intra-chunk masked decayed QK^T V on tensor
cores plus an inter-chunk state in fp32, forward and backward; and a recurrent kernel
for one-token decoding steps. See docs/linear.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..checks import Shapes, check_flag, check_head_vector, check_int, check_qkv, check_scale, checking_values
from ..dispatch import attention
from ..registry import Case, Variant, register_variant
from . import feature_maps
from .function import chunked_linear, lightning_kernel, linear_kernel
from .reference import NORMALIZE_EPS, lightning_reference, linear_reference

LINEAR_OPTIONS: Dict[str, Any] = dict(causal=True, decay=None, scale=None, normalize=False, feature_map=None,
                                      initial_state=None, return_state=False)
LIGHTNING_OPTIONS: Dict[str, Any] = dict(slopes=None, initial_state=None, return_state=False)
#: largest feature dim (after the feature map) and value dim (+1 with normalize) the kernel takes
MAX_KERNEL_DIM = 256


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


def _check_state(state: Any, shapes: Shapes, feature_dim: Optional[int], value_dim: int, q: torch.Tensor,
                 normalize: bool = False) -> None:
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
    want = (shapes.batch, shapes.heads_q, feature_dim if feature_dim is not None else state.shape[2], value_dim)
    if tuple(state.shape) != want:
        extra = " (normalize=True adds one column to Dv, holding z)" if normalize else ""
        raise ValueError(f"initial_state must have shape (B, Hq, D, Dv) = {want}{extra}, "
                         f"got {tuple(state.shape)}")


def validate_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> Shapes:
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
    _check_state(options["initial_state"], shapes, feature_maps.output_dim(fmap, shapes.head_dim),
                 shapes.head_dim_v + int(normalize), q, normalize)
    return shapes


def validate_lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_flag("return_state", options["return_state"])
    if options["slopes"] is None:
        raise TypeError("lightning attention needs slopes: a tensor of shape (Hq,) of decay rates, "
                        "e.g. attnkit.lightning_slopes(Hq, layer_idx, num_layers)")
    _check_rates("slopes", options["slopes"], shapes.heads_q, q)
    if shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"lightning attention is causal and needs Nq == Nk (got {shapes.seqlen_q} and "
                         f"{shapes.seqlen_k}); to attend to a prefix, pass its state as initial_state")
    _check_state(options["initial_state"], shapes, shapes.head_dim, shapes.head_dim_v, q)
    return shapes


def kernel_support_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    reasons = []
    feature_dim = feature_maps.output_dim(options["feature_map"], q.shape[-1])
    value_dim = v.shape[-1] + int(bool(options["normalize"]))
    if feature_dim is not None and feature_dim > MAX_KERNEL_DIM:
        reasons.append(f"feature dim {feature_dim} (head dim after the feature map) > {MAX_KERNEL_DIM} is not "
                       "supported by the kernel")
    if value_dim > MAX_KERNEL_DIM:
        reasons.append(f"value dim {value_dim} > {MAX_KERNEL_DIM} is not supported by the kernel")
    return reasons


def kernel_support_lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any]) -> List[str]:
    return kernel_support_linear(q, k, v, dict(feature_map=None, normalize=False))


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     decay: Optional[torch.Tensor] = None, scale: Optional[float] = None, normalize: bool = False,
                     feature_map=None, initial_state: Optional[torch.Tensor] = None, return_state: bool = False,
                     backend: str = "auto", layout: str = "bhsd"):
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
            state after a previous piece of the sequence (default zeros). Differentiable.
        return_state: also return the final state (B, Hq, F, Dv[+1]), float32.
        layout: "bhsd" (default) or "bshd": q (B, N, Hq, D), k/v (B, N, Hkv, D) and out
            (B, N, Hq, Dv) (flash-linear-attention's layout); read without a copy. States keep
            their shape (see ``attnkit.attention``).
        backend: "auto", "triton" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.

    Processing a sequence in pieces, each call given the previous call's state, equals
    one call on the whole sequence; a call with N = 1 is a decoding step (the kernel
    runs a recurrent step for it, with no padding to a chunk).
    """
    return attention(q, k, v, "linear", backend, causal=causal, decay=decay, scale=scale, normalize=normalize,
                     feature_map=feature_map, initial_state=initial_state, return_state=return_state, layout=layout)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, *,
                        initial_state: Optional[torch.Tensor] = None, return_state: bool = False,
                        backend: str = "auto", layout: str = "bhsd"):
    """Lightning attention (TransNormerLLM, Lightning Attention-2, MiniMax-01): causal linear
    attention with scale 1 and a per-head decay.

    S_t = exp(-slopes[h]) S_{t-1} + k_t^T v_t, o_t = q_t S_t (no feature map, no normalization:
    models apply their activation before and their norm and gate after).

    Args:
        q: (B, Hq, N, D). k: (B, Hkv, N, D). v: (B, Hkv, N, Dv); Hkv divides Hq.
        slopes: (Hq,) decay rates >= 0, e.g. ``attnkit.lightning_slopes(Hq, layer_idx, num_layers)``.
            Differentiable when it requires grad.
        initial_state: (B, Hq, D, Dv), float32 or q's dtype, or None (zeros).
        return_state: also return the final state (B, Hq, D, Dv), float32.
        layout: "bhsd" (default) or "bshd": q (B, N, Hq, D), k/v (B, N, Hkv, D) and out
            (B, N, Hq, Dv) (flash-linear-attention's layout); read without a copy. States keep
            their shape (see ``attnkit.attention``).
        backend: "auto", "triton" or "reference".

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.
    """
    return attention(q, k, v, "lightning", backend, slopes=slopes, initial_state=initial_state,
                     return_state=return_state, layout=layout)


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


def linear_examples() -> List[Case]:
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
    ]


def lightning_examples() -> List[Case]:
    return [
        Case((1, 4, 70, 32), (1, 4, 70, 32), (1, 4, 70, 32), {}, {"slopes": _lightning(4)}, name="slopes"),
        Case((1, 2, 41, 24), (1, 2, 41, 24), (1, 2, 41, 48), {},
             {"slopes": _rates(2), "initial_state": _state(1, 2, 24, 48)}, name="state_d24_dv48"),
        Case((1, 4, 1, 16), (1, 4, 1, 16), (1, 4, 1, 16), {},
             {"slopes": _lightning(4), "initial_state": _state(1, 4, 16, 16)}, name="decode_step"),
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
    options=LIGHTNING_OPTIONS,
    validate=validate_lightning,
    kernel_support=kernel_support_lightning,
    extra_outputs={"return_state": "state"},
    examples=lightning_examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="lightning attention (Lightning Attention-2 / MiniMax): scale 1, ALiBi-style decay slopes, states",
    demo=lightning_demo,
))

__all__ = ["NORMALIZE_EPS", "chunked_linear", "feature_maps", "lightning_attention", "lightning_reference",
           "lightning_slopes", "linear_attention", "linear_reference"]
