"""flash-linear-attention's chunk ops on attnkit: swap one import line.

``from attnkit.compat.fla import chunk_gla`` takes the arguments, layouts, defaults and
return values of ``fla.ops.gla.chunk_gla`` (flash-linear-attention 0.5) and runs attnkit's
ops; likewise ``chunk_simple_gla`` and ``fused_recurrent_simple_gla`` (``fla.ops.simple_gla``),
``chunk_gated_delta_rule`` (``fla.ops.gated_delta_rule``) and ``chunk_linear_attn``
(``fla.ops.linear_attn``):

=============================  ===========================================================
``chunk_simple_gla``           ``g``: :func:`attnkit.gated_linear_attention` (a gate per
``fused_recurrent_simple_gla``  token); ``g_gamma``: :func:`attnkit.linear_attention` with
                               ``decay=-g_gamma``; neither: ``linear_attention`` undecayed
``chunk_gla``                  :func:`attnkit.gated_linear_attention` (a gate per channel)
``chunk_gated_delta_rule``     :func:`attnkit.delta_rule_attention`
``chunk_linear_attn``          :func:`attnkit.linear_attention`, fla's normalisation after it
=============================  ===========================================================

Semantics, as flash-linear-attention's:

* tensors (B, T, H, D) (``head_first`` was removed from fla: passing it is a TypeError), read
  as (B, H, T, D) views; the output (B, T, H, V) is contiguous, as fla's (one copy);
* ``scale`` multiplies q, default ``K ** -0.5``; log-gates ``g`` <= 0 (the state decays by
  ``exp(g)``); states (N, H, K, V) float32, (N, H, V, K) with ``state_v_first=True``, one row
  per batch entry or per packed sequence; returns ``(o, final_state)``, ``final_state`` None
  without ``output_final_state``;
* ``cu_seqlens`` (N + 1,) int64 (fla's LongTensor) or int32 offsets of N sequences packed
  along T with B = 1; read as attnkit's int32 offsets.

Each function runs with the module's :data:`backend` ("auto": the Triton kernels on CUDA
tensors they support, the torch backend otherwise). Gradients reach every tensor input that
fla differentiates (q, k, v, g, beta, initial_state, A_log, dt_bias) and ``g_gamma`` too.
Arguments attnkit cannot honour raise an error naming them; those without an effect on the
result (``chunk_size``, ``cu_seqlens_cpu``, ``chunk_indices``) are checked and accepted.
docs/compat.md has the full table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._reference import expand_kv_heads
from ..checks import check_flag, check_head_vector, check_scale, checking_values
from ..delta_rule import delta_rule_attention
from ..gla import gated_linear_attention
from ..linear import linear_attention
from .flash_attn import _tensor

#: the attnkit backend every function here runs with ("auto": the kernels on CUDA tensors they
#: support, the torch backend otherwise; "triton" insists on the kernels; see ``attnkit.explain``)
backend = "auto"

__all__ = ["chunk_gated_delta_rule", "chunk_gla", "chunk_linear_attn", "chunk_simple_gla",
           "fused_recurrent_simple_gla"]

Result = tuple[torch.Tensor, Any]


# ----------------------------------------------------------------------------- argument translation

def _options(function: str, kwargs: dict[str, Any], state_v_first: bool, *,
             chunk_sizes: tuple[int, ...] | None = None) -> bool:
    """fla's keyword-only extras: ``chunk_size`` where fla takes it (one of ``chunk_sizes``, or
    any power of two for an empty tuple, as fla checks it; attnkit picks its own chunks, which
    changes rounding only) and ``transpose_state_layout`` (fla's deprecated name of
    ``state_v_first``). ``head_first`` and any other name raise. Returns ``state_v_first``."""
    if "head_first" in kwargs:
        raise TypeError(f"{function}: head_first was removed from flash-linear-attention; pass (B, T, H, ...) "
                        "tensors (attnkit's own ops take (B, H, T, ...))")
    if chunk_sizes is not None and "chunk_size" in kwargs:
        size = kwargs.pop("chunk_size")
        power = isinstance(size, int) and not isinstance(size, bool) and size > 0 and size & (size - 1) == 0
        if size is not None and not (power and (size in chunk_sizes or not chunk_sizes)):
            raise ValueError(f"{function}: chunk_size must be {chunk_sizes or 'a power of two'}, got {size!r}")
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("pass state_v_first or its deprecated name transpose_state_layout, not both")
        state_v_first = kwargs.pop("transpose_state_layout")
    if kwargs:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {sorted(kwargs)}")
    return check_flag("state_v_first", state_v_first)


def _offsets(cu_seqlens: object) -> torch.Tensor | None:
    """fla's int64 offsets as attnkit's int32 ones (other dtypes go on to attnkit's check)."""
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype == torch.int64:
        if checking_values() and cu_seqlens.numel() and int(cu_seqlens.max()) >= 2 ** 31:
            raise ValueError(f"cu_seqlens must be below 2**31, got {int(cu_seqlens.max())}")
        return cu_seqlens.to(torch.int32)
    return cu_seqlens  # type: ignore[return-value]


def _qkv(q: object, k: object, v: object, heads: str = "H") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (B, T, H, K) and v (B, T, H, V) as tensors of rank 4 (the rest is the op's to check)."""
    return (_tensor("q", q, 4, "(B, T, H, K)"), _tensor("k", k, 4, "(B, T, H, K)"),
            _tensor("v", v, 4, f"(B, T, {heads}, V)"))


def _heads_major(*xs: torch.Tensor | None) -> list[Any]:
    """(B, T, H, ...) tensors as (B, H, T, ...) views (no copy)."""
    return [None if x is None else x.transpose(1, 2) for x in xs]


def _state(x: Any, state_v_first: bool) -> Any:
    """A state between fla's (N, H, V, K) ``state_v_first`` layout and attnkit's (N, H, K, V)."""
    return x.transpose(-1, -2) if state_v_first and isinstance(x, torch.Tensor) else x


def _flip(*xs: Any) -> list[Any]:
    """The time axis (dim 1 of (B, T, ...)) reversed; packed, that also reverses the order of
    the sequences, so each sequence runs backwards as if alone (fla's ``reverse``)."""
    return [None if x is None else x.flip(1) for x in xs]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it is float64 (the dtype of attnkit's states)."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _result(out: Any, output_final_state: bool, state_v_first: bool) -> Result:
    """attnkit's out (B, H, T, V) [and state] as fla's (o (B, T, H, V) contiguous, final_state)."""
    if not output_final_state:
        return out.transpose(1, 2).contiguous(), None
    o, state = out
    return o.transpose(1, 2).contiguous(), _state(state, state_v_first).contiguous()


def _log_decay(g_gamma: object, heads: int, like: torch.Tensor) -> torch.Tensor:
    """``g_gamma`` (H,): a log-decay <= 0 per head (the state decays by exp(g_gamma[h]))."""
    x = check_head_vector("g_gamma", g_gamma, heads, like)
    if checking_values() and not bool(((x <= 0) & torch.isfinite(x)).all()):
        raise ValueError(f"g_gamma must hold finite log-decays <= 0 (the state decays by exp(g_gamma) <= 1), "
                         f"got {x.detach().tolist()}")
    return x


# ----------------------------------------------------------------------------- simple GLA

def _simple_gla(function: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                g_gamma: torch.Tensor | None, scale: float | None, initial_state: torch.Tensor | None,
                output_final_state: bool, state_v_first: bool, cu_seqlens: torch.Tensor | None,
                reverse: bool = False) -> Result:
    """One gate per token (``g`` (B, T, H)), one per head (``g_gamma`` (H,)) or none."""
    q, k, v = _qkv(q, k, v)
    if g is not None:
        # per-channel gates (B, T, H, K) are chunk_gla's; fla's simple GLA reads g as (B, T, H)
        g = _tensor("g", g, 3, "(B, T, H): one log-gate per token and head (per-channel gates: chunk_gla)")
    check_flag("output_final_state", output_final_state)
    if check_flag("reverse", reverse):
        # fla's reverse recurrence runs from the last token back: the same as running the
        # sequence (each packed sequence) backwards, which flipping T does; the states' rows
        # follow the sequences' order, reversed with it
        cu = _offsets(cu_seqlens)
        q, k, v, g = _flip(q, k, v, g)
        if isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel():  # (malformed: attnkit's check says so)
            cu_seqlens = cu[-1] - cu.flip(0)
            if isinstance(initial_state, torch.Tensor):
                initial_state = initial_state.flip(0)
    options: dict[str, Any] = {"scale": scale, "initial_state": _state(initial_state, state_v_first),
                               "return_state": output_final_state, "cu_seqlens": _offsets(cu_seqlens),
                               "backend": backend}
    qh, kh, vh = _heads_major(q, k, v)
    if g is not None and g_gamma is not None:
        raise ValueError(f"{function}: pass g (a gate per token) or g_gamma (a decay per head), not both")
    if g is not None:
        out = gated_linear_attention(qh, kh, vh, g.transpose(1, 2), **options)
    else:
        decay = None if g_gamma is None else -_log_decay(g_gamma, q.shape[2], q)
        out = linear_attention(qh, kh, vh, decay=decay, **options)
    o, state = _result(out, output_final_state, state_v_first)
    if reverse:
        o = o.flip(1)
        if state is not None and cu_seqlens is not None:  # the rows back in the sequences' order
            state = state.flip(0)
    return o, state


def chunk_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                     g_gamma: torch.Tensor | None = None, scale: float | None = None,
                     initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                     state_v_first: bool = False, cu_seqlens: torch.Tensor | None = None,
                     cu_seqlens_cpu: torch.Tensor | None = None, **kwargs: Any) -> Result:
    """flash-linear-attention's ``chunk_simple_gla`` on attnkit (Mamba-2/SSD, simple GLA).

    Per head: S_t = exp(g_t) S_{t-1} + k_t^T v_t (S of shape (K, V)), o_t = scale q_t S_t.

    Args:
        q, k: (B, T, H, K). v: (B, T, H, V) (attnkit also takes fewer k/v heads: GQA).
        g: (B, T, H) log-gates <= 0, one per token and head: runs
            :func:`attnkit.gated_linear_attention`. Differentiable.
        g_gamma: (H,) log-decays <= 0, one per head, fixed over time: runs
            :func:`attnkit.linear_attention` with ``decay=-g_gamma`` (Lightning Attention's
            kernel). Only one of g and g_gamma; neither is undecayed linear attention.
        scale: multiplies q; default K ** -0.5.
        initial_state: (N, H, K, V) ((N, H, V, K) with ``state_v_first``), float32 or q's
            dtype, one row per batch entry (N = B) or per packed sequence.
        output_final_state: also return the final state, float32, in the same layout.
        state_v_first: states as (N, H, V, K).
        cu_seqlens: (N + 1,) int64 (or int32) offsets of N sequences packed along T (B = 1).
        cu_seqlens_cpu: accepted (fla's host copy of cu_seqlens); attnkit reads cu_seqlens.
        **kwargs: ``chunk_size`` (a power of two, as fla checks it; attnkit picks its own
            chunks). ``head_first`` and other names raise TypeError.

    Returns:
        (o (B, T, H, V) in q's dtype, final_state or None).

    Examples::

        >>> from attnkit.compat.fla import chunk_simple_gla
        >>> q, k, v = torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 32), torch.randn(2, 100, 4, 16)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 100, 4))
        >>> o, ht = chunk_simple_gla(q, k, v, g, output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 32, 16]))
    """
    state_v_first = _options("chunk_simple_gla", kwargs, state_v_first, chunk_sizes=())
    return _simple_gla("chunk_simple_gla", q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                       state_v_first, cu_seqlens)


def fused_recurrent_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                               g_gamma: torch.Tensor | None = None, scale: float | None = None,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                               reverse: bool = False, state_v_first: bool = False,
                               cu_seqlens: torch.Tensor | None = None, **kwargs: Any) -> Result:
    """flash-linear-attention's ``fused_recurrent_simple_gla`` on attnkit: the same recurrence
    as :func:`chunk_simple_gla`, the same arguments and results.

    attnkit runs it on the same ops (a call with T = 1 is a decoding step, which takes the
    recurrent kernel). ``reverse=True`` runs the recurrence from the last token back (each
    packed sequence from its own end): attnkit flips T (a copy of q, k, v, g and o) and, with
    ``cu_seqlens``, the order of the sequences and of the state rows. ``**kwargs``:
    ``transpose_state_layout`` (fla's old name of ``state_v_first``); others raise TypeError.

    Examples::

        >>> from attnkit.compat.fla import fused_recurrent_simple_gla
        >>> q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 4, 32), torch.randn(2, 1, 4, 16)
        >>> g, h = -torch.rand(2, 1, 4), torch.zeros(2, 4, 32, 16)
        >>> o, h = fused_recurrent_simple_gla(q, k, v, g, initial_state=h, output_final_state=True)
        >>> o.shape
        torch.Size([2, 1, 4, 16])
    """
    state_v_first = _options("fused_recurrent_simple_gla", kwargs, state_v_first)
    return _simple_gla("fused_recurrent_simple_gla", q, k, v, g, g_gamma, scale, initial_state,
                       output_final_state, state_v_first, cu_seqlens, reverse)


# ----------------------------------------------------------------------------- GLA

def chunk_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              state_v_first: bool = False, cu_seqlens: torch.Tensor | None = None,
              cu_seqlens_cpu: torch.Tensor | None = None) -> Result:
    """flash-linear-attention's ``chunk_gla`` on :func:`attnkit.gated_linear_attention`.

    Per head: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t (row d of S decays by exp(g_t[d])),
    o_t = scale q_t S_t.

    Args:
        q, k: (B, T, H, K). v: (B, T, H, V).
        g: (B, T, H, K) log-gates <= 0, one per key channel (GLA, HGRN-2). Differentiable.
        scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu:
            as :func:`chunk_simple_gla`.

    Returns:
        (o (B, T, H, V), final_state (N, H, K, V) float32 or None).

    Examples::

        >>> from attnkit.compat.fla import chunk_gla
        >>> q, k, v = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 8)
        >>> g = torch.nn.functional.logsigmoid(torch.randn(1, 64, 2, 16)) / 16
        >>> cu = torch.tensor([0, 20, 64])                  # two sequences, fla's int64 offsets
        >>> o, ht = chunk_gla(q, k, v, g, cu_seqlens=cu, output_final_state=True)
        >>> ht.shape
        torch.Size([2, 2, 16, 8])
    """
    q, k, v = _qkv(q, k, v)
    g = _tensor("g", g, 4, "(B, T, H, K): one log-gate per key channel (one per token: chunk_simple_gla)")
    check_flag("output_final_state", output_final_state)
    check_flag("state_v_first", state_v_first)
    qh, kh, vh, gh = _heads_major(q, k, v, g)
    out = gated_linear_attention(qh, kh, vh, gh, scale=scale, initial_state=_state(initial_state, state_v_first),
                                 return_state=output_final_state, cu_seqlens=_offsets(cu_seqlens), backend=backend)
    return _result(out, output_final_state, state_v_first)


# ----------------------------------------------------------------------------- gated delta rule

def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                           beta: torch.Tensor, scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                           use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
                           state_v_first: bool = False, cu_seqlens: torch.Tensor | None = None,
                           cu_seqlens_cpu: torch.Tensor | None = None, chunk_indices: torch.Tensor | None = None,
                           cp_context: Any = None, **kwargs: Any) -> Result:
    """flash-linear-attention's ``chunk_gated_delta_rule`` on :func:`attnkit.delta_rule_attention`.

    Per value head: S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
    o_t = scale q_t S_t (GatedDeltaNet; ``g=None`` is DeltaNet, fla's ``chunk_delta_rule``).

    Args:
        q, k: (B, T, H, K). v: (B, T, HV, V), HV a multiple of H (fla's GVA: value head i reads
            q/k head i // (HV // H); attnkit repeats q and k to HV heads, a copy).
        g: (B, T, HV) log-gates <= 0, or None. With ``use_gate_in_kernel=True`` (a keyword)
            the raw input: g becomes ``-exp(A_log) * softplus(g + dt_bias)`` (Mamba-2's gate).
        beta: (B, T, HV) writing strengths in (0, 1], or logits with
            ``use_beta_sigmoid_in_kernel`` (beta becomes sigmoid(beta)).
        scale: multiplies q; default K ** -0.5.
        initial_state: (N, HV, K, V) ((N, HV, V, K) with ``state_v_first``).
        output_final_state: also return the final state, float32.
        use_qk_l2norm_in_kernel: L2-normalise q and k first (``x / sqrt(sum(x^2) + 1e-6)``).
        allow_neg_eigval: beta = 2 sigmoid(beta) in (0, 2): not supported (attnkit's delta rule
            takes beta in (0, 1]), NotImplementedError.
        state_v_first: states as (N, HV, V, K).
        cu_seqlens: (N + 1,) int64 (or int32) offsets of N sequences packed along T (B = 1).
        cu_seqlens_cpu, chunk_indices: accepted (fla's precomputed forms of cu_seqlens).
        cp_context: context parallelism is not supported (NotImplementedError).
        **kwargs: ``chunk_size`` (16, 32 or 64, as fla checks it; attnkit picks its own chunks),
            ``use_gate_in_kernel``, ``A_log`` (HV,), ``dt_bias`` (HV,), ``transpose_state_layout``.

    Returns:
        (o (B, T, HV, V) in q's dtype, final_state or None).

    Examples::

        >>> from attnkit.compat.fla import chunk_gated_delta_rule
        >>> q, k = torch.randn(2, 100, 2, 32), torch.randn(2, 100, 2, 32)
        >>> v = torch.randn(2, 100, 4, 16)                               # GVA: 4 value heads
        >>> g, beta = -torch.rand(2, 100, 4) * 0.1, torch.rand(2, 100, 4) * 0.9 + 0.1
        >>> o, ht = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
        ...                                output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 32, 16]))
    """
    use_gate = kwargs.pop("use_gate_in_kernel", False)
    A_log, dt_bias = kwargs.pop("A_log", None), kwargs.pop("dt_bias", None)
    state_v_first = _options("chunk_gated_delta_rule", kwargs, state_v_first, chunk_sizes=(16, 32, 64))
    if cp_context is not None:
        raise NotImplementedError("cp_context: attnkit.compat.fla has no context parallelism; attnkit's own "
                                  "attnkit.distributed splits a sequence over ranks")
    check_flag("output_final_state", output_final_state)
    check_flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    if check_flag("allow_neg_eigval", allow_neg_eigval):
        if not check_flag("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel):
            raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True (as in fla)")
        raise NotImplementedError("allow_neg_eigval=True (beta = 2 sigmoid(beta) in (0, 2)): attnkit's delta rule "
                                  "takes beta in (0, 1]")
    q, k, v = _qkv(q, k, v, "HV")
    beta = _tensor("beta", beta, 3, "(B, T, HV)")
    if g is not None:
        g = _tensor("g", g, 3, "(B, T, HV)")
    heads, value_heads = q.shape[2], v.shape[2]
    if k.shape[2] != heads:
        raise ValueError(f"q and k must have the same number of heads, got {heads} and {k.shape[2]}")
    if heads == 0 or value_heads % heads:
        raise ValueError(f"v's heads (HV = {value_heads}) must be a multiple of q's and k's (H = {heads}) "
                         "(fla's GVA)")
    if check_flag("use_gate_in_kernel", use_gate):
        if A_log is None:
            raise ValueError("use_gate_in_kernel=True needs A_log, a tensor of shape (HV,)")
        if g is None:
            raise ValueError("use_gate_in_kernel=True needs g, the raw gate input of shape (B, T, HV)")
        gate = _wide(g) + (0 if dt_bias is None else _wide(check_head_vector("dt_bias", dt_bias, value_heads, g)))
        g = -_wide(check_head_vector("A_log", A_log, value_heads, g)).exp() * F.softplus(gate)
    elif A_log is not None or dt_bias is not None:
        raise ValueError("A_log and dt_bias go with use_gate_in_kernel=True (g then holds the raw gate input)")
    if check_flag("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel):
        beta = torch.sigmoid(beta)
    qh, kh, vh, gh, bh = _heads_major(q, k, v, g, beta)
    # GVA is GQA with the roles swapped: every value head gets its own copy of its q/k head
    qh, kh = expand_kv_heads(qh, value_heads), expand_kv_heads(kh, value_heads)
    out = delta_rule_attention(qh, kh, vh, bh, g=gh, scale=scale, qk_l2norm=use_qk_l2norm_in_kernel,
                               initial_state=_state(initial_state, state_v_first), return_state=output_final_state,
                               cu_seqlens=_offsets(cu_seqlens), backend=backend)
    return _result(out, output_final_state, state_v_first)


# ----------------------------------------------------------------------------- linear attention

def _normalized(o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, z0: torch.Tensor | None,
                cu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``normalize_with_z_state``: o_t / (scale q_t . z_t + 1e-10), z_t = z0 + the sum of
    the sequence's k_s for s <= t (no decay). q, o (B, H, T, .), k (B, H, T, K) with q's heads,
    z0 (N, 1, H, K) fla's layout or None. Returns o and z at each sequence's end (N, 1, H, K)."""
    ks, work = _wide(k), _wide(k).dtype
    if cu is None:  # one sequence per batch entry
        start = ks.new_zeros(ks.shape[0], ks.shape[1], 1, ks.shape[3]) if z0 is None else z0.to(work).transpose(1, 2)
        z = start + ks.cumsum(2)
        end = z[:, :, -1] if z.shape[2] else start[:, :, 0]
    else:  # each packed sequence from its own z0 row
        sums, ends = [], []
        for n, piece in enumerate(ks.split((cu[1:] - cu[:-1]).tolist(), dim=2)):
            start = ks.new_zeros(1, ks.shape[1], 1, ks.shape[3]) if z0 is None else z0[n:n + 1].to(work).transpose(1, 2)
            sums.append(start + piece.cumsum(2))
            ends.append(sums[-1][:, :, -1] if piece.shape[2] else start[:, :, 0])
        z, end = torch.cat(sums, dim=2), torch.cat(ends)
    denom = scale * (q.to(work) * z).sum(-1, keepdim=True) + 1e-10
    return (o.to(work) / denom).to(o.dtype), end[:, None]


def chunk_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      initial_state: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
                      output_final_state: bool = False, normalize: bool = True,
                      cu_seqlens: torch.Tensor | None = None) -> Result:
    """flash-linear-attention's ``chunk_linear_attn`` on :func:`attnkit.linear_attention`.

    S_t = S_{t-1} + k_t^T v_t, o_t = scale q_t S_t (no feature map, no decay: apply a feature
    map to q and k first, or use ``attnkit.linear_attention(feature_map=...)``).

    Args:
        q, k: (B, T, H, K). v: (B, T, H, V).
        scale: multiplies q; default K ** -0.5.
        initial_state: normalize=False: (N, H, K, V). normalize=True: a tuple
            ``(kv_state, z_state)`` with z_state (N, 1, H, K), or a tensor (then z starts at 0).
        output_final_state: also return the final kv state (float32).
        normalize: (default True, as fla) o_t / (scale q_t . z_t + 1e-10), z_t the running sum
            of the sequence's keys (undecayed), computed after attnkit's op.
        cu_seqlens: (N + 1,) int64 (or int32) offsets of N sequences packed along T (B = 1).

    Returns:
        normalize=False: (o (B, T, H, V), final_state or None). normalize=True:
        (o, (final_state or None, z_state (N, 1, H, K) float32)), as fla returns it.

    Examples::

        >>> from attnkit.compat.fla import chunk_linear_attn
        >>> q, k, v = (torch.randn(2, 50, 4, 16).relu() for _ in range(3))
        >>> o, (ht, z) = chunk_linear_attn(q, k, v, output_final_state=True)
        >>> o, (ht, z) = chunk_linear_attn(q, k, v, initial_state=(ht, z), output_final_state=True)
        >>> ht.shape, z.shape
        (torch.Size([2, 4, 16, 16]), torch.Size([2, 1, 4, 16]))
    """
    q, k, v = _qkv(q, k, v)
    check_flag("output_final_state", output_final_state)
    if check_flag("normalize", normalize) and isinstance(initial_state, tuple):
        if len(initial_state) != 2:
            raise ValueError(f"initial_state must be a pair (kv_state, z_state) with normalize=True, got "
                             f"{len(initial_state)} entries")
        kv0, z0 = initial_state
    elif isinstance(initial_state, tuple):
        raise TypeError("initial_state must be a tensor (N, H, K, V) with normalize=False (a (kv_state, z_state) "
                        "pair is normalize=True's)")
    else:
        kv0, z0 = initial_state, None
    cu = _offsets(cu_seqlens)
    qh, kh, vh = _heads_major(q, k, v)
    out = linear_attention(qh, kh, vh, scale=scale, initial_state=kv0, return_state=output_final_state,
                           cu_seqlens=cu, backend=backend)
    o, state = _result(out, output_final_state, False)
    if not normalize:
        return o, state
    rows = q.shape[0] if cu is None else cu.numel() - 1
    if z0 is not None:
        z0 = _tensor("z_state", z0, 4, "(N, 1, H, K)")
        if tuple(z0.shape) != (rows, 1, q.shape[2], q.shape[3]):
            raise ValueError(f"z_state (initial_state[1]) must have shape (N, 1, H, K) = "
                             f"{(rows, 1, q.shape[2], q.shape[3])}, got {tuple(z0.shape)}")
    # the normalisation in (B, H, T, .): fla's keys, expanded to q's heads under attnkit's GQA
    normed, z = _normalized(o.transpose(1, 2), qh, expand_kv_heads(kh, q.shape[2]),
                            check_scale(scale, q.shape[-1]), z0, cu)
    return normed.transpose(1, 2).contiguous(), (state, z)
