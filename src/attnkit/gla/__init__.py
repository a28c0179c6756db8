"""The ``gla`` variant: gated linear attention with data-dependent decays (GLA, Mamba-2/SSD,
simple GLA, HGRN-2, Lizard), flash-linear-attention's ``chunk_gla`` / ``chunk_simple_gla``.

A readable reference (the recurrence step by step), a chunked torch backend and Triton kernels:
scalar gates on the linear engine (``attnkit.linear``), per-channel gates on their own chunked
kernels (``kernels/gla.py``, :mod:`attnkit.gla.kernel`). See docs/linear.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import logsigmoid

from ..checks import Shapes, check_flag, check_log_gates, check_qkv, check_scale
from ..dispatch import attention
from ..linear import check_packing, check_state, gla_kernel, kernel_support_gla
from ..registry import Case, Variant, packed_offsets, register_variant
from .kernel import gla_vector_kernel
from .reference import gla_reference
from .torch_backend import gla_torch

GLA_OPTIONS: dict[str, Any] = {"g": None, "scale": None, "initial_state": None, "return_state": False,
                               "cu_seqlens": None}


def validate_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_flag("return_state", options["return_state"])
    check_scale(options["scale"], shapes.head_dim)
    if options["g"] is None:
        raise TypeError("gated linear attention needs g: log-gates <= 0 of shape (B, Hq, N) (one per token) "
                        "or (B, Hq, N, Dk) (one per key channel)")
    if shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"gated linear attention is causal and needs Nq == Nk (got {shapes.seqlen_q} and "
                         f"{shapes.seqlen_k}); to attend to a prefix, pass its state as initial_state")
    check_log_gates("g", options["g"], shapes, q, per_channel=True)
    # the packing and state rules of the linear variants (flash-linear-attention's cu_seqlens)
    packing = {"cu_seqlens": options["cu_seqlens"], "cu_seqlens_q": None, "cu_seqlens_k": None}
    sequences = check_packing(packing, shapes, q, True)
    check_state(options["initial_state"], shapes, shapes.head_dim, shapes.head_dim_v, q, sequences=sequences)
    return shapes


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           return_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                           backend: str = "auto"):
    """Gated linear attention: linear attention whose state decays by data-dependent gates.

    Per query head: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t with S of shape (Dk, Dv),
    o_t = scale q_t S_t. A scalar gate per token (Mamba-2/SSD, simple GLA, Liger) decays
    the whole state; a gate per key channel (GLA, HGRN-2, Lizard) decays row d of S by
    exp(g_t[d]). Semantics of flash-linear-attention's ``chunk_simple_gla`` / ``chunk_gla``
    (in (B, H, N, D) layout).

    Args:
        q: (B, Hq, N, Dk). k: (B, Hkv, N, Dk). v: (B, Hkv, N, Dv); Hkv divides Hq (GQA/MQA:
            query head h reads kv head h // (Hq // Hkv)).
        g: log-gates <= 0, finite, per query head: (B, Hq, N) (one per token) or
            (B, Hq, N, Dk) (one per key channel), any floating dtype (computed in float32
            by the torch backend). Differentiable.
        scale: multiplies q_t S_t; None means Dk ** -0.5 (flash-linear-attention's default).
        initial_state: (B, Hq, Dk, Dv), float32 or q's dtype, or None (zeros): the state after
            a previous piece of the sequence; (S, Hq, Dk, Dv) for S packed sequences.
            Differentiable.
        return_state: also return the final state (B, Hq, Dk, Dv), float32 ((S, ...) packed).
        cu_seqlens: (S + 1,) int32 offsets of S sequences packed along N (B = 1), as
            flash-linear-attention's: each sequence runs alone, from its own state row.
            Sequences may be empty.
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.

    Processing a sequence in pieces, each call given the previous call's state, equals one
    call on the whole sequence.

    Examples::

        >>> q, k = torch.randn(2, 4, 100, 32), torch.randn(2, 4, 100, 32)
        >>> v = torch.randn(2, 4, 100, 16)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 4, 100, 32)) / 16   # GLA's gates
        >>> out, state = attnkit.gated_linear_attention(q, k, v, g, return_state=True)
        >>> out.shape, state.shape
        (torch.Size([2, 4, 100, 16]), torch.Size([2, 4, 32, 16]))
        >>> g = -torch.rand(2, 4, 100)                                   # one gate per token
        >>> attnkit.gated_linear_attention(q, k, v, g, initial_state=state).shape
        torch.Size([2, 4, 100, 16])
        >>> cu = torch.tensor([0, 17, 17, 100], dtype=torch.int32)       # three sequences, one empty
        >>> out, states = attnkit.gated_linear_attention(q[:1], k[:1], v[:1], g[:1], cu_seqlens=cu,
        ...                                              return_state=True)
        >>> states.shape                                                 # one state per sequence
        torch.Size([3, 4, 32, 16])
    """
    return attention(q, k, v, "gla", backend, g=g, scale=scale, initial_state=initial_state,
                     return_state=return_state, cu_seqlens=cu_seqlens)


def _gates(*shape: int):
    # logsigmoid(x + 2): decays near 0.9, as trained gates tend to be; made in float64, cast by the harness
    return lambda gen: logsigmoid(torch.randn(shape, generator=gen, dtype=torch.float64) + 2.0)


def _state(*shape: int):
    return lambda gen: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5


def gla_examples() -> list[Case]:
    return [
        Case((1, 2, 37, 16), (1, 2, 37, 16), (1, 2, 37, 16), {}, {"g": _gates(1, 2, 37)}, name="scalar_gates"),
        Case((1, 2, 70, 24), (1, 2, 70, 24), (1, 2, 70, 16), {},
             {"g": _gates(1, 2, 70, 24), "initial_state": _state(1, 2, 24, 16)}, name="channel_gates_state_2chunks"),
        Case((2, 4, 33, 16), (2, 2, 33, 16), (2, 2, 33, 8), {"scale": 0.5}, {"g": _gates(2, 4, 33, 16)},
             name="gqa_channel_gates"),
        Case((2, 2, 1, 16), (2, 2, 1, 16), (2, 2, 1, 16), {},
             {"g": _gates(2, 2, 1, 16), "initial_state": _state(2, 2, 16, 16)}, name="decode_step"),
        Case((1, 2, 53, 16), (1, 2, 53, 16), (1, 2, 53, 16), {},
             {"g": _gates(1, 2, 53), "initial_state": _state(4, 2, 16, 16),
              "cu_seqlens": packed_offsets(1, 17, 0, 35)}, name="varlen_state"),
    ]


def gla_demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, {}, {"g": _gates(*shape)}, name=f"channel_gates_n{seqlen}")


def gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor, **options: Any):
    """The Triton path of :func:`gated_linear_attention` (same arguments, no dispatch): per-channel
    gates (B, Hq, N, Dk) on :func:`attnkit.gla.kernel.gla_vector_kernel`, scalar gates (B, Hq, N)
    on the linear engine (:func:`attnkit.linear.gla_kernel`)."""
    if g.dim() == 4:
        return gla_vector_kernel(q, k, v, g, **options)
    return gla_kernel(q, k, v, g=g, **options)


def kernel_support_gla_forms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> list[str]:
    """Per-channel gates: nothing refused (their kernels tile Dk and Dv); scalar gates: the linear
    engine's limits."""
    g = options["g"]
    if isinstance(g, torch.Tensor) and g.dim() == 4:
        return []
    return kernel_support_gla(q, k, v, options)


register_variant(Variant(
    name="gla",
    reference=gla_reference,
    kernel=gla_triton,
    torch_impl=gla_torch,
    options=GLA_OPTIONS,
    validate=validate_gla,
    kernel_support=kernel_support_gla_forms,
    extra_outputs={"return_state": "state"},
    examples=gla_examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="gated linear attention (GLA, Mamba-2/SSD): data-dependent log-gates per token or channel, states",
    demo=gla_demo,
))

__all__ = ["gated_linear_attention", "gla_reference", "gla_torch"]
