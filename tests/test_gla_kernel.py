"""The Triton kernel of gated linear attention with per-channel gates (``kernels/gla.py``,
``attnkit.gla.kernel``; issue 15 item 3): forward, final state and every gradient against
the float64 step-by-step recurrence, at awkward lengths, Dk != Dv, GQA, several Dk and Dv
blocks, packed sequences with empty ones, two chunk sizes, gates strong enough that one
exp(G) split over a chunk would overflow, float32 and float16 (the interpreter computes
bfloat16 dots wrongly). Shapes are tiny: the interpreter is slow."""

import pytest
import torch
from attnkit.kernels import gla as gla_kernels
from conftest import DEVICE
from torch.nn.functional import logsigmoid

from attnkit.gla.kernel import gla_vector_kernel
from attnkit.gla.reference import gla_reference
from attnkit.runtime import poison_outputs
from attnkit.testing import relative_error

F64 = torch.float64
NAMES = ["out", "state", "dq", "dk", "dv", "dg", "dinitial_state"]
#: relative error allowed against the float64 recurrence
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3}


def rand(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(DEVICE)


def problem(B=1, H=2, Hkv=None, N=17, Dk=16, Dv=16, shift=2.0, states=None, seed=0):
    """float64 q, k, v, per-channel gates logsigmoid(N(shift, 1)) and an initial state."""
    Hkv = H if Hkv is None else Hkv
    g = logsigmoid(rand(B, H, N, Dk, seed=seed + 3) + shift)
    return (rand(B, H, N, Dk, seed=seed), rand(B, Hkv, N, Dk, seed=seed + 1), rand(B, Hkv, N, Dv, seed=seed + 2),
            g, rand(B if states is None else states, H, Dk, Dv, seed=seed + 4, scale=0.5))


def run(fn, tensors, dtype, **options):
    """out, final state and the gradients of q, k, v, g, initial_state (in that order) of a
    fixed random loss on out and the state."""
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in tensors[:4]]
    leaves.append(tensors[4].detach().to(F64 if dtype == F64 else torch.float32).requires_grad_(True))
    out, state = fn(*leaves[:3], g=leaves[3], initial_state=leaves[4], return_state=True, **options)
    loss = (out.to(F64) * rand(*out.shape, seed=9)).sum() + (state.to(F64) * rand(*state.shape, seed=10)).sum()
    return [out, state, *torch.autograd.grad(loss, leaves)]


def kernel(q, k, v, *, g, **options):
    return gla_vector_kernel(q, k, v, g, **options)


def check(tensors, dtype=torch.float32, **options):
    want = run(gla_reference, tensors, F64, **options)
    with poison_outputs():   # an element the kernels forget to write is NaN
        got = run(kernel, tensors, dtype, **options)
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} != {tuple(b.shape)}"
        err = relative_error(a, b)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]:g} ({dtype})"


@pytest.fixture
def chunk():
    """Run the kernels with another chunk size (rows per chunk; sub-chunks stay 16)."""
    yield gla_kernels.set_chunk
    gla_kernels.set_chunk(None)


@pytest.mark.parametrize("shape", [
    {"N": 113, "Dk": 16, "Dv": 8, "H": 2, "Hkv": 1},  # two chunks, the last ragged; Dk != Dv; GQA
    {"N": 1, "Dk": 8, "Dv": 16},                      # one token: the recurrent forward, the chunked backward
    {"N": 20, "Dk": 40, "Dv": 72, "H": 1},            # two Dk blocks in the sub-chunk kernels, two Dv blocks
], ids=["n113_gqa", "n1", "dk40_dv72"])
def test_matches_the_recurrence_float32(shape):
    check(problem(**shape), scale=0.7 if shape["N"] == 1 else None)


@pytest.mark.parametrize("lengths", [(1, 16, 0, 36), (1, 0, 1, 1)], ids=["chunked", "decode_step"])
def test_packed_sequences_with_empty_ones(lengths):
    # each sequence from its own state row, its chunks from its first row; sequences of at most
    # one token are a decoding step, which the token-by-token kernel runs
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    tensors = problem(N=sum(lengths), Dk=16, Dv=24, states=len(lengths))
    assert gla_kernels.recurrent_fits(tensors[0], cu) == (max(lengths) <= 1)
    check(tensors, cu_seqlens=cu)


def test_strong_gates_stay_exact_at_two_chunk_sizes(chunk):
    # logsigmoid(N(-3, 1)): a 32-row chunk's gates sum far below -88, so exp(G_ref - G_j) over a
    # whole chunk would overflow in float32; the sub-chunk split keeps every exponent <= 0
    tensors = problem(N=70, Dk=16, Dv=16, H=1, shift=-3.0)
    partial = tensors[3][..., :32, :].sum(2)
    assert partial.max() < -88.0
    for rows in (32, 64):
        chunk(rows)
        check(tensors)


def test_float16():
    check(problem(N=90, Dk=32, Dv=16, H=1, shift=0.0), dtype=torch.float16)


def test_scalar_gates_and_bad_chunks_are_refused():
    q, k, v, g, _ = problem(N=4)
    with pytest.raises(ValueError, match=r"per-channel gates g of shape \(B, Hq, N, Dk\)"):
        gla_vector_kernel(q.float(), k.float(), v.float(), g[..., 0].float())
    for bad in (8, 48):
        with pytest.raises(ValueError, match="chunk must be a power of two >= 16"):
            gla_kernels.set_chunk(bad)


def test_empty_sequence_passes_the_state_through():
    q, k, v, g, s0 = (x.float() for x in problem(N=0, Dk=16, Dv=8))
    s0.requires_grad_(True)
    out, state = gla_vector_kernel(q, k, v, g, initial_state=s0, return_state=True)
    assert out.shape == (1, 2, 0, 8)
    assert torch.equal(state, s0)
    state.sum().backward()
    assert torch.equal(s0.grad, torch.ones_like(s0))


def test_dispatch_takes_this_kernel_for_per_channel_gates(monkeypatch):
    # backend="triton" with gates (B, Hq, N, Dk) runs these kernels, nothing refused; scalar gates
    # (B, Hq, N) stay on the linear engine
    import attnkit

    calls, real = [], gla_kernels.gla_forward
    monkeypatch.setattr(gla_kernels, "gla_forward", lambda *args: calls.append(1) or real(*args))
    q, k, v, g, _ = (x.float() for x in problem(N=20))
    assert attnkit.explain(q, k, v, "gla", "triton", g=g).kernel_blockers == []
    out = attnkit.gated_linear_attention(q, k, v, g, backend="triton")
    assert len(calls) == 1
    attnkit.gated_linear_attention(q, k, v, g[..., 0], backend="triton")
    assert len(calls) == 1
    assert torch.equal(out, gla_vector_kernel(q, k, v, g))
