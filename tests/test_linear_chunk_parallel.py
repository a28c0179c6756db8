"""The chunk-parallel linear engine (issue 15 item 3): a states pass that writes the state at
every chunk boundary, then an output pass over all chunks at once, for linear, lightning and
gla with scalar gates; forward, final state and every gradient (q, k, v, decay/slopes/g,
initial_state) against the float64 references, awkward lengths, Dk != Dv, GQA, packed
sequences, a feature map above 256 on the kernel, the decoding step, and the error-ratio rule
in float16 (the state update on the input dtype's tensor cores)."""

import pytest
import torch
from attnkit.kernels.linear import force_chunk, launch
from conftest import DEVICE
from torch.nn.functional import logsigmoid

import attnkit
from attnkit.registry import Case
from attnkit.testing import check_case, relative_error

F64 = torch.float64
NAMES = ["out", "state", "dq", "dk", "dv", "dgate", "dinitial_state"]


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def log_gates(*shape, seed=5):
    return logsigmoid(rand(*shape, seed=seed) + 2.0)


def with_grads(call, tensors, dtype):
    """call(*leaves) -> (out, state); backprop a random loss through both. Leaves in ``dtype``
    (float64 for the oracle); returns [out, state, *grads] as float64."""
    leaves = [t.to(dtype).to(DEVICE).requires_grad_(True) for t in tensors]
    out, state = call(*leaves)
    up, up_state = rand(*out.shape, seed=11), rand(*state.shape, seed=12)
    loss = (out.double() * up.to(DEVICE)).sum() + (state.double() * up_state.to(DEVICE)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [x.detach().double() for x in (out, state, *grads)]


def compare(call, tensors, dtype=torch.float32, tol=2e-5, names=NAMES):
    want = with_grads(lambda *a: call("reference", *a), tensors, F64)
    got = with_grads(lambda *a: call("triton", *a), tensors, dtype)
    for name, a, b in zip(names, got, want):
        err = relative_error(a, b.to(a.device))
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def gla(backend, q, k, v, g, s0, **kw):
    return attnkit.gated_linear_attention(q, k, v, g, initial_state=s0, return_state=True, backend=backend, **kw)


# --------------------------------------------------------------------------- gla, scalar gates

@pytest.mark.parametrize("n", [1, 113])
def test_gla_scalar_gates_every_output_and_gradient(n):
    """Dk != Dv (Dk = 40: two feature slices under the interpreter), GQA (2 query heads on 1 kv
    head), an initial state; N = 1 is the decoding step (lightning below takes N = 17)."""
    q, k, v = rand(1, 2, n, 40), rand(1, 1, n, 40, seed=1), rand(1, 1, n, 24, seed=2)
    tensors = [q, k, v, log_gates(1, 2, n), rand(1, 2, 40, 24, seed=3, scale=0.5)]
    compare(lambda b, *a: gla(b, *a, scale=0.3), tensors)


def test_gla_strong_gates_and_chunk_sizes():
    """Gates far below 0 (log-decays of -8 per token: a chunk's cumulative gate reaches -500) stay
    finite: every exponent is <= 0. Two chunk sizes: 16 (many chunks) and 64 (one chunk). The
    decays are differences of float32 cumulative sums reaching -200, exact to about |b| * 2^-24:
    a relative error near 1e-5 rather than 1e-6, as in flash-linear-attention."""
    q, k, v = rand(1, 1, 50, 16), rand(1, 1, 50, 16, seed=1), rand(1, 1, 50, 16, seed=2)
    g = -8 * torch.rand(1, 1, 50, generator=torch.Generator().manual_seed(4), dtype=F64)
    for tiling in [(16, 16), (64, 16)]:
        with force_chunk(*tiling):
            compare(lambda b, *a: gla(b, *a), [q, k, v, g, rand(1, 1, 16, 16, seed=3)], tol=1e-4)


def test_gla_packed_sequences_with_states():
    """cu_seqlens: one launch per pass over every sequence's chunks (lengths 40, 0, 1, 30), each
    from its own state row; dg restarts with each sequence."""
    cu = torch.tensor([0, 40, 40, 41, 71], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(1, 2, 71, 16), rand(1, 2, 71, 16, seed=1), rand(1, 2, 71, 24, seed=2)
    tensors = [q, k, v, log_gates(1, 2, 71), rand(4, 2, 16, 24, seed=3, scale=0.5)]
    compare(lambda b, *a: gla(b, *a, cu_seqlens=cu), tensors)


def test_gla_float16():
    q, k, v = rand(1, 2, 50, 16), rand(1, 2, 50, 16, seed=1), rand(1, 2, 50, 16, seed=2)
    compare(lambda b, *a: gla(b, *a), [q, k, v, log_gates(1, 2, 50), rand(1, 2, 16, 16, seed=3)],
            dtype=torch.float16, tol=1e-2)


def test_gla_decoding_step_takes_the_recurrent_kernel(recurrent_launches):
    calls = recurrent_launches
    q, g, s0 = rand(2, 2, 1, 16).float(), log_gates(2, 2, 1).float(), rand(2, 2, 16, 16, seed=3).float()
    out = attnkit.gated_linear_attention(q, q, q, g, initial_state=s0, backend="triton")
    assert len(calls) == 1
    want = attnkit.gated_linear_attention(q.double(), q.double(), q.double(), g.double(), initial_state=s0.double(),
                                          backend="reference")
    assert relative_error(out, want) < 1e-6
    # packed: one token among empty sequences, each from its own state row
    cu = torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    s3 = rand(3, 2, 16, 16, seed=4).float()
    out, state = attnkit.gated_linear_attention(q[:1], q[:1], q[:1], g[:1], initial_state=s3, cu_seqlens=cu,
                                                return_state=True, backend="triton")
    assert len(calls) == 2
    want = attnkit.gated_linear_attention(*(x.double() for x in (q[:1], q[:1], q[:1], g[:1])),
                                          initial_state=s3.double(), cu_seqlens=cu, return_state=True,
                                          backend="reference")
    assert relative_error(out, want[0]) < 1e-6 and relative_error(state, want[1]) < 1e-6


def test_gla_kernel_takes_both_gate_forms():
    # scalar gates on this engine, per-channel gates on kernels/gla.py (tests/test_gla_kernel.py)
    q = rand(1, 2, 17, 8).float()
    g = log_gates(1, 2, 17, 8).float()
    assert attnkit.explain(q, q, q, "gla", "triton", g=g).kernel_blockers == []
    assert attnkit.explain(q, q, q, "gla", "triton", g=g[..., 0]).kernel_blockers == []


# --------------------------------------------------------------------------- linear, lightning

def test_lightning_every_output_and_gradient():
    n = 17   # gla above takes 1 and 113 (tests/test_linear.py runs lightning at more lengths)
    q, k, v = rand(1, 2, n, 16), rand(1, 2, n, 16, seed=1), rand(1, 2, n, 32, seed=2)
    slopes = attnkit.lightning_slopes(2).double()

    def call(backend, q, k, v, s, s0):
        return attnkit.lightning_attention(q, k, v, s, initial_state=s0, return_state=True, backend=backend)

    compare(call, [q, k, v, slopes, rand(1, 2, 16, 32, seed=3)])


def test_linear_gqa_decay_every_output_and_gradient():
    q, k, v = rand(1, 4, 45, 16), rand(1, 2, 45, 16, seed=1), rand(1, 2, 45, 8, seed=2)
    decay = torch.tensor([0.05, 0.2, 0.0, 0.5], dtype=F64)

    def call(backend, q, k, v, d, s0):
        return attnkit.linear_attention(q, k, v, decay=d, scale=0.5, initial_state=s0, return_state=True,
                                        backend=backend)

    compare(call, [q, k, v, decay, rand(1, 4, 16, 8, seed=3)])


def test_taylor_feature_map_above_256_runs_on_the_kernel():
    """BASED's Taylor map of a 16-dim key has F = 273 features: the passes tile over Dk (a
    512-wide feature block would not fit), so the kernel takes it; with normalize too."""
    q, k, v = rand(1, 1, 40, 16, scale=0.5), rand(1, 1, 40, 16, seed=1, scale=0.5), rand(1, 1, 40, 16, seed=2)
    options = {"feature_map": "taylor", "normalize": True}
    assert attnkit.explain(q.float(), k.float(), v.float(), "linear", "triton", **options).kernel_blockers == []

    def call(backend, q, k, v, s0):
        return attnkit.linear_attention(q, k, v, initial_state=s0, return_state=True, backend=backend, **options)

    compare(call, [q, k, v, rand(1, 1, 273, 17, seed=3, scale=0.1)], names=["out", "state", "dq", "dk", "dv",
                                                                           "dinitial_state"])


def test_output_pass_runs_every_chunk_in_parallel(monkeypatch):
    """The forward launches the states pass once, then one output program per (chunk, value
    block, batch * head): a batch of one still has as many programs as chunks."""
    grids = {}
    for name in ("linear_states_kernel", "linear_output_kernel"):
        real = getattr(launch, name)

        class Spy:
            def __init__(self, name, real):
                self.name, self.real = name, real

            def __getitem__(self, grid):
                grids.setdefault(self.name, []).append(grid)
                return self.real[grid]

        monkeypatch.setattr(launch, name, Spy(name, real))
    q = rand(1, 2, 100, 16).float()
    with force_chunk(16, 16):
        attnkit.lightning_attention(q, q, q, attnkit.lightning_slopes(2), backend="triton")
    assert grids["linear_states_kernel"] == [(1, 1, 2)]
    assert grids["linear_output_kernel"] == [(7, 1, 2)]        # 7 chunks of 16 rows, all at once


# --------------------------------------------------------------------------- the error-ratio rule

def test_float16_meets_the_error_ratio_rule():
    """The harness's FlashAttention rule in float16 (kernel error within 2x, gradients 3x, the
    float16 reference's own error): the intra-chunk products and the state update k^T v take
    float16 operands with float32 accumulation."""
    case = Case((1, 1, 100, 32), (1, 1, 100, 32), (1, 1, 100, 32), {},
                {"g": lambda gen: logsigmoid(torch.randn(1, 1, 100, generator=gen, dtype=F64) + 3),
                 "initial_state": lambda gen: torch.randn(1, 1, 32, 32, generator=gen, dtype=F64)},
                name="scalar_gates_state")
    report = check_case("gla", case, dtype=torch.float16, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    assert {"out", "state", "dq", "dk", "dv", "dg", "dinitial_state"} <= {c.name for c in report.comparisons}


def test_status_table_row_names_a_declared_refusal():
    """python -m attnkit: a refusal the kernel declares (gla with scalar gates and a value dim above
    the engine's MAX_KERNEL_DIM) is said as such."""
    from attnkit.__main__ import check_one
    from attnkit.linear import MAX_KERNEL_DIM

    spec = attnkit.get_variant("gla")
    shape = (1, 2, 16, 16)
    case = Case(shape, shape, (1, 2, 16, MAX_KERNEL_DIM + 16), {}, {"g": lambda gen: log_gates(1, 2, 16)},
                name="wide_values")
    row = check_one(spec, case, "triton", torch.float32, torch.device(DEVICE), 1)
    assert row[-1].startswith("kernel refuses: value dim"), row
