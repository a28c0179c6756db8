"""The two user contracts of the programmable engine: :class:`ScoreMod` and :class:`MaskMod`.

A mod is a pair of functions with one meaning: a ``@triton.jit`` function that the
fused engine calls on every tile it visits, and a PyTorch function that the
references call on every chunk they compute, plus the tensors both read (pointers
for the kernel, tensors for the reference). Positions (see docs/mods.md):

* ``b`` — the batch entry (the sequence index of a packed batch), ``h`` — the
  **query** head;
* ``q_idx`` — the query's position on the key axis: row i of Nq queries sits at
  ``i + Nk - Nq`` (bottom-right, attnkit's causal alignment);
* ``kv_idx`` — the key's row.

The kernel sees ``q_idx`` as an int32 tile [BLOCK_M, 1] and ``kv_idx`` as [1, BLOCK_N]
in the forward and dQ passes; the dK/dV pass works on the transposed tile, so mods
must be pointwise (written with broadcasting, as every FlexAttention mod is).
Padding rows and keys of a ragged tile get the last valid position, so a mod never
reads past its tensors.

Nothing here imports triton: a mod's kernel may be given as an import path
``"package.module:function"``, resolved the first time a kernel runs it.
"""

from __future__ import annotations

import importlib
import itertools
import linecache
import math
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["MaskMod", "Problem", "ScoreMod", "and_masks", "chain_score_mods", "check_mask_mod", "check_score_mod",
           "or_masks"]


@dataclass(frozen=True)
class Problem:
    """What a variant tells a mod about the call it is about to run (see ``specialize``).

    ``spatial``, ``dilation``, ``kernel_size`` and ``stride`` are set by neighborhood
    attention (one int per spatial axis); the positions its mods see are then flat
    row-major indices over ``spatial``.
    """

    variant: str
    batch: int
    heads_q: int
    seqlen_q: int
    seqlen_k: int
    device: torch.device
    spatial: Optional[Tuple[int, ...]] = None
    dilation: Optional[Tuple[int, ...]] = None
    kernel_size: Optional[Tuple[int, ...]] = None
    stride: Optional[Tuple[int, ...]] = None

    @classmethod
    def of(cls, variant: str, q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None,
           cu_seqlens_k: Optional[torch.Tensor] = None, **geometry: Any) -> "Problem":
        """The problem of a (B, H, N, D) call; a packed batch counts its sequences and their
        longest lengths (positions count from each sequence's start)."""
        if cu_seqlens_q is not None and cu_seqlens_k is not None:
            lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
            lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
            return cls(variant, len(lengths_q), q.shape[1], max(lengths_q, default=0), max(lengths_k, default=0),
                       q.device, **geometry)
        return cls(variant, q.shape[0], q.shape[1], math.prod(q.shape[2:-1]), math.prod(k.shape[2:-1]), q.device,
                   **geometry)


def is_jit_function(fn: Any) -> bool:
    """True for a ``@triton.jit`` function (compiled, or run by the interpreter)."""
    if "triton" not in sys.modules:  # nobody could have made one without importing triton
        return False
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(fn, (JITFunction, InterpretedFunction))


def _check_hook(owner: str, arg: str, fn: Any, *, optional: bool) -> Any:
    """A kernel hook: a @triton.jit function, an import path "module:name" (checked when resolved), or None."""
    if fn is None:
        if optional:
            return None
        raise TypeError(f"{owner}: {arg} is required (a @triton.jit function)")
    if isinstance(fn, str):
        if fn.count(":") != 1 or not all(fn.split(":")):
            raise ValueError(f"{owner}: {arg} as a string must be an import path 'package.module:function', got {fn!r}")
        return fn
    if not is_jit_function(fn):
        hint = " (decorate it with @triton.jit)" if callable(fn) else ""
        raise TypeError(f"{owner}: {arg} must be a @triton.jit function{hint}, got {type(fn).__name__}")
    return fn


def resolve_hook(owner: str, arg: str, fn: Any) -> Any:
    """The @triton.jit function behind ``fn`` (imports an import path); TypeError if it is not one."""
    if not isinstance(fn, str):
        return fn
    module, name = fn.split(":")
    try:
        value = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise TypeError(f"{owner}: {arg} {fn!r} cannot be imported ({type(exc).__name__}: {exc})") from None
    if not is_jit_function(value):
        raise TypeError(f"{owner}: {arg} {fn!r} is a {type(value).__name__}, not a @triton.jit function")
    return value


def _check_tensors(owner: str, tensors: Any) -> Tuple[torch.Tensor, ...]:
    if isinstance(tensors, torch.Tensor):
        tensors = (tensors,)
    if not isinstance(tensors, (tuple, list)):
        raise TypeError(f"{owner}: tensors must be a tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return tuple(tensors)


def _hook_name(fn: Any) -> str:
    if isinstance(fn, str):
        return fn.rsplit(":", 1)[-1]
    inner = getattr(fn, "fn", fn)
    return getattr(inner, "__name__", type(fn).__name__)


@dataclass(frozen=True)
class ModKernel:
    """What the engine launches for a mod: its hooks and tensors.

    A hook is a *spec*: a @triton.jit function, an import path "module:function", or a
    tuple describing a generated combination of hooks (and_masks, chain_score_mods).
    Specs are resolved by :func:`materialize` where the kernel launches (inside the
    custom op, so torch.compile never traces an import or a code generation).
    ``tensor_grads`` is None unless some tensor needs a gradient; ``needs_grad`` says,
    per tensor, whether the Triton backward must produce its gradient.
    """

    kernel: Any
    tensors: Tuple[torch.Tensor, ...]
    derivative: Any = None
    tensor_grads: Any = None
    needs_grad: Tuple[bool, ...] = ()
    #: a mask: applied in the schedule's full blocks too (False only when those were built from it)
    full_blocks: bool = True


class ScoreMod:
    """A score modification: ``score -> score_mod(score, b, h, q_idx, kv_idx, *tensors)``.

    Applied after the scale and the built-in softcap and before any mask, to scores in
    natural-log units (FlexAttention's ``score_mod``, with tensors passed explicitly).

    Args:
        kernel: a ``@triton.jit`` function ``(score, b, h, q_idx, kv_idx, *ptrs) -> score``:
            ``score`` a float32 tile, ``b``/``h`` scalars (batch entry or packed sequence,
            query head), ``q_idx``/``kv_idx`` int32 tiles, then one pointer per tensor.
            Or its import path ``"package.module:function"`` (resolved when a kernel
            first runs it, so building a mod does not import triton).
        reference: the PyTorch function with the same meaning,
            ``(score, b, h, q_idx, kv_idx, *tensors) -> score`` on broadcastable tensors:
            score (B, H, M, L), b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, M, 1),
            kv_idx (1, 1, 1, L) (or (1, 1, M, L) where keys are gathered per query).
        tensors: the tensors both functions read, in order.
        derivative: None declares the mod additive (d out / d score = 1); otherwise a
            ``@triton.jit`` function with the kernel's signature returning d out / d score.
        name: a label for errors and reprs (default: the kernel's name).
        tensor_grads: needed when a tensor may require grad: a ``@triton.jit`` function
            ``(dscore, score, b, h, q_idx, kv_idx, *ptrs, *grad_ptrs)`` that adds
            ``dscore * d out / d tensor`` into ``grad_ptrs`` (one float32 buffer shaped like
            each tensor, zero-filled; None for a tensor that needs no gradient), usually
            with ``tl.atomic_add``. ``dscore`` is d loss / d out (0 where masked) and
            ``score`` the score the mod received. The engine calls it once per visited
            (query tile, key tile, head) in its dQ pass.
        specialize: optional ``specialize(problem: Problem) -> ScoreMod`` called by the
            variant before the mod runs; a mod that needs the call's geometry, or
            tensors derived on the call's device, returns a specialized mod.

    Example::

        import triton
        import triton.language as tl

        @triton.jit
        def key_bias_kernel(score, b, h, q_idx, kv_idx, BIAS):
            return score + tl.load(BIAS + kv_idx)

        def key_bias_reference(score, b, h, q_idx, kv_idx, bias):
            return score + bias[kv_idx]

        mod = attnkit.ScoreMod(key_bias_kernel, key_bias_reference, tensors=(bias,))
        out = attnkit.flex_attention(q, k, v, score_mod=mod)
    """

    kind = "score_mod"

    def __init__(self, kernel: Any, reference: Callable[..., torch.Tensor], *, tensors: Sequence[torch.Tensor] = (),
                 derivative: Any = None, name: Optional[str] = None, tensor_grads: Any = None,
                 specialize: Optional[Callable[[Problem], "ScoreMod"]] = None):
        owner = f"ScoreMod({name or _hook_name(kernel)})"
        self.kernel = _check_hook(owner, "kernel", kernel, optional=False)
        if not callable(reference):
            raise TypeError(f"{owner}: reference must be a callable (score, b, h, q_idx, kv_idx, *tensors) -> score, "
                            f"got {type(reference).__name__}")
        self.reference = reference
        self.tensors = _check_tensors(owner, tensors)
        self.derivative = _check_hook(owner, "derivative", derivative, optional=True)
        self.tensor_grads = _check_hook(owner, "tensor_grads", tensor_grads, optional=True)
        if specialize is not None and not callable(specialize):
            raise TypeError(f"{owner}: specialize must be callable, got {type(specialize).__name__}")
        self._specialize = specialize
        self.name = name or _hook_name(self.kernel)

    @property
    def additive(self) -> bool:
        """True when d out / d score = 1 (no ``derivative``)."""
        return self.derivative is None

    def specialize(self, problem: Problem) -> "ScoreMod":
        """The mod to run for ``problem`` (itself unless it was built with ``specialize=``)."""
        if self._specialize is None:
            return self
        out = self._specialize(problem)
        if not isinstance(out, ScoreMod):
            raise TypeError(f"{self.name}: specialize must return a ScoreMod, got {type(out).__name__}")
        return out

    def apply(self, score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
              kv_idx: torch.Tensor) -> torch.Tensor:
        """Run the reference (what the PyTorch references do for every chunk)."""
        return self.reference(score, b, h, q_idx, kv_idx, *self.tensors)

    def kernel_view(self) -> ModKernel:
        """The hooks and tensors of a launch; TypeError when a tensor needs a gradient the mod cannot give."""
        owner = f"ScoreMod({self.name})"
        needs = tuple(t.is_floating_point() and t.requires_grad and torch.is_grad_enabled() for t in self.tensors)
        grads = None
        if any(needs):
            if self.tensor_grads is None:
                names = [i for i, n in enumerate(needs) if n]
                raise TypeError(f"{owner}: tensors{names} require grad but the mod has no tensor_grads kernel, so the "
                                "Triton backward cannot produce their gradients; pass tensor_grads= (see docs/mods.md) "
                                "or detach them")
            grads = self.tensor_grads
        return ModKernel(self.kernel, self.tensors, self.derivative, grads, needs if grads else ())

    def __repr__(self) -> str:
        kind = "additive" if self.additive else "non-additive"
        return f"ScoreMod({self.name}, {kind}, tensors={[tuple(t.shape) for t in self.tensors]})"


class MaskMod:
    """A token mask: key ``kv_idx`` is attended by query ``q_idx`` iff
    ``mask_mod(b, h, q_idx, kv_idx, *tensors)`` is True (and the variant's own rule allows it).

    Args:
        kernel: a ``@triton.jit`` function ``(b, h, q_idx, kv_idx, *ptrs) -> bool tile``
            (positions as for :class:`ScoreMod`), or its import path ``"module:function"``.
        reference: the PyTorch function with the same meaning, ``(b, h, q_idx, kv_idx,
            *tensors) -> bool tensor`` on broadcastable tensors (FlexAttention's mask_mod
            signature, plus the tensors).
        tensors: the tensors both read, in order (never differentiated).
        name: a label for errors and reprs.
        specialize: as for :class:`ScoreMod`.

    A row left with no key has output 0 and LSE -inf.
    """

    kind = "mask_mod"

    def __init__(self, kernel: Any, reference: Callable[..., torch.Tensor], *, tensors: Sequence[torch.Tensor] = (),
                 name: Optional[str] = None, specialize: Optional[Callable[[Problem], "MaskMod"]] = None):
        owner = f"MaskMod({name or _hook_name(kernel)})"
        self.kernel = _check_hook(owner, "kernel", kernel, optional=False)
        if not callable(reference):
            raise TypeError(f"{owner}: reference must be a callable (b, h, q_idx, kv_idx, *tensors) -> bool, "
                            f"got {type(reference).__name__}")
        self.reference = reference
        self.tensors = _check_tensors(owner, tensors)
        if specialize is not None and not callable(specialize):
            raise TypeError(f"{owner}: specialize must be callable, got {type(specialize).__name__}")
        self._specialize = specialize
        self.name = name or _hook_name(self.kernel)

    def specialize(self, problem: Problem) -> "MaskMod":
        """The mask to run for ``problem`` (itself unless it was built with ``specialize=``)."""
        if self._specialize is None:
            return self
        out = self._specialize(problem)
        if not isinstance(out, MaskMod):
            raise TypeError(f"{self.name}: specialize must return a MaskMod, got {type(out).__name__}")
        return out

    def apply(self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Run the reference; checks that it returned a bool tensor."""
        keep = self.reference(b, h, q_idx, kv_idx, *self.tensors)
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise TypeError(f"MaskMod({self.name}): reference must return a bool tensor, got {got}")
        return keep

    def kernel_view(self) -> ModKernel:
        return ModKernel(self.kernel, self.tensors)

    def __repr__(self) -> str:
        return f"MaskMod({self.name}, tensors={[tuple(t.shape) for t in self.tensors]})"


# ----------------------------------------------------------------------------- checks

def check_score_mod(arg: str, mod: Any, problem: Problem) -> Optional[ScoreMod]:
    """None, or the mod specialized to ``problem`` with its tensors on the inputs' device."""
    if mod is None:
        return None
    if isinstance(mod, MaskMod):
        raise TypeError(f"{arg} got a MaskMod ({mod.name}); a mask goes in mask_mod= (or a BlockMask), "
                        "a ScoreMod in score_mod=")
    if not isinstance(mod, ScoreMod):
        hint = " (wrap a @triton.jit function and its PyTorch reference in attnkit.ScoreMod)" if callable(mod) else ""
        raise TypeError(f"{arg} must be an attnkit.ScoreMod{hint}, got {type(mod).__name__}")
    mod = mod.specialize(problem)
    _check_devices(arg, mod, problem.device)
    return mod


def check_mask_mod(arg: str, mod: Any, problem: Problem) -> Optional[MaskMod]:
    """None, or the mask specialized to ``problem`` with its tensors on the inputs' device."""
    if mod is None:
        return None
    if isinstance(mod, ScoreMod):
        raise TypeError(f"{arg} got a ScoreMod ({mod.name}); a score modification goes in score_mod=, "
                        "a MaskMod in mask_mod=")
    if not isinstance(mod, MaskMod):
        hint = " (wrap a @triton.jit predicate and its PyTorch reference in attnkit.MaskMod)" if callable(mod) else ""
        raise TypeError(f"{arg} must be an attnkit.MaskMod{hint}, got {type(mod).__name__}")
    mod = mod.specialize(problem)
    _check_devices(arg, mod, problem.device)
    return mod


def _check_devices(arg: str, mod: Any, device: torch.device) -> None:
    for i, t in enumerate(mod.tensors):
        if t.device != device:
            raise ValueError(f"{arg} ({mod.name}): tensors[{i}] is on {t.device} but q is on {device}; "
                             "a mod's tensors must be on the inputs' device")


# ----------------------------------------------------------------------------- combinators

_GENERATED = itertools.count()
_COMBINED: Dict[Tuple, Any] = {}


def generate_jit(source: str, name: str, namespace: Dict[str, Any]) -> Any:
    """Compile ``source`` (defining function ``name``) with ``namespace`` as its globals and
    return it as a @triton.jit function. The source is registered with linecache, so
    Triton (which reads a function's source) and tracebacks can see it."""
    import triton
    import triton.language as tl

    filename = f"<attnkit-generated-{next(_GENERATED)}-{name}>"
    source = textwrap.dedent(source)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = dict(namespace, triton=triton, tl=tl)  # Triton requires triton.language in a jit function's globals
    exec(compile(source, filename, "exec"), scope)
    fn = triton.jit(scope[name])
    fn.attnkit_recipe = (source, name, dict(namespace))  # how to rebuild it (tools/aot_compile.py does)
    return fn


def _combined_mask_kernel(op: str, kernels: Tuple[Any, ...], arities: Tuple[int, ...]) -> Any:
    key = ("mask", op, tuple(id(k) for k in kernels), arities)
    if key not in _COMBINED:
        params, calls, start = [], [], 0
        for i, n in enumerate(arities):
            names = [f"p{start + j}" for j in range(n)]
            params += names
            calls.append(f"M{i}(b, h, q_idx, kv_idx{''.join(', ' + p for p in names)})")
            start += n
        joiner = " & " if op == "and" else " | "
        source = f"def {op}_masks(b, h, q_idx, kv_idx{''.join(', ' + p for p in params)}):\n" \
                 f"    return {joiner.join(calls)}\n"
        namespace = {f"M{i}": k for i, k in enumerate(kernels)}
        _COMBINED[key] = (generate_jit(source, f"{op}_masks", namespace), kernels)  # keep the parts alive
    return _COMBINED[key][0]


class _CombinedMask(MaskMod):
    """``and``/``or`` of several masks; its kernel is generated on first kernel use."""

    def __init__(self, op: str, masks: Sequence[MaskMod]):
        self.op, self.masks = op, tuple(masks)
        self.tensors = tuple(t for m in masks for t in m.tensors)
        self.name = f"{op}_masks(" + ", ".join(m.name for m in masks) + ")"
        self.kernel = "attnkit.generated:" + self.name
        self._specialize = None
        bounds = list(itertools.accumulate((0,) + tuple(len(m.tensors) for m in masks)))
        self._bounds = list(zip(bounds, bounds[1:]))

    def reference(self, b, h, q_idx, kv_idx, *tensors):
        keep = None
        for m, (lo, hi) in zip(self.masks, self._bounds):
            part = m.reference(b, h, q_idx, kv_idx, *tensors[lo:hi])
            keep = part if keep is None else (keep & part if self.op == "and" else keep | part)
        return keep

    def specialize(self, problem: Problem) -> MaskMod:
        parts = [m.specialize(problem) for m in self.masks]
        return self if all(a is b for a, b in zip(parts, self.masks)) else _CombinedMask(self.op, parts)

    def kernel_view(self) -> ModKernel:
        parts = tuple(m.kernel_view() for m in self.masks)
        spec = ("masks", self.op, tuple(p.kernel for p in parts), tuple(len(p.tensors) for p in parts))
        return ModKernel(spec, self.tensors)


def _combine_masks(op: str, masks: Sequence[MaskMod]) -> MaskMod:
    for i, m in enumerate(masks):
        if not isinstance(m, MaskMod):
            raise TypeError(f"{op}_masks: argument {i} must be an attnkit.MaskMod, got {type(m).__name__}")
    if not masks:
        raise ValueError(f"{op}_masks needs at least one MaskMod")
    return masks[0] if len(masks) == 1 else _CombinedMask(op, masks)


def materialize(spec: Any, owner: str = "mod") -> Any:
    """The @triton.jit function behind a hook spec (see :class:`ModKernel`); None stays None."""
    if spec is None or not isinstance(spec, (str, tuple)):
        return spec
    if isinstance(spec, str):
        return resolve_hook(owner, "kernel", spec)
    if spec[0] == "masks":
        _, op, kernels, arities = spec
        return _combined_mask_kernel(op, tuple(materialize(k) for k in kernels), arities)
    if spec[0] == "chain":
        _, which, kernels, derivatives, grads, arities, needs = spec
        parts = (tuple(materialize(h) for h in hooks) for hooks in (kernels, derivatives, grads))
        built = _chained_score_kernels(*parts, arities, needs)
        return built[which]
    raise TypeError(f"{owner}: unknown hook spec {spec!r}")


def and_masks(*masks: MaskMod) -> MaskMod:
    """A mask that attends where **every** mask attends (FlexAttention's ``and_masks``).

    Example::

        mask = attnkit.mods.and_masks(attnkit.mods.causal(), attnkit.mods.document(doc_ids))
    """
    return _combine_masks("and", masks)


def or_masks(*masks: MaskMod) -> MaskMod:
    """A mask that attends where **any** mask attends (FlexAttention's ``or_masks``)."""
    return _combine_masks("or", masks)


def _chained_score_kernels(kernels: Tuple[Any, ...], derivatives: Tuple[Any, ...], grads: Tuple[Any, ...],
                           arities: Tuple[int, ...], needs: Tuple[Tuple[bool, ...], ...]) -> Tuple[Any, Any, Any]:
    """Generated (kernel, derivative, tensor_grads) of ``mods[-1](...(mods[0](score)))``."""
    key = ("chain", tuple(id(k) for k in kernels + derivatives + grads), arities, needs)
    if key in _COMBINED:
        return _COMBINED[key][0]
    n = len(kernels)
    ptrs, grad_ptrs, start = [], [], 0
    for a in arities:
        ptrs.append([f"p{start + j}" for j in range(a)])
        grad_ptrs.append([f"g{start + j}" for j in range(a)])
        start += a
    all_ptrs = "".join(", " + p for ps in ptrs for p in ps)
    all_grads = "".join(", " + g for gs in grad_ptrs for g in gs)
    args = lambda i: f"b, h, q_idx, kv_idx{''.join(', ' + p for p in ptrs[i])}"  # noqa: E731
    lines = [f"def chained(score, b, h, q_idx, kv_idx{all_ptrs}):"]
    lines += [f"    score = K{i}(score, {args(i)})" for i in range(n)]
    lines += ["    return score", ""]
    # derivative: product of each part's derivative at its own input
    lines += [f"def chained_derivative(score, b, h, q_idx, kv_idx{all_ptrs}):", "    d = score * 0.0 + 1.0"]
    for i in range(n):
        if derivatives[i] is not None:
            lines.append(f"    d = d * D{i}(score, {args(i)})")
        lines.append(f"    score = K{i}(score, {args(i)})")
    lines += ["    return d", ""]
    # tensor gradients: part i sees dscore times the derivative of the parts after it
    lines += [f"def chained_grads(dscore, score, b, h, q_idx, kv_idx{all_ptrs}{all_grads}):"]
    for i in range(n):
        lines.append(f"    s{i} = score")
        lines.append(f"    score = K{i}(score, {args(i)})")
    for i in reversed(range(n)):
        if grads[i] is not None and any(needs[i]):
            gs = "".join(", " + g for g in grad_ptrs[i])
            lines.append(f"    G{i}(dscore, s{i}, {args(i)}{gs})")
        if i > 0 and derivatives[i] is not None:
            lines.append(f"    dscore = dscore * D{i}(s{i}, {args(i)})")
    lines.append("    return")
    source = "\n".join(lines) + "\n"
    namespace: Dict[str, Any] = {}
    for i in range(n):
        namespace[f"K{i}"] = kernels[i]
        if derivatives[i] is not None:
            namespace[f"D{i}"] = derivatives[i]
        if grads[i] is not None:
            namespace[f"G{i}"] = grads[i]
    result = tuple(generate_jit(source, fn, namespace) for fn in ("chained", "chained_derivative", "chained_grads"))
    _COMBINED[key] = (result, kernels + derivatives + grads)
    return result


class _ChainedScoreMod(ScoreMod):
    def __init__(self, mods: Sequence[ScoreMod]):
        self.mods = tuple(mods)
        self.tensors = tuple(t for m in mods for t in m.tensors)
        self.name = "chain(" + ", ".join(m.name for m in mods) + ")"
        self.kernel = "attnkit.generated:" + self.name
        self.derivative = None if all(m.additive for m in mods) else self.kernel
        self.tensor_grads = None
        self._specialize = None
        splits = list(itertools.accumulate((0,) + tuple(len(m.tensors) for m in mods)))
        self._splits = list(zip(splits, splits[1:]))

        def reference(score, b, h, q_idx, kv_idx, *ts):
            for m, (lo, hi) in zip(self.mods, self._splits):
                score = m.reference(score, b, h, q_idx, kv_idx, *ts[lo:hi])
            return score

        self.reference = reference

    def specialize(self, problem: Problem) -> ScoreMod:
        parts = [m.specialize(problem) for m in self.mods]
        if all(a is b for a, b in zip(parts, self.mods)):
            return self
        return _ChainedScoreMod(parts)

    def kernel_view(self) -> ModKernel:
        views = [m.kernel_view() for m in self.mods]
        needs = tuple(tuple(v.needs_grad) if v.needs_grad else (False,) * len(v.tensors) for v in views)
        parts = (tuple(v.kernel for v in views), tuple(v.derivative for v in views),
                 tuple(v.tensor_grads for v in views), tuple(len(v.tensors) for v in views), needs)
        flat_needs = tuple(n for part in needs for n in part)
        return ModKernel(("chain", 0) + parts, self.tensors, None if self.additive else ("chain", 1) + parts,
                         ("chain", 2) + parts if any(flat_needs) else None, flat_needs if any(flat_needs) else ())


def chain_score_mods(*mods: ScoreMod) -> ScoreMod:
    """One score mod applying ``mods`` in order: ``mods[-1](... mods[0](score))``.

    Derivatives and tensor gradients follow the chain rule, so non-additive and
    learnable parts combine freely. Example::

        mod = attnkit.mods.chain_score_mods(attnkit.mods.alibi(slopes), attnkit.mods.key_bias(bias))
    """
    for i, m in enumerate(mods):
        if not isinstance(m, ScoreMod):
            raise TypeError(f"chain_score_mods: argument {i} must be an attnkit.ScoreMod, got {type(m).__name__}")
    if not mods:
        raise ValueError("chain_score_mods needs at least one ScoreMod")
    return mods[0] if len(mods) == 1 else _ChainedScoreMod(mods)
