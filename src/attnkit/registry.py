"""The variant registry: every attention variant is one :class:`Variant` entry.

A variant states its options (with defaults), a reference, a kernel, how to
validate its options, what the kernel supports, and a few example problems that
the shared contract test and ``python -m attnkit`` run. Third-party code adds a
variant with :func:`register_variant` and gets dispatch, ``explain`` and the
verification harness for free (docs/architecture.md, The registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checks import Shapes

#: reference(q, k, v, **options) and kernel(q, k, v, **options) both return the
#: output, or a tuple (output, *extras) when an option in ``extra_outputs`` is on.
AttentionFn = Callable[..., Any]
#: validate(q, k, v, options) -> Shapes; raises ValueError/TypeError on bad input.
Validator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, Any]], Shapes]
#: kernel_support(q, k, v, options) -> reasons the kernel cannot run (empty: it can).
SupportCheck = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, Any]], List[str]]


@dataclass(frozen=True)
class Case:
    """One example problem for the contract test and the demo.

    ``q``, ``k`` and ``v`` are *shapes*, e.g. ``(B, Hq, Nq, D)``, not tensors: the harness
    makes the inputs itself (float64 N(0, 1) from a seeded generator, then rounded to the
    dtype under test), so that the oracle and the kernel see the same numbers. A tensor
    there raises TypeError. ``tensors`` builds tensor-valued options (e.g. ``sink_logits``) from a
    generator; floating ones are made in float64 and cast like q, k, v, and are
    differentiated when ``grad`` is set. ``build``, when given, turns those tensors
    (already cast, on the device, differentiable) into options, e.g. a ScoreMod around
    a learnable table: ``build=lambda t: {"score_mod": attnkit.mods.alibi(t["slopes"])}``;
    without it each tensor is passed as the option of its name.
    """

    q: Tuple[int, ...]
    k: Tuple[int, ...]
    v: Tuple[int, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, Callable[[torch.Generator], torch.Tensor]] = field(default_factory=dict)
    grad: bool = True
    name: str = ""
    build: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, Any]]] = None

    def __post_init__(self) -> None:
        for name in ("q", "k", "v"):
            shape = getattr(self, name)
            if isinstance(shape, torch.Tensor):
                raise TypeError(f"Case {name} must be a shape (a tuple of ints such as (B, H, N, D)), got a "
                                f"torch.Tensor: the harness makes the inputs itself; pass {name}.shape")
            if not isinstance(shape, (tuple, list)) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in shape):
                raise TypeError(f"Case {name} must be a shape (a tuple of ints such as (B, H, N, D)), got {shape!r}")
            object.__setattr__(self, name, tuple(int(n) for n in shape))  # torch.Size or a list -> plain tuple
        for name, make in self.tensors.items():
            if not callable(make):
                raise TypeError(f"Case tensors[{name!r}] must be a function of a torch.Generator that returns "
                                f"the tensor (made in float64, cast by the harness), got {type(make).__name__}")

    def tensor_options(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """The options the case's tensors become (through ``build`` when it is set)."""
        return dict(self.build(tensors)) if self.build is not None else dict(tensors)

    @property
    def id(self) -> str:
        return self.name or "q{}_k{}_v{}".format("x".join(map(str, self.q)), "x".join(map(str, self.k)),
                                                    "x".join(map(str, self.v)))


def packed_offsets(*lengths: int) -> Callable[[torch.Generator], torch.Tensor]:
    """A :class:`Case` tensor builder of ``cu_seqlens_q/k``: the (S + 1,) int32 offsets of
    sequences of these lengths packed along N, e.g. ``packed_offsets(17, 23, 1)``."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return lambda g: torch.tensor(offsets, dtype=torch.int32)


@dataclass(frozen=True)
class Variant:
    """A registered attention variant.

    Attributes:
        name: registry key, e.g. ``"flash"``.
        reference: plain PyTorch specification. It computes in the dtype it is given
            (the harness runs it in float64 as the oracle and in the input dtype as
            the error baseline); ``backend="reference"`` upcasts half inputs to fp32.
        kernel: the Triton implementation with the same signature, or None.
        torch_impl: the fast PyTorch implementation (``backend="torch"``) with the same
            signature and exactly the reference's semantics, built from torch's fused
            primitives (SDPA, batched matmuls on gathered blocks, LSE merges); it computes
            in the input dtype. None: ``"auto"`` falls back to the reference.
        options: every keyword option with its default.
        validate: checks q, k, v and the options; returns the problem sizes.
        kernel_support: reasons why the kernel cannot take these inputs (empty if it can).
        extra_outputs: flag option -> name of the extra output it adds, e.g.
            ``{"return_lse": "lse"}``; the harness turns them all on and compares them.
        examples: small problems for the contract test and the demo.
        status: what exists, for the README table: keys ``reference``, ``forward``, ``backward``.
        doc: one-line description.
        demo: ``demo(batch, heads, seqlen, head_dim) -> Case``: a typical problem of that size
            for ``python -m attnkit`` (default: the first example).
    """

    name: str
    reference: AttentionFn
    kernel: Optional[AttentionFn]
    options: Mapping[str, Any]
    validate: Validator
    kernel_support: SupportCheck = lambda q, k, v, o: []
    extra_outputs: Mapping[str, str] = field(default_factory=dict)
    examples: Callable[[], Sequence[Case]] = lambda: ()
    status: Mapping[str, bool] = field(default_factory=lambda: {"reference": True, "forward": False, "backward": False})
    doc: str = ""
    demo: Optional[Callable[[int, int, int, int], Case]] = None
    torch_impl: Optional[AttentionFn] = None

    def demo_case(self, batch: int, heads: int, seqlen: int, head_dim: int) -> Case:
        """The problem ``python -m attnkit`` runs for this variant at the given size."""
        if self.demo is not None:
            return self.demo(batch, heads, seqlen, head_dim)
        return self.examples()[0]

    def resolve_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Defaults filled in; an unknown option name is a TypeError listing the known ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"variant {self.name!r} got unknown option(s) {unknown}; "
                            f"it takes {sorted(self.options)}")
        resolved = dict(self.options)
        resolved.update(options)
        return resolved


_REGISTRY: Dict[str, Variant] = {}


def register_variant(variant: Variant, *, replace: bool = False) -> Variant:
    """Add a variant to the registry (``replace=True`` to overwrite one of the same name)."""
    if not isinstance(variant, Variant):
        raise TypeError(f"register_variant takes an attnkit.Variant, got {type(variant).__name__}")
    if variant.name in _REGISTRY and not replace:
        raise ValueError(f"a variant named {variant.name!r} is already registered (pass replace=True)")
    _REGISTRY[variant.name] = variant
    return variant


def unregister_variant(name: str) -> None:
    """Remove a variant (mostly for tests of third-party registration)."""
    _REGISTRY.pop(name, None)


def get_variant(name: str) -> Variant:
    """The registered variant called ``name``; ValueError listing the known names otherwise."""
    if isinstance(name, Variant):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown attention variant {name!r}; registered: {list_variants()}") from None


def list_variants() -> List[str]:
    """Names of the registered variants, in registration order."""
    return list(_REGISTRY)
