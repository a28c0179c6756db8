"""Backend choice and the generic entry point ``attnkit.attention``.

``backend="auto"`` runs the Triton kernel when the tensors are on a CUDA device and
the variant's kernel supports the inputs, and otherwise the variant's torch backend
(the PyTorch reference for a variant without one).
``backend="triton"`` insists on the kernel (and raises with every reason when it
cannot run); on CPU tensors it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernels are first imported).
``backend="torch"`` runs the variant's fast PyTorch implementation (torch's fused
primitives, same semantics as the reference, in the input dtype): ``"auto"`` takes it
wherever the Triton kernel does not run (CPU, MPS, CUDA inputs the kernel refuses).
``backend="reference"`` runs the PyTorch specification, upcasting float16/bfloat16
to float32 for accuracy. :func:`explain` tells which backend a call would take and why
(docs/architecture.md, Backends and dispatch).

``layout="bshd"`` takes q, k, v with the heads after the sequence, (B, N, H, D) as
flash-attn and Hugging Face hold them: they become (B, H, N, D) *views* here, once for
every variant (the kernels read strides, so nothing is copied), and the output goes back
to (B, N, H, Dv) as a view. LSEs, states and key scores keep their head-major shapes,
as flash-attn's ``softmax_lse`` (B, H, N).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import Shapes, constant_under_compile
from .registry import Variant, get_variant

BACKENDS = ("auto", "triton", "torch", "reference")
#: where the heads sit in q, k, v and the output: "bhsd" (B, H, N, D), attnkit's own, or
#: "bshd" (B, N, H, D), flash-attn's and Hugging Face's. Spatial variants read the rule as
#: "heads second to last": (B, *spatial, H, D).
LAYOUTS = ("bhsd", "bshd")


_TRITON_ERROR: str | None = None


@constant_under_compile
def triton_import_error() -> str:
    """Empty when triton imports, else the reason it does not."""
    global _TRITON_ERROR
    if _TRITON_ERROR is None:
        try:
            import triton  # noqa: F401

            _TRITON_ERROR = ""
        except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install raising anything
            _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"
    return _TRITON_ERROR


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Explanation:
    """Which backend a call takes and why. ``kernel_blockers`` lists every reason the
    Triton kernel cannot run these inputs (empty when it can)."""

    variant: str
    requested: str
    backend: str
    reasons: list[str] = field(default_factory=list)
    kernel_blockers: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.variant}: backend={self.requested!r} -> {self.backend}"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _kernel_blockers(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     options: dict[str, Any]) -> list[str]:
    reasons: list[str] = []
    if variant.kernel is None:
        return [f"variant {variant.name!r} has no Triton kernel"]
    err = triton_import_error()
    if err:
        reasons.append(err)
    if q.device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("tensors are on cpu: Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
                           "set before import to run them through the interpreter")
    elif q.device.type != "cuda":
        reasons.append(f"tensors are on {q.device.type}: Triton kernels here support CUDA devices only")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} is not supported by the kernel (float16, bfloat16 or float32)")
    reasons.extend(variant.kernel_support(q, k, v, options))
    return reasons


#: why an empty problem takes the reference on every backend
EMPTY_REASON = ("empty inputs (no batch entry, query head, query or key): there is nothing for a kernel to "
                "compute; the reference gives the result (empty outputs; zeros and LSE -inf when Nk = 0), "
                "with its autograd graph, on every backend")


def _decide(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
            backend: str, empty: bool = False) -> Explanation:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    blockers = _kernel_blockers(variant, q, k, v, options)
    if empty:  # one place for every variant: no kernel is launched on an empty grid
        return Explanation(variant.name, backend, "reference", [EMPTY_REASON], blockers)
    if backend == "reference":
        return Explanation(variant.name, backend, "reference", ["requested explicitly"], blockers)
    if backend == "triton":
        if blockers:
            return Explanation(variant.name, backend, "error", blockers, blockers)
        how = "through the Triton interpreter" if q.device.type == "cpu" else "natively"
        return Explanation(variant.name, backend, "triton", [f"requested explicitly; runs {how}"], blockers)
    if backend == "torch":
        if variant.torch_impl is None:
            reason = f"variant {variant.name!r} has no torch implementation"
            return Explanation(variant.name, backend, "error", [reason], blockers + [reason])
        return Explanation(variant.name, backend, "torch", ["requested explicitly"], blockers)
    # auto: the kernel where it runs natively, else the torch backend, else the reference
    fallback = "torch" if variant.torch_impl is not None else "reference"
    # say what the fallback is: torch's fused kernels, or the (slow) specification
    took = (["auto runs the torch backend (torch's fused kernels, the reference's semantics)"]
            if fallback == "torch" else [])
    if blockers:
        return Explanation(variant.name, backend, fallback, blockers + took, blockers)
    if q.device.type == "cpu":
        return Explanation(variant.name, backend, fallback,
                           [("tensors are on cpu: auto does not use the (slow) interpreter; "
                             "pass backend='triton' to run the kernel through it")] + took, blockers)
    return Explanation(variant.name, backend, "triton",
                       [f"tensors are on {q.device}, the kernel supports these inputs"], blockers)


def check_layout(layout: object) -> str:
    """``layout`` itself, or a ValueError naming it and the known layouts."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (\"bhsd\": q (B, H, N, D); \"bshd\": q (B, N, H, D), "
                         f"as flash-attn), got {layout!r}")
    return layout


def heads_major(layout: str, *tensors: Any) -> tuple[Any, ...]:
    """The (B, H, N, D) views of q, k, v given in ``layout`` (no copy: the heads dim moves
    from second to last to second). Anything that is not a tensor of rank >= 3 passes
    unchanged, for validate to name."""
    if check_layout(layout) == "bhsd":
        return tensors
    return tuple(t.movedim(-2, 1) if isinstance(t, torch.Tensor) and t.dim() >= 3 else t for t in tensors)


def output_layout(layout: str, result: Any) -> Any:
    """A call's result with its output (the first entry) back in ``layout``, as a view; the
    extra outputs (LSE (B, H, N), states, key scores) keep their head-major shapes."""
    if layout == "bhsd":
        return result
    if isinstance(result, tuple):
        return (result[0].movedim(1, -2),) + tuple(result[1:])
    return result.movedim(1, -2)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
            *, layout: str = "bhsd", **options: Any) -> Explanation:
    """Say which backend ``attention(q, k, v, variant, backend, layout=layout, **options)`` would
    use, and why.

    The inputs are validated as the call would validate them.
    """
    q, k, v = heads_major(layout, q, k, v)
    spec = get_variant(variant)
    opts = spec.resolve_options(options)
    shapes = _validate(spec, q, k, v, opts, layout)
    return _decide(spec, q, k, v, opts, backend, _is_empty(shapes))


def _validate(spec: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any],
              layout: str) -> Any:
    """The variant's validate; with "bshd" a shape error also says that it speaks of the views."""
    try:
        return spec.validate(q, k, v, options)
    except (ValueError, TypeError) as exc:
        if layout == "bhsd":
            raise
        raise type(exc)(f"{exc} (layout='bshd': shapes in this message are the (B, H, N, D) views of the "
                        f"(B, N, H, D) inputs)") from exc


def _is_empty(shapes: Any) -> bool:
    """Whether validate's sizes describe an empty problem (a third party's validator may
    return something other than Shapes: then it is not treated as empty)."""
    return isinstance(shapes, Shapes) and shapes.empty


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def run_reference(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  options: dict[str, Any]) -> Any:
    """The reference in float32 for half inputs, its first output cast back to q's dtype."""
    opts = {name: _upcast(value) for name, value in options.items()}
    result = variant.reference(_upcast(q), _upcast(k), _upcast(v), **opts)
    if isinstance(result, tuple):
        return (result[0].to(q.dtype),) + tuple(result[1:])
    return result.to(q.dtype)


def _checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, backend: str,
             options: dict[str, Any], layout: str = "bhsd") -> tuple[Variant, dict[str, Any], Explanation]:
    """Everything :func:`attention` checks before it runs: the variant, its options, the inputs
    (already (B, H, N, D) views) and the backend; returns the variant, the options with defaults,
    and the backend decision."""
    spec = get_variant(variant)
    opts = spec.resolve_options(options)
    shapes = _validate(spec, q, k, v, opts, layout)
    decision = _decide(spec, q, k, v, opts, backend, _is_empty(shapes))
    if decision.backend == "error":
        raise ValueError(f"backend={backend!r} cannot run variant {spec.name!r} on these inputs:\n  - "
                         + "\n  - ".join(decision.reasons))
    return spec, opts, decision


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
               *, layout: str = "bhsd", **options: Any) -> None:
    """Raise what ``attention(q, k, v, variant, backend, layout=layout, **options)`` would raise on
    bad input, without running it. Stateful callers (decode caches) check a call this way before
    they change anything."""
    q, k, v = heads_major(layout, q, k, v)
    _checked(q, k, v, variant, backend, options, layout)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
              *, layout: str = "bhsd", **options: Any) -> Any:
    """Run any registered variant: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    With ``layout="bshd"`` q, k, v are (B, Nq, Hq, D), (B, Nk, Hkv, D), (B, Nk, Hkv, Dv) (flash-attn's
    layout; spatial variants: heads second to last) and the output is (B, Nq, Hq, Dv): the kernels
    read these tensors through their strides, without a copy, and the output is a view of a
    head-major buffer (``.contiguous()`` makes it row-major). Unknown layouts raise ValueError.

    Returns the output (B, Hq, Nq, Dv) in q's dtype, or a tuple with the extra
    outputs the options ask for (e.g. ``return_lse=True`` adds the float32 LSE of
    shape (B, Hq, Nq), in either layout, as flash-attn's ``softmax_lse``). See
    ``attnkit.get_variant(variant).options`` for the options.

    Examples::

        >>> q = torch.randn(2, 128, 8, 64); k = torch.randn(2, 128, 2, 64); v = torch.randn(2, 128, 2, 64)
        >>> attnkit.attention(q, k, v, "flash", layout="bshd", causal=True).shape
        torch.Size([2, 128, 8, 64])
    """
    q, k, v = heads_major(layout, q, k, v)
    spec, opts, decision = _checked(q, k, v, variant, backend, options, layout)
    if decision.backend == "triton":
        assert spec.kernel is not None
        return output_layout(layout, spec.kernel(q, k, v, **opts))
    if decision.backend == "torch":
        assert spec.torch_impl is not None
        return output_layout(layout, spec.torch_impl(q, k, v, **opts))
    return output_layout(layout, run_reference(spec, q, k, v, opts))


def split_outputs(variant: Variant, result: Any, options: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Split a call's result into the output and a dict of the extra outputs that were asked for."""
    wanted = [out for flag, out in variant.extra_outputs.items() if options.get(flag)]
    if not wanted:
        return result, {}
    return result[0], dict(zip(wanted, result[1:]))
