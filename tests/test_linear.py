"""Linear and lightning attention: the forms of the reference agree, the chunked Triton
engine (forward and backward, through the interpreter on CPU) matches the reference at
awkward sizes and tilings, states compose (split prefill, token-by-token decoding),
normalization, the non-causal form, feature maps, slopes, and every bad input."""

import math

import pytest
import torch

import attnkit
from attnkit.kernels.linear import force_chunk, linear_forward
from attnkit.linear import feature_maps
from attnkit.linear.reference import chunked_form, parallel_form, recurrent_form
from attnkit.testing import relative_error

from conftest import DEVICE, DTYPES

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rates(heads, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(heads, generator=g, dtype=torch.float64) * 0.3 + 0.01).float().to(DEVICE)


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) if x is not None else None for x in xs]


def run_with_grads(fn, tensors, seed=1):
    """Call fn(*tensors) -> (out, state); backprop a random loss through both outputs."""
    out, state = fn(*tensors)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(DEVICE)
    gs = torch.randn(state.shape, generator=g, dtype=torch.float64).to(state.dtype).to(DEVICE)
    ((out * go).sum() + (state * gs).sum()).backward()
    return out.detach(), state.detach(), [None if t is None else t.grad for t in tensors]


def assert_close(actual, expected, tol, what):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


# --------------------------------------------------------------------------- reference forms

@pytest.mark.parametrize("with_decay", [False, True])
def test_reference_forms_agree(with_decay):
    q, k, v = randn(2, 3, 70, 8, dtype=torch.float64), randn(2, 3, 70, 8, dtype=torch.float64, seed=1), \
        randn(2, 3, 70, 5, dtype=torch.float64, seed=2)
    s = rates(3).double() if with_decay else None
    s0 = randn(2, 3, 8, 5, dtype=torch.float64, seed=3)
    o_r, st_r = recurrent_form(q, k, v, s, 0.3, s0)
    for o, st in (parallel_form(q, k, v, s, 0.3, s0), chunked_form(q, k, v, s, 0.3, s0, chunk=16),
                  chunked_form(q, k, v, s, 0.3, s0, chunk=33)):
        assert_close(o, o_r, 1e-12, "out")
        assert_close(st, st_r, 1e-12, "state")


def test_reference_long_sequence_never_builds_n_by_n(monkeypatch):
    """The reference runs a long sequence through chunks: no intermediate has N x N entries."""
    seen = []
    real = torch.matmul

    def spy(a, b):
        out = real(a, b)
        seen.append(out.shape[-2] * out.shape[-1])
        return out

    monkeypatch.setattr(torch, "matmul", spy)
    q = randn(1, 1, 1000, 4)
    attnkit.linear_attention(q, q, q, decay=rates(1), backend="reference")
    assert seen and max(seen) <= 128 * 128


def test_reference_gradcheck_decay_and_state():
    q, k, v = (randn(1, 2, 9, 3, dtype=torch.float64, seed=i) for i in range(3))
    s = rates(2).double().requires_grad_(True)
    s0 = randn(1, 2, 3, 3, dtype=torch.float64, seed=5).requires_grad_(True)

    def f(q, k, v, s, s0):
        return attnkit.linear_attention(q, k, v, decay=s, initial_state=s0, return_state=True,
                                        backend="reference")

    assert torch.autograd.gradcheck(f, leaves(q, k, v) + [s, s0])


# --------------------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", [1, 63, 200])
def test_kernel_forward_backward_d_ne_dv(n, dtype):
    """D != Dv (not powers of two), decay, initial state, gradients of everything incl. the state."""
    B, H, D, Dv = 1, 2, 40, 24
    q, k, v = randn(B, H, n, D, dtype=dtype), randn(B, H, n, D, dtype=dtype, seed=1), \
        randn(B, H, n, Dv, dtype=dtype, seed=2)
    s, s0 = rates(H), randn(B, H, D, Dv, seed=3, scale=0.5)

    def call(backend):
        return lambda q, k, v, s, s0: attnkit.linear_attention(q, k, v, decay=s, initial_state=s0,
                                                               return_state=True, backend=backend)

    ref = run_with_grads(call("reference"), leaves(q.double(), k.double(), v.double(), s.double(), s0.double()))
    ker = run_with_grads(call("triton"), leaves(q, k, v, s, s0))
    tol = TOL[dtype] * (3 if n == 200 else 1)
    assert ker[0].dtype == dtype and ker[1].dtype == torch.float32
    assert_close(ker[0], ref[0], tol, "out")
    assert_close(ker[1], ref[1], tol, "state")
    want_dtypes = [dtype, dtype, dtype, torch.float32, torch.float32]
    for name, a, b, want in zip(["dq", "dk", "dv", "ddecay", "dinitial_state"], ker[2], ref[2], want_dtypes):
        assert a is not None and a.dtype == want, f"{name}: {None if a is None else a.dtype}"
        assert_close(a, b, 2 * tol, name)


@pytest.mark.parametrize("tiling", [(16, 16), (32, 16), (64, 32)])
def test_kernel_tilings_gqa(tiling):
    """Several chunk sizes / value blocks; GQA (Hq = 4, Hkv = 2); N not a multiple of any chunk."""
    q, k, v = randn(2, 4, 77, 20), randn(2, 2, 77, 20, seed=1), randn(2, 2, 77, 36, seed=2)
    s = rates(4)

    def call(backend):
        return lambda q, k, v, s: attnkit.linear_attention(q, k, v, decay=s, scale=0.7, return_state=True,
                                                           backend=backend)

    ref = run_with_grads(call("reference"), leaves(q.double(), k.double(), v.double(), s.double()))
    with force_chunk(*tiling):
        ker = run_with_grads(call("triton"), leaves(q, k, v, s))
    assert_close(ker[0], ref[0], 2e-5, "out")
    assert_close(ker[1], ref[1], 2e-5, "state")
    for name, a, b in zip(["dq", "dk", "dv", "ddecay"], ker[2], ref[2]):
        assert_close(a, b, 5e-5, name)


def test_recurrent_kernel_matches_chunked_at_several_lengths():
    """The token-by-token kernel (used for decoding) at N > 1 equals the reference."""
    q, k, v = randn(1, 2, 19, 24), randn(1, 2, 19, 24, seed=1), randn(1, 2, 19, 40, seed=2)
    s, s0 = rates(2), randn(1, 2, 24, 40, seed=3)
    out, state = linear_forward(q, k, v, s, 0.25, s0.contiguous(), recurrent=True)
    ref_o, ref_s = recurrent_form(q.double(), k.double(), v.double(), s.double(), 0.25, s0.double())
    assert_close(out, ref_o, 2e-6, "out")
    assert_close(state, ref_s, 2e-6, "state")


# --------------------------------------------------------------------------- states

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("split", [1, 37, 64, 99])
def test_state_split_at_arbitrary_point(backend, split):
    q, k, v = randn(1, 2, 100, 16), randn(1, 2, 100, 16, seed=1), randn(1, 2, 100, 24, seed=2)
    s = rates(2)
    whole, final = attnkit.linear_attention(q, k, v, decay=s, return_state=True, backend=backend)
    o1, st = attnkit.linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], decay=s,
                                      return_state=True, backend=backend)
    o2, st = attnkit.linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], decay=s,
                                      initial_state=st, return_state=True, backend=backend)
    assert_close(torch.cat([o1, o2], dim=2), whole, 1e-5, "out")
    assert_close(st, final, 1e-5, "state")


def test_token_by_token_decoding_equals_prefill(device):
    """Prefill 13 tokens, then decode 7 one at a time (the recurrent fast path); lightning variant."""
    H = 4
    q, k, v = randn(2, H, 20, 32), randn(2, H, 20, 32, seed=1), randn(2, H, 20, 16, seed=2)
    slopes = attnkit.lightning_slopes(H).to(device)
    whole, final = attnkit.lightning_attention(q, k, v, slopes, return_state=True, backend="triton")
    outs = []
    out, state = attnkit.lightning_attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], slopes,
                                             return_state=True, backend="triton")
    outs.append(out)
    for t in range(13, 20):
        out, state = attnkit.lightning_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], slopes,
                                                 initial_state=state, return_state=True, backend="triton")
        outs.append(out)
    assert_close(torch.cat(outs, dim=2), whole, 1e-5, "decoded outputs")
    assert_close(state, final, 1e-5, "state")


def test_decoding_step_takes_recurrent_path(recurrent_launches):
    calls = recurrent_launches
    q = randn(1, 2, 1, 16)
    attnkit.linear_attention(q, q, q, initial_state=randn(1, 2, 16, 16), backend="triton")
    assert len(calls) == 1
    attnkit.linear_attention(randn(1, 2, 5, 16), randn(1, 2, 5, 16), randn(1, 2, 5, 16), backend="triton")
    assert len(calls) == 1, "a 5-token call should take the chunked kernel"


# --------------------------------------------------------------------------- decay, normalize, non-causal

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decay_none_vs_tiny_slopes(backend):
    q, k, v = randn(1, 2, 50, 16), randn(1, 2, 50, 16, seed=1), randn(1, 2, 50, 16, seed=2)
    none = attnkit.linear_attention(q, k, v, backend=backend)
    tiny = attnkit.linear_attention(q, k, v, decay=torch.full((2,), 1e-7, device=DEVICE), backend=backend)
    zero = attnkit.linear_attention(q, k, v, decay=torch.zeros(2, device=DEVICE), backend=backend)
    assert_close(tiny, none, 1e-5, "tiny slopes")
    assert_close(zero, none, 1e-6, "zero slopes")
    strong = attnkit.linear_attention(q, k, v, decay=torch.full((2,), 1.0, device=DEVICE), backend=backend)
    assert relative_error(strong, none) > 0.1, "a real decay must change the result"


def naive_normalized(q, k, v, lam, scale, eps):
    """Explicit double loop: o_t = sum_s lam^(t-s) (q_t.k_s) v_s / (sum_s lam^(t-s) q_t.k_s + eps)."""
    B, H, N, _ = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for t in range(N):
        w = torch.stack([lam.view(1, -1) ** (t - s) * scale * (q[:, :, t] * k[:, :, s]).sum(-1)
                         for s in range(t + 1)], dim=-1)                   # (B, H, t + 1)
        out[:, :, t] = torch.einsum("bhs,bhse->bhe", w, v[:, :, :t + 1]) / (w.sum(-1, keepdim=True) + eps)
    return out


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_normalize_matches_explicit_formula(backend):
    q, k, v = randn(1, 2, 30, 8), randn(1, 2, 30, 8, seed=1), randn(1, 2, 30, 12, seed=2)
    s = rates(2)
    out, state = attnkit.linear_attention(q, k, v, decay=s, normalize=True, feature_map="elu+1",
                                          return_state=True, backend=backend)
    fq, fk = feature_maps.elu_plus_one(q.double()), feature_maps.elu_plus_one(k.double())
    want = naive_normalized(fq, fk, v.double(), torch.exp(-s.double()), 1 / math.sqrt(8), 1e-6)
    assert_close(out, want, 2e-5, "normalized out")
    assert state.shape == (1, 2, 8, 13), "normalize keeps z as the state's last column"
    lam = torch.exp(-s.double()).view(1, 2, 1)
    z = sum(lam ** (29 - t) * fk[:, :, t] for t in range(30))
    assert_close(state[..., -1], z, 2e-5, "z column")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_noncausal(backend, normalize):
    q, k, v = randn(2, 2, 25, 16), randn(2, 2, 40, 16, seed=1), randn(2, 2, 40, 8, seed=2)
    out = attnkit.linear_attention(q, k, v, causal=False, feature_map="relu", normalize=normalize, scale=0.5,
                                   backend=backend)
    fq, fk = torch.relu(q.double()), torch.relu(k.double())
    scores = 0.5 * fq @ fk.transpose(-1, -2)                               # (B, H, Nq, Nk), test only
    want = scores @ v.double()
    if normalize:
        want = want / (scores.sum(-1, keepdim=True) + 1e-6)
    assert_close(out, want, 2e-5, "non-causal out")


def test_lightning_is_linear_with_scale_one_and_slopes():
    q, k, v = randn(1, 4, 40, 16), randn(1, 4, 40, 16, seed=1), randn(1, 4, 40, 16, seed=2)
    slopes = attnkit.lightning_slopes(4, 2, 6)
    a = attnkit.lightning_attention(q, k, v, slopes, backend="triton")
    b = attnkit.linear_attention(q, k, v, decay=slopes, scale=1.0, backend="reference")
    assert_close(a, b, 2e-5, "lightning vs linear")


def test_auto_backend_on_cpu_uses_the_torch_backend_and_bf16_runs():
    q = randn(1, 2, 10, 16, dtype=torch.bfloat16)
    if DEVICE == "cpu":
        assert attnkit.explain(q, q, q, "linear").backend == "torch"
    for backend in ("reference", "torch"):
        out, state = attnkit.linear_attention(q, q, q, return_state=True, backend=backend)
        assert out.dtype == torch.bfloat16 and state.dtype == torch.float32


# --------------------------------------------------------------------------- feature maps

def test_feature_map_shapes_and_taylor_identity():
    x, y = randn(1, 2, 5, 6, dtype=torch.float64), randn(1, 2, 5, 6, dtype=torch.float64, seed=1)
    for name in feature_maps.NAMES:
        fn = feature_maps.resolve(name)
        assert fn(x).shape[-1] == feature_maps.output_dim(name, 6)
    assert feature_maps.resolve("elu") is feature_maps.elu_plus_one
    assert bool((feature_maps.elu_plus_one(x) > 0).all())
    s = (x * y).sum(-1) / math.sqrt(6)
    dot = (feature_maps.taylor(x) * feature_maps.taylor(y)).sum(-1)
    assert_close(dot, 1 + s + s * s / 2, 1e-12, "taylor kernel")


def test_hedgehog_module_learns_through_the_kernel():
    hh = feature_maps.Hedgehog(16, feature_dim=8, num_heads=2).to(DEVICE)
    q, k, v = randn(1, 2, 20, 16), randn(1, 2, 20, 16, seed=1), randn(1, 2, 20, 16, seed=2)
    grads = {}
    for backend in ("reference", "triton"):
        hh.zero_grad()
        out = attnkit.linear_attention(q, k, v, feature_map=hh, normalize=True, backend=backend)
        assert out.shape == (1, 2, 20, 16)
        out.square().sum().backward()
        grads[backend] = hh.weight.grad.clone()
    assert grads["triton"].abs().max() > 0
    assert_close(grads["triton"], grads["reference"], 1e-4, "Hedgehog weight grad")
    phi = hh(q)
    assert phi.shape[-1] == 16 and bool((phi > 0).all())


def test_feature_map_callable_and_state_shape_follow_feature_dim():
    q = randn(1, 1, 6, 4)
    out, state = attnkit.linear_attention(q, q, q, feature_map=lambda x: torch.cat([x, x * x], -1),
                                          return_state=True, backend="triton")
    assert state.shape == (1, 1, 8, 4)
    with pytest.raises(ValueError, match="initial_state"):
        attnkit.linear_attention(q, q, q, feature_map=lambda x: torch.cat([x, x], -1),
                                 initial_state=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="feature_map"):
        attnkit.linear_attention(q, q, q, feature_map=lambda x: x[..., :2, :])


# --------------------------------------------------------------------------- slopes

def test_lightning_slopes():
    assert torch.equal(attnkit.lightning_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = attnkit.lightning_slopes(4, layer_idx=1, num_layers=3)
    want = torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(4)], dtype=torch.float64) * (1 - 1 / 2 + 1e-5)
    assert torch.allclose(s.double(), want, rtol=1e-6) and s.dtype == torch.float32
    last = attnkit.lightning_slopes(4, layer_idx=2, num_layers=3)
    assert torch.allclose(last.double(), want / (0.5 + 1e-5) * 1e-5, rtol=1e-5)
    for bad, err in (((0,), ValueError), ((4, 3, 3), ValueError), ((4, -1, 3), ValueError),
                     ((4.0,), TypeError), ((4, 0, 0), ValueError)):
        with pytest.raises(err):
            attnkit.lightning_slopes(*bad)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,err,match", [
    (dict(decay=torch.tensor([0.1, -0.2])), ValueError, "decay must be >= 0"),
    (dict(decay=torch.tensor([0.1, float("nan")])), ValueError, "decay must be finite"),
    (dict(decay=torch.tensor([0.1, 0.2, 0.3])), ValueError, r"decay must have shape \(2,\)"),
    (dict(decay=[0.1, 0.2]), TypeError, "decay must be a tensor"),
    (dict(decay=torch.tensor([0.1, 0.2]), causal=False), ValueError, "decay needs causal=True"),
    (dict(initial_state=torch.zeros(1, 2, 8, 9)), ValueError, "initial_state must have shape"),
    (dict(initial_state=torch.zeros(1, 2, 8)), ValueError, "initial_state must have rank 4"),
    (dict(initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.float64)), TypeError, "initial_state must have dtype"),
    (dict(initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.int32)), TypeError, "initial_state must have dtype"),
    (dict(initial_state=torch.zeros(1, 2, 8, 8), normalize=True), ValueError, "normalize=True adds one column"),
    (dict(initial_state="state"), TypeError, "initial_state must be a tensor"),
    (dict(feature_map="softmax"), ValueError, "unknown feature_map"),
    (dict(feature_map=3), TypeError, "feature_map must be"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(return_state="yes"), TypeError, "return_state must be a bool"),
])
def test_bad_input_linear(kwargs, err, match):
    q = randn(1, 2, 10, 8)
    with pytest.raises(err, match=match):
        attnkit.linear_attention(q, q, q, **kwargs)


def test_bad_input_shapes():
    q = randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="Nq == Nk"):
        attnkit.linear_attention(q, randn(1, 2, 12, 8), randn(1, 2, 12, 8))
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attnkit.linear_attention(randn(1, 3, 10, 8), q, q)


@pytest.mark.parametrize("slopes,err,match", [
    (None, TypeError, "needs slopes"),
    (torch.tensor([0.5, -0.1]), ValueError, "slopes must be >= 0"),
    (torch.tensor([0.5, 0.2, 0.1]), ValueError, r"slopes must have shape \(2,\)"),
    (torch.tensor([1, 2]), TypeError, "slopes must be a floating tensor"),
])
def test_bad_input_lightning(slopes, err, match):
    q = randn(1, 2, 10, 8)
    with pytest.raises(err, match=match):
        attnkit.lightning_attention(q, q, q, slopes)


def test_bad_state_for_lightning():
    q = randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="initial_state must have shape"):
        attnkit.lightning_attention(q, q, q, attnkit.lightning_slopes(2), initial_state=torch.zeros(2, 2, 8, 8))
    with pytest.raises(TypeError, match="initial_state must have dtype"):
        attnkit.lightning_attention(q, q, q, attnkit.lightning_slopes(2),
                                    initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.float16))
