"""The ``delta_rule`` variant: DeltaNet and GatedDeltaNet's (gated) delta rule.

S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale q_t S_t, as
flash-linear-attention's ``chunk_gated_delta_rule``. A reference (the recurrence, one
token at a time), a torch backend (the chunked WY/UT form) and a Triton kernel (the same
chunked form, forward and backward: kernel.py). See docs/linear.md.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import (
    Shapes,
    check_flag,
    check_log_gates,
    check_qkv,
    check_scale,
    checking_values,
)
from ..dispatch import attention
from ..linear import check_packing, check_state
from ..registry import Case, Variant, packed_offsets, register_variant
from .kernel import delta_rule_kernel, kernel_support_delta_rule
from .reference import (
    L2NORM_EPS,
    delta_rule_reference,
    l2_normalize,
    recurrent_delta_rule,
)
from .torch_backend import chunked_delta_rule, delta_rule_torch

DELTA_RULE_OPTIONS: dict[str, Any] = {"beta": None, "g": None, "scale": None, "qk_l2norm": False,
                                      "initial_state": None, "return_state": False, "cu_seqlens": None}


def _check_beta(x: Any, shapes: Shapes, q: torch.Tensor) -> None:
    """beta: a floating (B, Hq, N) tensor on q's device, every value in (0, 1]."""
    want = (shapes.batch, shapes.heads_q, shapes.seqlen_q)
    if x is None:
        raise TypeError("delta_rule_attention needs beta: a tensor of shape (B, Hq, N) of writing strengths in "
                        "(0, 1], e.g. torch.sigmoid of a projection of the input")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"beta must be a tensor of shape (B, Hq, N) = {want}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"beta must be a floating tensor of writing strengths in (0, 1], got {x.dtype}")
    if tuple(x.shape) != want:
        raise ValueError(f"beta must have shape (B, Hq, N) = {want} (one writing strength per token and query "
                         f"head), got {tuple(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"beta is on {x.device} but q is on {q.device}")
    if not checking_values():
        return
    beta = x.detach()
    inside = (beta > 0) & (beta <= 1)                                        # NaN is outside too
    if not bool(inside.all()):
        raise ValueError(f"beta must lie in (0, 1] (finite), got {int((~inside).sum())} value(s) outside it, e.g. "
                         f"{beta[~inside][:4].tolist()}")


def validate_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> Shapes:
    shapes = check_qkv(q, k, v)
    check_flag("return_state", options["return_state"])
    check_flag("qk_l2norm", options["qk_l2norm"])
    check_scale(options["scale"], shapes.head_dim)
    if shapes.seqlen_q != shapes.seqlen_k:
        raise ValueError(f"the delta rule is causal and needs Nq == Nk (got {shapes.seqlen_q} and {shapes.seqlen_k}); "
                         "to continue a sequence, pass its state as initial_state")
    _check_beta(options["beta"], shapes, q)
    if options["g"] is not None:  # one log-gate per token and head (no per-channel form here)
        check_log_gates("g", options["g"], shapes, q)
    sequences = check_packing(dict(options, cu_seqlens_q=None, cu_seqlens_k=None), shapes, q, True)
    check_state(options["initial_state"], shapes, shapes.head_dim, shapes.head_dim_v, q, sequences=sequences)
    return shapes


def delta_rule_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         g: torch.Tensor | None = None, scale: float | None = None, qk_l2norm: bool = False,
                         initial_state: torch.Tensor | None = None, return_state: bool = False,
                         cu_seqlens: torch.Tensor | None = None, backend: str = "auto"):
    """The (gated) delta rule: DeltaNet (Yang et al. 2024) and GatedDeltaNet (Yang et al. 2025).

    Per query head, with a state S of shape (Dk, Dv) and k_t, q_t, v_t rows:
    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale q_t S_t: each
    token replaces a beta_t share of the value stored under its key, after the state decays by
    exp(g_t). These are the semantics of flash-linear-attention's ``chunk_gated_delta_rule``
    (g None: ``chunk_delta_rule``). The update is stable for unit-norm keys: L2-normalise q
    and k first, or pass ``qk_l2norm=True``.

    Args:
        q: (B, Hq, N, Dk). k: (B, Hkv, N, Dk). v: (B, Hkv, N, Dv); Hkv divides Hq (query head
            h reads kv head h // (Hq // Hkv)).
        beta: (B, Hq, N) writing strengths in (0, 1] (models take sigmoid of a projection).
            Differentiable.
        g: (B, Hq, N) log-gates <= 0 (the state decays by exp(g_t)), or None (plain DeltaNet,
            no decay). Differentiable.
        scale: multiplies q_t S_t; None means Dk^-1/2 (flash-linear-attention's default).
        qk_l2norm: L2-normalise q and k over Dk first, x / sqrt(sum(x^2) + 1e-6), as
            flash-linear-attention's ``use_qk_l2norm_in_kernel``.
        initial_state: (B, Hq, Dk, Dv), float32 or q's dtype, the state after a previous
            piece of the sequence (default zeros); (S, Hq, Dk, Dv) for S packed sequences.
            Differentiable.
        return_state: also return the final state (B, Hq, Dk, Dv), float32 ((S, ...) packed).
        cu_seqlens: (S + 1,) int32 offsets of S sequences packed along N (B = 1), as
            flash-linear-attention's: each sequence runs alone, with its own state row.
        backend: "auto", "triton", "torch" or "reference" (see ``attnkit.explain``).

    Returns:
        out (B, Hq, N, Dv) in q's dtype, or (out, state) with ``return_state``.

    The torch backend computes in chunks of 64 rows with the WY/UT representation (one
    triangular solve per chunk, then a loop over chunks for the state; docs/linear.md);
    processing a sequence in pieces, each call given the previous call's state, equals one
    call on the whole sequence.

    Examples::

        >>> q, k, v = (torch.randn(2, 4, 100, 32) for _ in range(3))
        >>> beta = torch.rand(2, 4, 100) * 0.9 + 0.1
        >>> g = -torch.rand(2, 4, 100) * 0.1
        >>> out, state = attnkit.delta_rule_attention(q, k, v, beta, g=g, qk_l2norm=True, return_state=True)
        >>> out.shape, state.shape
        (torch.Size([2, 4, 100, 32]), torch.Size([2, 4, 32, 32]))
        >>> cu = torch.tensor([0, 17, 17, 100], dtype=torch.int32)     # three sequences, one empty
        >>> out, state = attnkit.delta_rule_attention(q[:1], k[:1], v[:1], beta[:1], cu_seqlens=cu,
        ...                                           qk_l2norm=True, return_state=True)
        >>> state.shape                                                   # one state per sequence
        torch.Size([3, 4, 32, 32])
    """
    return attention(q, k, v, "delta_rule", backend, beta=beta, g=g, scale=scale, qk_l2norm=qk_l2norm,
                     initial_state=initial_state, return_state=return_state, cu_seqlens=cu_seqlens)


def _beta(*shape: int):
    return lambda gen: torch.rand(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.1


def _gates(*shape: int):
    return lambda gen: -torch.rand(shape, generator=gen, dtype=torch.float64) * 0.3


def _state(*shape: int):
    return lambda gen: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5


def delta_rule_examples() -> list[Case]:
    # q and k ~ N(0, 1) from the harness: qk_l2norm keeps the delta rule's update contractive
    norm = {"qk_l2norm": True}
    return [
        Case((1, 2, 37, 16), (1, 2, 37, 16), (1, 2, 37, 16), norm, {"beta": _beta(1, 2, 37)}, name="deltanet"),
        Case((2, 2, 45, 16), (2, 2, 45, 16), (2, 2, 45, 24), norm,
             {"beta": _beta(2, 2, 45), "g": _gates(2, 2, 45), "initial_state": _state(2, 2, 16, 24)},
             name="gated_state_dv24"),
        Case((1, 4, 33, 16), (1, 2, 33, 16), (1, 2, 33, 16), dict(norm, scale=0.5),
             {"beta": _beta(1, 4, 33), "g": _gates(1, 4, 33)}, name="gqa_gated"),
        Case((1, 2, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16), norm,
             {"beta": _beta(1, 2, 1), "g": _gates(1, 2, 1), "initial_state": _state(1, 2, 16, 16)},
             name="decode_step"),
        Case((1, 2, 53, 16), (1, 2, 53, 16), (1, 2, 53, 8), norm,
             {"beta": _beta(1, 2, 53), "g": _gates(1, 2, 53), "initial_state": _state(4, 2, 16, 8),
              "cu_seqlens": packed_offsets(1, 17, 0, 35)}, name="varlen_gated_state"),
    ]


def delta_rule_demo(batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
    shape = (batch, heads, seqlen, head_dim)
    return Case(shape, shape, shape, {"qk_l2norm": True},
                {"beta": _beta(batch, heads, seqlen), "g": _gates(batch, heads, seqlen)}, name=f"gated_n{seqlen}")


register_variant(Variant(
    name="delta_rule",
    reference=delta_rule_reference,
    kernel=delta_rule_kernel,
    kernel_support=kernel_support_delta_rule,
    torch_impl=delta_rule_torch,
    options=DELTA_RULE_OPTIONS,
    validate=validate_delta_rule,
    extra_outputs={"return_state": "state"},
    examples=delta_rule_examples,
    status={"reference": True, "forward": True, "backward": True},
    doc="(gated) delta rule (DeltaNet, GatedDeltaNet): beta-weighted state replacement, log-gates, states",
    demo=delta_rule_demo,
))

__all__ = ["L2NORM_EPS", "chunked_delta_rule", "delta_rule_attention", "delta_rule_reference", "l2_normalize",
           "recurrent_delta_rule"]
