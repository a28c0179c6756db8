"""Shared pieces of the benchmark suites (docs/performance.md, Method).

On a GPU every case is timed with CUDA events through ``triton.testing.do_bench``
(warm-up, median of many runs) and the result, with TFLOP/s counted over the pairs
the variant must compute, goes into ``benchmark.extra_info``; pytest-benchmark also
times a synchronized call so its own table is meaningful. On CPU the suites run the
references at small sizes, so ``pytest benchmarks/ --benchmark-only`` always works.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# ATTNKIT_BENCH_QUICK=1 (``python -m attnkit.bench --quick``): a GPU round in minutes. Each
# benchmark keeps only the middle value of each integer parameter (sequence length, head dim,
# batch, ...), every provider and mode, so every anchor is still compared on one size.
QUICK = os.environ.get("ATTNKIT_BENCH_QUICK") == "1"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def attention_flops(pairs: float, head_dim: int, head_dim_v: int, mode: str) -> float:
    """FLOPs for ``pairs`` (query, key) products per (batch x head), summed by the caller:
    forward = 2 matmuls; backward = 5 matmuls (2.5x forward)."""
    fwd = 2.0 * pairs * (head_dim + head_dim_v)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def causal_pairs(seqlen_q: int, seqlen_k: int) -> int:
    """Visible (query, key) pairs of a bottom-right causal mask."""
    visible = torch.arange(seqlen_q) + (seqlen_k - seqlen_q) + 1
    return int(visible.clamp(0, seqlen_k).sum())


def mixed_lengths(total: int, count: int, seed: int = 0) -> list:
    """``count`` lengths between about total / (4 count) and 2.5 total / count, summing to ``total``:
    the packed variable-length batches of the varlen benchmarks."""
    g = torch.Generator().manual_seed(seed)
    weights = 0.25 + 2 * torch.rand(count, generator=g, dtype=torch.float64)
    lengths = (weights / weights.sum() * total).floor().long()
    lengths[0] += total - int(lengths.sum())
    return lengths.tolist()


def run(benchmark, fn: Callable[[], object], flops: float | None = None, **info) -> None:
    """Time ``fn`` and record milliseconds and TFLOP/s in ``benchmark.extra_info``."""
    benchmark.extra_info.update(info)
    if CUDA:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        benchmark.extra_info["ms"] = ms
        if flops:
            benchmark.extra_info["tflops"] = flops / ms / 1e9

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
        ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["ms"] = ms
        if flops:
            benchmark.extra_info["tflops"] = flops / ms / 1e9


def with_backward(forward: Callable[[], torch.Tensor], grad_of: torch.Tensor) -> Callable[[], None]:
    """A callable running forward then backward with a fixed output gradient."""

    def step():
        out = forward()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_of)

    return step


def pytest_collection_modifyitems(config, items):
    if not QUICK:
        return
    values: dict = {}  # (function, parameter) -> the integer values it is parametrized with
    for item in items:
        for name, value in getattr(getattr(item, "callspec", None), "params", {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                values.setdefault((item.function, name), set()).add(value)
    middle = {key: sorted(vals)[len(vals) // 2] for key, vals in values.items()}
    kept, dropped = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        keep = all(
            middle.get((item.function, name), value) == value
            for name, value in params.items()
            if isinstance(value, int) and not isinstance(value, bool)
        )
        (kept if keep else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(autouse=True)
def _fresh_grads():
    yield
    if CUDA:
        torch.cuda.empty_cache()
