"""Backend choice and the generic entry point ``attnkit.attention``.

``backend="auto"`` runs the Triton kernel when the tensors are on a CUDA device and
the variant's kernel supports the inputs, and the PyTorch reference otherwise.
``backend="triton"`` insists on the kernel (and raises with every reason when it
cannot run); on CPU tensors it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernels are first imported).
``backend="reference"`` runs the PyTorch specification, upcasting float16/bfloat16
to float32 for accuracy. :func:`explain` tells which backend a call would take and why
(docs/architecture.md, Backends and dispatch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checks import Shapes, constant_under_compile
from .registry import Variant, get_variant

BACKENDS = ("auto", "triton", "reference")


_TRITON_ERROR: Optional[str] = None


@constant_under_compile
def triton_import_error() -> str:
    """Empty when triton imports, else the reason it does not."""
    global _TRITON_ERROR
    if _TRITON_ERROR is None:
        try:
            import triton  # noqa: F401

            _TRITON_ERROR = ""
        except Exception as exc:  # ImportError, or a broken install
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
    reasons: List[str] = field(default_factory=list)
    kernel_blockers: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.variant}: backend={self.requested!r} -> {self.backend}"]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _kernel_blockers(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     options: Dict[str, Any]) -> List[str]:
    reasons: List[str] = []
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


def _decide(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: Dict[str, Any],
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
    # auto
    if blockers:
        return Explanation(variant.name, backend, "reference", blockers, blockers)
    if q.device.type == "cpu":
        return Explanation(variant.name, backend, "reference",
                           ["tensors are on cpu: auto does not use the (slow) interpreter; "
                            "pass backend='triton' to run the kernel through it"], blockers)
    return Explanation(variant.name, backend, "triton",
                       [f"tensors are on {q.device}, the kernel supports these inputs"], blockers)


def explain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
            **options: Any) -> Explanation:
    """Say which backend ``attention(q, k, v, variant, backend, **options)`` would use, and why.

    The inputs are validated as the call would validate them.
    """
    spec = get_variant(variant)
    opts = spec.resolve_options(options)
    shapes = spec.validate(q, k, v, opts)
    return _decide(spec, q, k, v, opts, backend, _is_empty(shapes))


def _is_empty(shapes: Any) -> bool:
    """Whether validate's sizes describe an empty problem (a third party's validator may
    return something other than Shapes: then it is not treated as empty)."""
    return isinstance(shapes, Shapes) and shapes.empty


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def run_reference(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  options: Dict[str, Any]) -> Any:
    """The reference in float32 for half inputs, its first output cast back to q's dtype."""
    opts = {name: _upcast(value) for name, value in options.items()}
    result = variant.reference(_upcast(q), _upcast(k), _upcast(v), **opts)
    if isinstance(result, tuple):
        return (result[0].to(q.dtype),) + tuple(result[1:])
    return result.to(q.dtype)


def _checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str, backend: str,
             options: Dict[str, Any]) -> Tuple[Variant, Dict[str, Any], Explanation]:
    """Everything :func:`attention` checks before it runs: the variant, its options, the inputs and
    the backend; returns the variant, the options with defaults, and the backend decision."""
    spec = get_variant(variant)
    opts = spec.resolve_options(options)
    shapes = spec.validate(q, k, v, opts)
    decision = _decide(spec, q, k, v, opts, backend, _is_empty(shapes))
    if decision.backend == "error":
        raise ValueError(f"backend='triton' cannot run variant {spec.name!r} on these inputs:\n  - "
                         + "\n  - ".join(decision.kernel_blockers))
    return spec, opts, decision


def check_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
               **options: Any) -> None:
    """Raise what ``attention(q, k, v, variant, backend, **options)`` would raise on bad input, without
    running it. Stateful callers (decode caches) check a call this way before they change anything."""
    _checked(q, k, v, variant, backend, options)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str = "flash", backend: str = "auto",
              **options: Any) -> Any:
    """Run any registered variant: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    Returns the output (B, Hq, Nq, Dv) in q's dtype, or a tuple with the extra
    outputs the options ask for (e.g. ``return_lse=True`` adds the float32 LSE of
    shape (B, Hq, Nq)). See ``attnkit.get_variant(variant).options`` for the options.
    """
    spec, opts, decision = _checked(q, k, v, variant, backend, options)
    if decision.backend == "triton":
        assert spec.kernel is not None
        return spec.kernel(q, k, v, **opts)
    return run_reference(spec, q, k, v, opts)


def split_outputs(variant: Variant, result: Any, options: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Split a call's result into the output and a dict of the extra outputs that were asked for."""
    wanted = [out for flag, out in variant.extra_outputs.items() if options.get(flag)]
    if not wanted:
        return result, {}
    return result[0], dict(zip(wanted, result[1:]))
