"""Verification harness: check a kernel against its reference (docs/index.md, Testing).

The oracle is the variant's reference run in float64 on the same (rounded) inputs.
A kernel passes when, for every output and gradient, its relative error against
the oracle is at most ``multiplier x`` the error of the reference itself run in
the input dtype, plus a small floor (FlashAttention's rule: 2x forward, 3x
gradients). NaN never passes, and kernel outputs are allocated full of NaN while
the check runs, so an element the kernel forgets to write fails.

One call checks a registered variant, a third party's included, optionally under
several kernel tilings (a bug in a schedule often shows at one tile shape only)::

    attnkit.testing.check_variant("flash", dtype=torch.float16, device="cuda")
    attnkit.testing.check_variant("mine", tilings=attnkit.testing.TILINGS)

The second line runs on CPU tensors (the default device), which the kernels take only
through Triton's interpreter: set ``TRITON_INTERPRET=1`` before triton is first imported
(on the command line, or in ``os.environ`` before ``import attnkit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import runtime
from .runtime import poison_outputs

#: (BLOCK_M, BLOCK_N) kernel tilings that ``check_variant(tilings=TILINGS)`` sweeps: square and
#: oblong tiles, so that ranges and lists are cut in different places.
TILINGS: Tuple[Tuple[int, int], ...] = ((16, 16), (32, 16), (16, 32), (64, 32))

#: Relative error allowed on top of the multiplier rule, per dtype.
ERROR_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def __getattr__(name: str) -> Any:
    # ``POISON`` reads the switch that ``poison_outputs()`` sets; it lives in attnkit.runtime
    # so that kernel code never imports the harness.
    if name == "POISON":
        return runtime.poison_outputs_enabled()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| over finite entries.

    Infinite entries must match exactly (e.g. an LSE of -inf for an empty row);
    NaN anywhere in ``actual`` gives ``nan``; a mismatch of infinities gives ``inf``.
    """
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if torch.isnan(a).any():
        return math.nan
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        return math.inf
    finite = ~inf_e
    if not finite.any():
        return 0.0
    diff = (a[finite] - e[finite]).abs().max().item()
    scale = e[finite].abs().max().item()
    return diff / scale if scale > 0 else diff


@dataclass
class Comparison:
    name: str
    kernel_error: float
    reference_error: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.kernel_error <= self.allowed  # False for nan

    def __str__(self) -> str:
        mark = "ok " if self.ok else "BAD"
        return (f"{mark} {self.name:<14} kernel {self.kernel_error:.3e}  reference({self.reference_error:.3e}) "
                f"allowed {self.allowed:.3e}")


@dataclass
class Report:
    variant: str
    case: str
    dtype: torch.dtype
    comparisons: List[Comparison] = field(default_factory=list)
    tiling: Optional[Tuple[int, int]] = None
    #: why the kernel did not run at this tiling (it refused it); such a report has no comparisons
    refused: str = ""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)

    @property
    def max_error(self) -> float:
        return max((c.kernel_error for c in self.comparisons), default=0.0)

    def __str__(self) -> str:
        tiling = f" tile {self.tiling[0]}x{self.tiling[1]}" if self.tiling else ""
        status = f"kernel refused this tiling ({self.refused})" if self.refused else ("ok" if self.ok else "FAILED")
        head = f"{self.variant}[{self.case}]{tiling} {str(self.dtype).replace('torch.', '')}: {status}"
        return "\n".join([head] + [f"  {c}" for c in self.comparisons])


def _compare(report: Report, name: str, kernel: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor,
             multiplier: float) -> None:
    k_err = relative_error(kernel, oracle)
    b_err = relative_error(baseline, oracle)
    if not math.isfinite(b_err):  # the low-precision reference itself overflowed: judge by the floor alone
        b_err = 0.0
    allowed = multiplier * b_err + ERROR_FLOOR[report.dtype]
    report.comparisons.append(Comparison(name, k_err, b_err, allowed))


def make_inputs(case: Any, device: Union[str, torch.device] = "cpu", seed: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Float64 master inputs of a registry Case: q, k, v ~ N(0, 1) and its tensor options."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in (case.q, case.k, case.v))
    tensors = {name: make(g) for name, make in case.tensors.items()}
    return q.to(device), k.to(device), v.to(device), {n: t.to(device) for n, t in tensors.items()}


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def _run(fn, q, k, v, tensors, options, make_grad, need_grad, case, seed):
    """Call fn; return its outputs (list) and the gradients of every floating input (dict).

    The call starts from the same state of q's device generator in every run of a check
    (restored afterwards): a random draw inside (the key of attention dropout) is then the
    same for the oracle, the baseline and the kernel, which must drop the same pairs."""
    leaves = {"q": q, "k": k, "v": v, **{n: t for n, t in tensors.items() if t.is_floating_point()}}
    if need_grad:
        for t in leaves.values():
            t.requires_grad_(True)
    cuda = q.device.type == "cuda"
    with torch.random.fork_rng(devices=[q.device] if cuda else []):
        if cuda:
            with torch.cuda.device(q.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        result = fn(q, k, v, **options, **case.tensor_options(tensors))
    outputs = list(result) if isinstance(result, tuple) else [result]
    grads: Dict[str, torch.Tensor] = {}
    if need_grad and outputs[0].requires_grad:  # a non-differentiable kernel output fails every grad check
        torch.autograd.backward(outputs[0], make_grad(outputs[0]))
        grads = {f"d{n}": (t.grad if t.grad is not None else torch.zeros_like(t)) for n, t in leaves.items()}
    return [o.detach() for o in outputs], grads


def kernel_blockers(variant: Any, case: Any, *, dtype: torch.dtype = torch.float16,
                    device: str | torch.device = "cpu", seed: int = 0) -> list[str]:
    """Every reason the Triton kernel cannot run this Case in ``dtype`` (dispatch's blockers and
    the variant's declared ``kernel_support``); empty when it can. A kernel refuses such a case
    with these reasons (``check_case(..., backend="triton")`` raises them) rather than computing it."""
    from .dispatch import explain
    from .registry import get_variant

    spec = get_variant(variant)
    q, k, v, tensors = make_inputs(case, device, seed)
    options = dict(case.options, **case.tensor_options({n: _cast(t, dtype) for n, t in tensors.items()}))
    return explain(q.to(dtype), k.to(dtype), v.to(dtype), spec.name, "triton", **options).kernel_blockers


def check_case(variant: Any, case: Any, *, dtype: torch.dtype = torch.float16,
               device: Union[str, torch.device] = "cpu", backend: str = "triton", seed: int = 0,
               forward_multiplier: float = 2.0, backward_multiplier: float = 3.0) -> Report:
    """Compare ``backend`` against the float64 reference on one Case; returns a Report.

    A mismatch is a failing comparison in the report, not an exception; a backend that
    cannot run these inputs at all (``backend="triton"`` with a kernel blocker) raises the
    ValueError of :func:`attnkit.attention`, which lists every reason."""
    from .dispatch import attention
    from .registry import get_variant

    spec = get_variant(variant)
    options = dict(case.options)
    extra_names = []
    for flag, out_name in spec.extra_outputs.items():
        options[flag] = True
        extra_names.append(out_name)
    q64, k64, v64, t64 = make_inputs(case, device, seed)
    low = [_cast(x, dtype) for x in (q64, k64, v64)]
    t_low = {n: _cast(t, dtype) for n, t in t64.items()}
    g = torch.Generator().manual_seed(seed + 1)
    grad64: List[torch.Tensor] = []

    def make_grad(out: torch.Tensor) -> torch.Tensor:
        if not grad64:
            grad64.append(torch.randn(out.shape, generator=g, dtype=torch.float64).to(device))
        return grad64[0].to(out.dtype)

    need_grad = case.grad
    report = Report(spec.name, case.id, dtype)

    def fresh(xs, ts, dt=None):
        xs = [(_cast(x, dt) if dt is not None else x).detach().clone() for x in xs]
        ts = {n: (_cast(t, dt) if dt is not None else t).detach().clone() for n, t in ts.items()}
        return xs, ts

    # the oracle sees exactly the rounded inputs the kernel sees
    (oq, ok_, ov), ot = fresh(low, t_low, torch.float64)
    oracle, oracle_grads = _run(spec.reference, oq, ok_, ov, ot, options, make_grad, need_grad, case, seed)
    (bq, bk, bv), bt = fresh(low, t_low)
    baseline, baseline_grads = _run(spec.reference, bq, bk, bv, bt, options, make_grad, need_grad, case, seed)

    def kernel_fn(q, k, v, **kw):
        return attention(q, k, v, spec.name, backend, **kw)

    (kq, kk, kv), kt = fresh(low, t_low)
    with poison_outputs():
        kernel, kernel_grads = _run(kernel_fn, kq, kk, kv, kt, options, make_grad, need_grad, case, seed)

    for i, name in enumerate(["out"] + extra_names):
        _compare(report, name, kernel[i], baseline[i], oracle[i], forward_multiplier)
    for name in oracle_grads:
        if name not in kernel_grads:
            report.comparisons.append(Comparison(name + " (missing)", math.nan, 0.0, 0.0))
            continue
        _compare(report, name, kernel_grads[name], baseline_grads[name], oracle_grads[name], backward_multiplier)
    return report


def check_tiling(variant: Any, case: Any, tiling: Tuple[int, int], **kwargs: Any) -> Report:
    """:func:`check_case` with every engine kernel forced to ``tiling`` = (BLOCK_M, BLOCK_N).

    A tiling the kernel refuses for this case (e.g. a block mask whose block size it does
    not divide) gives a report with ``refused`` set and no comparisons. A kernel that
    cannot run the case under any tiling (CPU tensors without the interpreter, an
    unsupported head dim, ...) raises ValueError: a sweep never passes on nothing."""
    from .dispatch import explain
    from .registry import get_variant
    from .kernels.engine import force_config

    spec = get_variant(variant)
    dtype = kwargs.get("dtype", torch.float16)
    q64, k64, v64, t64 = make_inputs(case, kwargs.get("device", "cpu"), kwargs.get("seed", 0))
    options = dict(case.options, **case.tensor_options({n: _cast(t, dtype) for n, t in t64.items()}))
    q, k, v = (x.to(dtype) for x in (q64, k64, v64))
    triton_backend = kwargs.get("backend", "triton") == "triton"
    anyway = explain(q, k, v, spec.name, "auto", **options).kernel_blockers
    if anyway and triton_backend:
        raise ValueError(f"the {spec.name!r} kernel cannot run case {case.id!r} at any tiling:\n  - "
                         + "\n  - ".join(anyway))
    with force_config(*tiling):
        blockers = explain(q, k, v, spec.name, "auto", **options).kernel_blockers
        if blockers and triton_backend:
            return Report(spec.name, case.id, dtype, tiling=tuple(tiling), refused="; ".join(blockers))
        report = check_case(spec, case, **kwargs)
    report.tiling = tuple(tiling)
    return report


def check_variant(variant: Any, cases: Optional[Sequence[Any]] = None, *, dtype: torch.dtype = torch.float16,
                  device: Union[str, torch.device] = "cpu", backend: str = "triton", seed: int = 0,
                  tilings: Optional[Sequence[Tuple[int, int]]] = None, raise_on_failure: bool = True) -> List[Report]:
    """Check a variant's kernel on its registered examples (or ``cases``).

    ``tilings``: (BLOCK_M, BLOCK_N) pairs (e.g. :data:`TILINGS`); every case is then run
    once per tiling with the engine forced to it (a tiling the kernel refuses for a case
    is reported, not failed). Without it the kernels use their own configuration.
    Raises AssertionError listing every failing comparison unless ``raise_on_failure=False``.
    On CPU (``device="cpu"``) the kernel runs only under ``TRITON_INTERPRET=1`` (set before
    triton is first imported); otherwise the call raises ValueError saying so.
    """
    from .registry import get_variant

    spec = get_variant(variant)
    cases = list(cases if cases is not None else spec.examples())
    kwargs = dict(dtype=dtype, device=device, backend=backend, seed=seed)
    if tilings is None:
        reports = [check_case(spec, case, **kwargs) for case in cases]
    else:
        reports = [check_tiling(spec, case, tiling, **kwargs) for tiling in tilings for case in cases]
    bad = [r for r in reports if not r.ok]
    if bad and raise_on_failure:
        raise AssertionError("\n".join(str(r) for r in bad))
    return reports


def check_schedule(schedule: Any, mask: torch.Tensor, *, tilings: Sequence[Tuple[int, int]] = TILINGS,
                   tight: bool = False) -> None:
    """Check a range-mode or list-mode schedule against the dense token mask it stands for.

    For every tile of every tiling (and the transposed schedule of the dK/dV pass): a
    block is visited iff it holds a visible pair, no block is visited twice, and every
    block of segment 0 (visited without the mask) is visible on every real pair. Raises
    AssertionError describing the first violation.

    Args:
        schedule: an ``attnkit.extension.Schedule``; range functions are run with batch
            index 0 and head h for every head of ``mask`` (through a probe kernel, on the
            device of the schedule's tensor arguments, else on CUDA when present, else
            on the CPU, which needs ``TRITON_INTERPRET=1`` set before triton is imported).
        mask: bool (Nq, Nk) or (H, Nq, Nk): True where query row i sees key j (rows in
            the tensors' order, i.e. before the bottom-right offset).
        tilings: (BLOCK_M, BLOCK_N) pairs to check (list mode uses the lists' own blocks).
        tight: also require every block whose pairs are all visible to be in segment 0
            (so the mask never runs where it cannot cut anything).

    Example::

        mask = (torch.arange(64)[None, :] <= torch.arange(64)[:, None])        # causal
        attnkit.testing.check_schedule(attnkit.flash.flash_schedule(True), mask)
    """
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"mask must be a bool tensor (Nq, Nk) or (H, Nq, Nk), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.cpu()
    if schedule.lists is not None:
        _check_lists(schedule.lists, mask)
        return
    for bm, bn in tilings:
        for transposed in (False, True):
            segments = schedule_segments(schedule, mask.shape[0], mask.shape[1], mask.shape[2], bm, bn, transposed)
            _check_segments(segments, mask, bm, bn, transposed, tight)


def schedule_segments(schedule: Any, heads: int, nq: int, nk: int, bm: int, bn: int, transposed: bool = False) -> List:
    """The segments a range-mode schedule returns for every tile: a nested list [head][program]
    of 8 (lo, hi) pairs (unused ones (0, 0)); programs are query blocks of ``bm`` rows, or
    key blocks of ``bn`` keys when ``transposed``. Runs the probe kernel (see check_schedule)."""
    import triton

    from .kernels.engine.launch import _variant_args
    from .kernels.engine.probe import schedule_probe_kernel

    from .dispatch import interpreter_enabled

    native = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
    device = next((a.device for a in schedule.args if isinstance(a, torch.Tensor)), torch.device(native))
    programs = triton.cdiv(nk, bn) if transposed else triton.cdiv(nq, bm)
    out = torch.zeros((heads, programs, 8, 2), dtype=torch.int32, device=device)
    fn = schedule.q_range if transposed else schedule.kv_range
    schedule_probe_kernel[(programs, heads)](out, nq, nk, _variant_args(schedule), programs, RANGE_FN=fn,
                                             MAX_SEGMENTS=8, TRANSPOSED=transposed, BLOCK_M=bm, BLOCK_N=bn)
    return out.cpu().tolist()


def _tile(mask: torch.Tensor, h: int, qb: int, kb: int, bm: int, bn: int) -> torch.Tensor:
    return mask[min(h, mask.shape[0] - 1), qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]


def _check_segments(segments: List, mask: torch.Tensor, bm: int, bn: int, transposed: bool, tight: bool) -> None:
    nq, nk = mask.shape[1:]
    n_other = -(-nq // bm) if transposed else -(-nk // bn)
    what = "dK/dV (transposed) schedule" if transposed else "forward schedule"
    for h, per_head in enumerate(segments):
        for own, segs in enumerate(per_head):
            sets = [set(range(lo, hi)) for lo, hi in segs]
            visited = set().union(*sets)
            where = f"{what}, tile {bm}x{bn}, head {h}, {'key' if transposed else 'query'} block {own}"
            assert sum(map(len, sets)) == len(visited), f"{where}: segments overlap: {segs}"
            assert all(0 <= b < n_other for b in visited), f"{where}: block out of range in {segs}"
            for other in range(n_other):
                qb, kb = (other, own) if transposed else (own, other)
                tile = _tile(mask, h, qb, kb, bm, bn)
                problem = "is visited without a visible pair" if other in visited else \
                    "holds a visible pair but is not visited"
                assert bool(tile.any()) == (other in visited), f"{where}: block {other} {problem}"
                assert other not in sets[0] or bool(tile.all()), \
                    f"{where}: block {other} is in the full segment but some of its pairs are masked"
                assert not tight or other in sets[0] or not bool(tile.all()), \
                    f"{where}: block {other} is visible on every pair but is not in the full segment"


def _check_lists(lists: Any, mask: torch.Tensor) -> None:
    from .block_sparse.block_mask import lists_to_dense

    bq, bk = lists.block_q, lists.block_k
    nq, nk = mask.shape[1:]
    rows, cols = -(-nq // bq), -(-nk // bk)
    full = lists_to_dense(lists.kv_full_count.cpu(), lists.kv_full_index.cpu(), cols)
    part = lists_to_dense(lists.kv_part_count.cpu(), lists.kv_part_index.cpu(), cols)
    t_full = lists_to_dense(lists.q_full_count.cpu(), lists.q_full_index.cpu(), rows)
    t_part = lists_to_dense(lists.q_part_count.cpu(), lists.q_part_index.cpu(), rows)
    for h in range(max(mask.shape[0], full.shape[1])):
        f, p = full[0, min(h, full.shape[1] - 1)], part[0, min(h, part.shape[1] - 1)]
        assert not bool((f & p).any()), f"head {h}: a block is listed both full and partial"
        assert torch.equal(t_full[0, min(h, t_full.shape[1] - 1)], f.T) and \
            torch.equal(t_part[0, min(h, t_part.shape[1] - 1)], p.T), f"head {h}: transposed lists differ"
        for r in range(rows):
            for c in range(cols):
                tile = _tile(mask, h, r, c, bq, bk)
                listed = bool(f[r, c] or p[r, c])
                assert bool(tile.any()) == listed, \
                    f"head {h}: tile ({r}, {c}) listed={listed} but visible={bool(tile.any())}"
                assert not bool(f[r, c]) or bool(tile.all()), f"head {h}: tile ({r}, {c}) is full but partly masked"
