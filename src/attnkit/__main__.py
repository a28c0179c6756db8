"""``python -m attnkit``: run every registered variant and print a table.

On a GPU the Triton kernels run natively; on CPU the reference runs, and the Triton
kernels run through Triton's interpreter at a small default size. For each variant
and backend the table gives the relative error against the float64 reference
(forward output; the kernel row also checks gradients), the forward and
forward+backward time, and the peak memory of a forward+backward.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any, Callable, List, Optional, Sequence

import torch
from tqdm import tqdm

if not torch.cuda.is_available():  # must happen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnkit  # noqa: E402
from attnkit.dispatch import attention, interpreter_enabled, triton_import_error  # noqa: E402
from attnkit.testing import check_case, kernel_blockers, make_inputs  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def progress_bar(total: int) -> tqdm:
    """A tqdm bar on stderr when it is a terminal (shown once a run takes over 2 s). In a log
    or a pipe tqdm disables itself (``disable=None``) and :func:`announce` writes plain lines
    instead of redrawing one line with carriage returns."""
    return tqdm(total=total, file=sys.stderr, disable=None, delay=2.0, unit="check", leave=False,
                dynamic_ncols=True)


def announce(bar: tqdm, step: int, label: str) -> None:
    """Say which check (1-based ``step``) runs next: in the bar, or as a line ``[step/total] label``."""
    if bar.disable:
        print(f"[{step}/{bar.total}] {label}", file=sys.stderr, flush=True)
    else:
        bar.set_postfix_str(label)


def _peak_rss_reset() -> Optional[int]:
    """Reset the process's peak RSS (Linux) and return the current RSS in bytes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the next peak is visible
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def measure(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple:
    """(median seconds, peak bytes above the start, or None where it cannot be measured)."""
    fn()  # warm-up (compiles / autotunes on a GPU)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        gc.collect()
        base = _peak_rss_reset()
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = None if base is None else max(0, _status_kb("VmHWM") * 1024 - base)
    times.sort()
    return times[len(times) // 2], peak


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_one(spec: Any, case: Any, backend: str, dtype: torch.dtype, device: torch.device,
              repeats: int) -> list[str]:
    """One table row: error against the float64 reference, times and peak memory of one
    variant on one backend (errors are reported in the row, not raised)."""
    name, label = spec.name, backend
    if backend == "torch" and spec.torch_impl is None:
        return [name, backend, "-", "-", "-", "-", "no torch backend"]
    if backend == "triton":
        if spec.kernel is None:
            return [name, backend, "-", "-", "-", "-", "no kernel"]
        if device.type == "cpu":
            label = "triton (interpreter)"
    try:
        refused = kernel_blockers(spec.name, case, dtype=dtype, device=device) if backend == "triton" else []
        if refused:  # a limit the kernel declares (e.g. gla's per-channel gates): say which
            return [name, label, "-", "-", "-", "-", f"kernel refuses: {refused[-1]}"[:80]]
        report = check_case(spec, case, dtype=dtype, device=device, backend=backend)
        q, k, v, tensors = make_inputs(case, device)
        q, k, v = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
        tensors = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
        opts = dict(case.options, **case.tensor_options(tensors))

        def forward():
            with torch.no_grad():
                attention(q, k, v, name, backend, **opts)

        def forward_backward():
            out = attention(q, k, v, name, backend, **opts)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()

        t_fwd, _ = measure(forward, device, repeats)
        t_all, peak = measure(forward_backward, device, repeats) if case.grad else (None, None)
        status = "ok" if report.ok else "FAILED: " + ", ".join(c.name for c in report.comparisons if not c.ok)
        return [name, label, f"{report.max_error:.2e}", f"{t_fwd * 1e3:.2f}",
                "-" if t_all is None else f"{t_all * 1e3:.2f}", _fmt_bytes(peak), status]
    except Exception as exc:  # report and go on with the other variants
        return [name, label, "-", "-", "-", "-", f"error: {type(exc).__name__}: {exc}"[:80]]


def run(variants: Sequence[str], batch: int, heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
        device: torch.device, repeats: int, backends: Sequence[str]) -> List[List[str]]:
    rows = []
    bar = progress_bar(len(variants) * len(backends))
    for name in variants:
        spec = attnkit.get_variant(name)
        case = spec.demo_case(batch, heads, seqlen, head_dim)
        for backend in backends:
            announce(bar, len(rows) + 1, f"{name} / {backend}")
            rows.append(check_one(spec, case, backend, dtype, device, repeats))
            bar.update()
    bar.close()
    return rows


def format_table(rows: List[List[str]]) -> str:
    head = ["variant", "backend", "max rel err", "fwd ms", "fwd+bwd ms", "peak mem", "check"]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; the description keeps its paragraphs."""


def build_parser(cuda: bool) -> argparse.ArgumentParser:
    """The command line; defaults depend on whether a GPU is present (``cuda``): large
    problems natively, small ones through the interpreter."""

    def sizes(gpu: Any, cpu: Any) -> Any:
        return gpu if cuda else cpu

    parser = argparse.ArgumentParser(prog="python -m attnkit", formatter_class=_HelpFormatter,
                                     description=__doc__.replace("``", ""))
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names, or 'all'; registered: " + ", ".join(attnkit.list_variants()))
    parser.add_argument("--batch", type=int, default=sizes(2, 1), help="batch size B (GPU 2, CPU 1)")
    parser.add_argument("--heads", type=int, default=sizes(16, 2), help="heads H (GPU 16, CPU 2)")
    parser.add_argument("--seqlen", type=int, default=sizes(4096, 128),
                        help="sequence length N of the variant's demo problem (GPU 4096, CPU 128)")
    parser.add_argument("--head-dim", type=int, default=sizes(128, 32), help="head dim D (GPU 128, CPU 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=sizes("bfloat16", "float32"),
                        help="input dtype (GPU bfloat16, CPU float32: the interpreter computes bfloat16 "
                             "tl.dot wrongly)")
    parser.add_argument("--repeats", type=int, default=sizes(10, 1),
                        help="timed runs per measurement, after one warm-up; the median is shown (GPU 10, CPU 1)")
    parser.add_argument("--backends", default="reference,torch,triton",
                        help="comma-separated backends to run: reference, torch (fused PyTorch: what auto runs "
                             "where the kernel does not), triton (on CPU the Triton kernels run through the "
                             "interpreter)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    cuda = torch.cuda.is_available()
    args = build_parser(cuda).parse_args(argv)

    names = attnkit.list_variants() if args.variants == "all" else [n.strip() for n in args.variants.split(",")]
    for n in names:
        attnkit.get_variant(n)  # unknown names fail early with the list of known ones
    device = torch.device("cuda" if cuda else "cpu")
    backends = [b.strip() for b in args.backends.split(",")]
    if "triton" in backends and triton_import_error():
        print(f"note: {triton_import_error()}; running the reference only")
        backends = [b for b in backends if b != "triton"]
    where = f"{torch.cuda.get_device_name()}" if cuda else (
        "cpu (Triton interpreter)" if interpreter_enabled() else "cpu")
    print(f"attnkit {attnkit.__version__} | torch {torch.__version__} | device: {where}")
    print(f"size: batch={args.batch} heads={args.heads} seqlen={args.seqlen} head_dim={args.head_dim} "
          f"dtype={args.dtype}; error = max relative error vs the float64 reference (outputs and gradients)")
    rows = run(names, args.batch, args.heads, args.seqlen, args.head_dim, DTYPES[args.dtype], device,
               args.repeats, backends)
    print(format_table(rows))
    return 0 if all(r[-1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
