"""sliding_window: kernel vs reference on the issue's cases (forward, LSE, gradients), the block
schedule (exact and tight), the reference's memory, the decode cache, and bad input.

The contract test (test_contract.py) runs the variant's examples; this file adds the rest."""

import itertools
import math

import pytest
import torch

import attnkit
from attnkit import Case, sliding_window_attention, SlidingWindowCache
from attnkit._reference import MIN_CHUNK_ROWS
from attnkit.extension import force_config
from attnkit.sliding_window import make_schedule, reference as sw_reference
from attnkit.sliding_window.reference import sliding_window_reference
from attnkit.testing import check_case, check_schedule, schedule_segments

from conftest import DEVICE, DTYPES

DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def dense_mask(Hq, Nq, Nk, windows, sinks):
    """(Hq, Nq, Nk) boolean mask straight from the definition in docs/sliding_window.md (tests only: it is N x N)."""
    p = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    masks = []
    for left, right in windows:
        before_right = torch.ones(Nq, Nk, dtype=torch.bool) if right < 0 else j <= p + right
        in_window = torch.ones(Nq, Nk, dtype=torch.bool) if left < 0 else j >= p - left
        masks.append(before_right & (in_window | (j < sinks)))
    return torch.stack(masks)


def dense_attention(q, k, v, windows, sinks, scale=None):
    """Naive float64 softmax attention with the dense mask; empty rows give 0."""
    Hq = q.shape[1]
    k, v = k.repeat_interleave(Hq // k.shape[1], 1), v.repeat_interleave(Hq // v.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    s = s.masked_fill(~dense_mask(Hq, q.shape[2], k.shape[2], windows, sinks), -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _per_head(rows):
    return lambda g: torch.tensor(rows, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# The cases, kernel vs float64 reference: forward, LSE and gradients (dq, dk, dv).
# ---------------------------------------------------------------------------------------------
CASES = [
    Case((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), {"window": 1000}, name="window_larger_than_n"),
    Case((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), {"window": (50, 70), "sinks": 3},
         name="pair_larger_than_n"),
    Case((1, 2, 45, 32), (1, 2, 45, 32), (1, 2, 45, 32), {"window": (0, 0)}, name="window_0_0"),
    Case((1, 2, 45, 32), (1, 2, 45, 32), (1, 2, 45, 32), {"window": (0, 0), "sinks": 5}, name="window_0_0_sinks"),
    Case((1, 2, 61, 40), (1, 2, 61, 40), (1, 2, 61, 40), {"window": (9, 17)}, name="noncausal_right17_d40"),
    Case((1, 2, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32), {"window": (-1, 4), "sinks": 2},
         name="left_unbounded_right4"),
    Case((1, 2, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32), {"window": (6, -1)}, name="right_unbounded"),
    Case((1, 4, 1, 64), (1, 2, 203, 64), (1, 2, 203, 64), {"window": 40, "sinks": 4}, name="decode_nq1_nk203"),
    Case((1, 2, 1, 32), (1, 2, 150, 32), (1, 2, 150, 32), {"window": (20, 0), "sinks": 0},
         name="decode_nq1_no_sinks"),
    Case((1, 2, 57, 32), (1, 2, 57, 32), (1, 2, 57, 32), {"window": 4, "sinks": 9}, name="sinks_ge_window"),
    Case((1, 2, 57, 32), (1, 2, 57, 32), (1, 2, 57, 32), {"window": 3, "sinks": 100}, name="sinks_ge_n"),
    Case((2, 6, 47, 32), (2, 2, 47, 32), (2, 2, 47, 24),
         {"sinks": 3}, {"window": _per_head([[-1, 0], [4, 0], [0, 0], [20, 2], [-1, -1], [8, 0]])},
         name="per_head_mixed_gqa"),
    Case((1, 4, 33, 32), (1, 1, 71, 32), (1, 1, 71, 32),
         {}, {"window": _per_head([[-1, 0], [5, 0], [16, 3], [0, 0]])}, name="per_head_mqa_nq<nk"),
    Case((1, 2, 29, 32), (1, 2, 113, 32), (1, 2, 113, 32), {"window": (11, 3), "sinks": 2}, name="nq<nk"),
    Case((1, 2, 70, 32), (1, 2, 30, 32), (1, 2, 30, 32), {"window": (5, 2), "sinks": 2}, name="nq>nk_empty_rows"),
    Case((1, 2, 33, 32), (1, 2, 33, 32), (1, 2, 33, 32), {"window": (4, 0), "softcap": 2.0, "scale": 0.4},
         {"sink_logits": lambda g: torch.randn(2, generator=g, dtype=torch.float64)}, name="softcap_scale_logits"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_matches_reference(case, dtype):
    report = check_case("sliding_window", case, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    names = {c.name for c in report.comparisons}
    assert {"out", "lse", "dq", "dk", "dv"} <= names, names


TILING_CASES = [
    Case((1, 2, 77, 32), (1, 2, 77, 32), (1, 2, 77, 32), {"window": (21, 6), "sinks": 5}, name="pair_sinks"),
    Case((1, 4, 41, 40), (1, 2, 66, 40), (1, 2, 66, 40), {"sinks": 2},
         {"window": _per_head([[-1, 0], [3, 0], [17, 5], [40, -1]])}, name="per_head"),
]


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("case", TILING_CASES, ids=[c.id for c in TILING_CASES])
def test_kernel_tilings(case, block_m, block_n):
    with force_config(block_m, block_n):
        report = check_case("sliding_window", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)


# ---------------------------------------------------------------------------------------------
# The block schedule: visits exactly the blocks with a visible pair; full blocks are all visible.
# ---------------------------------------------------------------------------------------------
SCHEDULE_PARAMS = [
    # (Nq, Nk, windows (one per head), sinks, block_m, block_n)
    (100, 100, [(15, 0)], 0, 16, 16),
    (100, 100, [(15, 0)], 4, 32, 16),
    (100, 100, [(40, 9)], 20, 16, 32),
    (37, 130, [(7, 2)], 3, 16, 16),
    (130, 37, [(7, 2)], 3, 32, 16),
    (90, 90, [(0, 0)], 0, 16, 16),
    (90, 90, [(0, 0)], 50, 16, 16),
    (1, 200, [(31, 0)], 4, 16, 16),
    (64, 64, [(-1, 0), (5, 0), (0, 0), (12, 30), (-1, -1), (3, -1)], 2, 16, 16),
    (70, 120, [(-1, 0), (9, 0), (25, 4)], 17, 32, 64),
]


@pytest.mark.parametrize("Nq,Nk,windows,sinks,bm,bn", SCHEDULE_PARAMS)
def test_schedule_is_exact_and_tight(Nq, Nk, windows, sinks, bm, bn):
    Hq = len(windows)
    window = windows[0] if Hq == 1 else torch.tensor(windows, dtype=torch.int32)
    schedule = make_schedule(window, sinks, Hq, Nq, Nk, torch.device(DEVICE))
    assert (schedule.args[3] is None) == (Hq == 1)  # per-head windows travel as a tensor
    check_schedule(schedule, dense_mask(Hq, Nq, Nk, windows, sinks), tilings=[(bm, bn)])


def test_schedule_cost_is_linear_in_n():
    """Key blocks visited per query block stay ~ (W + S) / BLOCK_N + 2 however long N is."""
    bm = bn = 16
    for n in (256, 1024):
        schedule = make_schedule(64, 16, 1, n, n, torch.device(DEVICE))
        segments = schedule_segments(schedule, 1, n, n, bm, bn)[0]
        counts = [sum(hi - lo for lo, hi in segs) for segs in segments]
        assert max(counts) <= (64 + 16) // bn + 2, counts


# ---------------------------------------------------------------------------------------------
# The reference: the specification itself, and its memory.
# ---------------------------------------------------------------------------------------------
REF_PARAMS = list(itertools.product([1, 17, 40], [1, 40], [-1, 0, 5], [-1, 0, 2], [0, 3, 50]))


@torch.no_grad()
def test_reference_matches_dense_definition():
    g = torch.Generator().manual_seed(0)
    for Nq, Nk, left, right, sinks in REF_PARAMS:
        q = torch.randn(1, 2, Nq, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, 1, Nk, 8, generator=g, dtype=torch.float64) for _ in range(2))
        got = sliding_window_reference(q, k, v, window=(left, right), sinks=sinks)
        want = dense_attention(q, k, v, [(left, right)] * 2, sinks)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=str((Nq, Nk, left, right, sinks)))


def test_reference_per_head_and_int_window():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 30, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rows = [(-1, 0), (3, 0), (0, 2), (3, 0)]
    got = sliding_window_reference(q, k, v, window=torch.tensor(rows), sinks=2)
    torch.testing.assert_close(got, dense_attention(q, k, v, rows, 2), rtol=0, atol=1e-12)
    # int W is (W - 1, 0), the Mistral / Hugging Face sliding_window
    torch.testing.assert_close(sliding_window_reference(q, k, v, window=7),
                               dense_attention(q, k, v, [(6, 0)] * 4, 0), rtol=0, atol=1e-12)
    # (-1, 0) is causal flash attention, (-1, -1) dense
    torch.testing.assert_close(sliding_window_reference(q, k, v, window=(-1, 0)),
                               attnkit.flash_attention(q, k, v, causal=True, backend="reference"))
    torch.testing.assert_close(sliding_window_reference(q, k, v, window=(-1, -1)),
                               attnkit.flash_attention(q, k, v, backend="reference"))


def test_reference_memory_is_proportional_to_window(monkeypatch):
    """No chunk of the reference ever holds more keys than its rows can see (no N x N); a
    chunk's work follows the window, or the fixed minimum chunk for windows below it."""
    spans = []
    real = sw_reference.softmax_attend

    def spy(q, k, v, **kw):
        spans.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sw_reference, "softmax_attend", spy)
    N, W, S = 4096, 64, 4
    q = torch.randn(1, 2, N, 16)
    k, v = torch.randn(1, 2, N, 16), torch.randn(1, 2, N, 16)
    out = sliding_window_reference(q, k, v, window=W, sinks=S)
    assert out.shape == (1, 2, N, 16) and len(spans) > 1
    for rows, keys in spans:
        assert keys <= rows + W - 1 + S, (rows, keys)
        assert rows * keys <= 4 * max(W + S, MIN_CHUNK_ROWS) ** 2, (rows, keys)


# ---------------------------------------------------------------------------------------------
# Public function, dispatch and gradients of extras.
# ---------------------------------------------------------------------------------------------
def test_public_function_backends_agree():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 50, 32, generator=g)
    k, v = torch.randn(1, 2, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g)
    window = torch.tensor([[-1, 0], [6, 0], [2, 2], [10, 0]], dtype=torch.int64)
    ref, ref_lse = sliding_window_attention(q, k, v, window=window, sinks=3, return_lse=True, backend="reference")
    ker, ker_lse = sliding_window_attention(q, k, v, window=window, sinks=3, return_lse=True, backend="triton")
    torch.testing.assert_close(ker, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ker_lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert ref_lse.dtype == torch.float32
    # auto on CPU takes the torch backend (the reference's semantics), and says why
    assert attnkit.explain(q, k, v, "sliding_window", window=8).backend == "torch"
    auto = sliding_window_attention(q, k, v, window=window, sinks=3)
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=2e-5)


def test_empty_rows_are_zero_without_nan():
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    k = torch.randn(1, 2, 10, 16, requires_grad=True)
    v = torch.randn(1, 2, 10, 16, requires_grad=True)
    for backend in ("reference", "triton"):
        out, lse = sliding_window_attention(q, k, v, window=(2, 0), return_lse=True, backend=backend)
        assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30]))
        assert torch.isinf(lse[:, :, :30]).all() and torch.isfinite(lse[:, :, 30:]).all()
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all()
            t.grad = None


# ---------------------------------------------------------------------------------------------
# The decode cache.
# ---------------------------------------------------------------------------------------------
def _sequence(seed, B, Hq, Hkv, N, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g, dtype=dtype), torch.randn(B, Hkv, N, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, N, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("window,sinks", [(8, 0), (8, 3), (1, 2), ((5, 0), 6), (16, 4)])
def test_cache_token_by_token_equals_full_sequence(window, sinks):
    q, k, v = _sequence(3, 2, 4, 2, 60, 16)
    full, full_lse = sliding_window_attention(q, k, v, window=window, sinks=sinks, return_lse=True,
                                              backend="reference")
    cache = SlidingWindowCache(window, sinks=sinks)
    outs, lses, sizes, ptrs = [], [], set(), set()
    for t in range(q.shape[2]):
        o, l = cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], return_lse=True,
                            backend="reference")
        outs.append(o)
        lses.append(l)
        sizes.add(cache.memory_bytes)
        ptrs.add(cache.keys.data_ptr())
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(lses, 2), full_lse, rtol=0, atol=1e-12)
    assert len(sizes) == 1 and len(ptrs) == 1, "the cache must not grow or reallocate"
    assert cache.keys.shape[2] == sinks + cache.window_size and cache.seen == q.shape[2]


def test_cache_chunked_prefill_then_decode_per_head_windows():
    q, k, v = _sequence(4, 1, 4, 2, 70, 16)
    window = torch.tensor([[9, 0], [0, 0], [4, 0], [12, 0]])
    full = sliding_window_attention(q, k, v, window=window, sinks=2, backend="reference")
    cache = SlidingWindowCache(window, sinks=2)
    assert cache.capacity == 2 + 13
    outs, t = [], 0
    for n in (1, 20, 5, 1, 13, 1, 1, 28):  # chunks larger and smaller than the window
        outs.append(cache.attend(q[:, :, t:t + n], k[:, :, t:t + n], v[:, :, t:t + n], backend="reference"))
        t += n
    assert t == q.shape[2]
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=0, atol=1e-12)


def test_cache_through_the_kernel():
    q, k, v = _sequence(5, 1, 4, 1, 40, 32, dtype=torch.float32)
    full = sliding_window_attention(q, k, v, window=12, sinks=4, backend="reference")
    cache = SlidingWindowCache(12, sinks=4)
    outs = [cache.attend(q[:, :, :24], k[:, :, :24], v[:, :, :24], backend="triton")]  # the ring wraps
    for t in range(24, 40):
        outs.append(cache.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], backend="triton"))
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=2e-5, rtol=2e-5)


def test_cache_bad_input():
    with pytest.raises(ValueError, match="finite left"):
        SlidingWindowCache((-1, 0))
    with pytest.raises(ValueError, match="right extent must be 0"):
        SlidingWindowCache((4, 2))
    with pytest.raises(ValueError, match="finite left"):
        SlidingWindowCache(torch.tensor([[3, 0], [-1, 0]]))
    with pytest.raises(ValueError, match="sinks"):
        SlidingWindowCache(8, sinks=-1)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowCache(0)
    cache = SlidingWindowCache(torch.tensor([[3, 0], [5, 0]]))
    q, k, v = _sequence(6, 1, 4, 2, 3, 8)
    with pytest.raises(ValueError, match=r"\(Hq, 2\) = \(4, 2\)"):
        cache.attend(q, k, v, backend="reference")
    cache = SlidingWindowCache(4)
    cache.attend(q, k, v, backend="reference")
    with pytest.raises(ValueError, match="do not match the cache"):
        cache.attend(q[:, :, :1, :4], k[:, :, :1, :4], v[:, :, :1, :4], backend="reference")
    with pytest.raises(ValueError, match="same new tokens"):
        cache.attend(q[:, :, :2], k[:, :, :1], v[:, :, :1], backend="reference")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# ---------------------------------------------------------------------------------------------
def _qkv():
    return torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)


@pytest.mark.parametrize("window,exc,match", [
    ((-2, 0), ValueError, r"window\[0\] \(left\) must be >= -1"),
    ((3, -5), ValueError, r"window\[1\] \(right\) must be >= -1"),
    (torch.tensor([[1, 0], [2, 0], [-2, 0], [0, 0]]), ValueError, r"window\[2, 0\] \(left\) must be >= -1"),
    (torch.tensor([[1, 0], [2, 0], [3, -3], [0, 0]]), ValueError, r"window\[2, 1\] \(right\) must be >= -1"),
    (torch.tensor([[1, 0], [2, 0]]), ValueError, r"shape \(Hq, 2\) = \(4, 2\)"),
    (torch.tensor([1, 0, 2, 0, 3, 0, 4, 0]), ValueError, r"shape \(Hq, 2\)"),
    (torch.zeros(4, 3, dtype=torch.int32), ValueError, r"shape \(Hq, 2\)"),
    (torch.zeros(4, 2), TypeError, "integer dtype"),
    (torch.zeros(4, 2, dtype=torch.bool), TypeError, "integer dtype"),
    (0, ValueError, "must be >= 1"),
    (-1, ValueError, "must be >= 1"),
    (2.5, TypeError, "window must be"),
    ("8", TypeError, "window must be"),
    ((1, 2, 3), ValueError, r"\(left, right\)"),
    ((1.0, 0), TypeError, r"window\[0\] \(left\) must be an int"),
    (None, TypeError, "needs window="),
])
def test_bad_window(window, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        sliding_window_attention(q, k, v, window=window)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(sinks=-1), ValueError, "sinks must be >= 0"),
    (dict(sinks=2.0), TypeError, "sinks must be an int"),
    (dict(sinks=True), TypeError, "sinks must be an int"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(sink_logits=torch.zeros(3)), ValueError, "sink_logits must have shape"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_options(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        sliding_window_attention(q, k, v, window=4, **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        sliding_window_attention(q[:, :3], k, v, window=4)
    with pytest.raises(TypeError, match="share one dtype"):
        sliding_window_attention(q, k.double(), v, window=4)
    with pytest.raises(ValueError, match="rank 4"):
        sliding_window_attention(q[0], k, v, window=4)
    with pytest.raises(TypeError, match="unknown option"):
        attnkit.attention(q, k, v, "sliding_window", window=4, causal=True)
