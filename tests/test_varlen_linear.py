"""Packed variable-length batches (issue 14, item 1) on linear and lightning attention:
a packed call (B = 1, ``cu_seqlens`` or ``cu_seqlens_q/k``) equals the same sequences run
one by one — outputs, per-sequence states, and the gradients of q, k, v, the decay and the
per-sequence initial states — on the reference and on the chunked Triton engine (the
interpreter on CPU), causal and non-causal, with feature maps and normalization; and
every bad packing is refused with a message naming the argument."""

import itertools

import pytest
import torch
from attnkit.kernels.linear import force_chunk
from conftest import DEVICE

import attnkit
from attnkit.testing import relative_error

#: lengths of the issue's test: one token, a chunk and a bit, several chunks, an empty sequence
LENGTHS = (1, 17, 113, 0)
BACKENDS = ("reference", "triton")
#: fp32 kernel vs the same kernel one sequence at a time: only the summation order differs
TOL = 1e-5


def offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float().to(DEVICE)


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def assert_close(actual, expected, what, tol=TOL):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def packed_and_one_by_one(op, q, k, v, lengths_q, lengths_k, state, seed=7, **options):
    """Run ``op`` packed and one sequence at a time on copies of the same leaves, backprop the
    same random loss through out and state, and return both sets of (out, state, grads)."""
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g, dtype=torch.float64).float().to(DEVICE)
    tensors = dict(options)

    def run(packed):
        leaves = [leaf(x) for x in (q, k, v, state, options.get("decay"), options.get("slopes"))]
        qq, kk, vv, s0, decay, slopes = leaves
        opts = dict(tensors)
        for name, value in (("decay", decay), ("slopes", slopes)):
            if value is not None:
                opts[name] = value
        if packed:
            pack = {"cu_seqlens": cu_q} if cu_q is cu_k or torch.equal(cu_q, cu_k) else \
                {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
            out, st = op(qq, kk, vv, initial_state=s0, return_state=True, **pack, **opts)
        else:
            outs, states = [], []
            bq, bk = cu_q.tolist(), cu_k.tolist()
            for s, ((q0, q1), (k0, k1)) in enumerate(zip(itertools.pairwise(bq), itertools.pairwise(bk))):
                o, st1 = op(qq[:, :, q0:q1], kk[:, :, k0:k1], vv[:, :, k0:k1],
                            initial_state=None if s0 is None else s0[s:s + 1], return_state=True, **opts)
                outs.append(o)
                states.append(st1)
            out, st = torch.cat(outs, dim=2), torch.cat(states, dim=0)
        gs = torch.randn(st.shape, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64).float().to(DEVICE)
        ((out * go).sum() + (st * gs).sum()).backward()
        return out.detach(), st.detach(), [None if x is None else x.grad for x in leaves]

    return run(True), run(False)


def check_equal(packed, alone, names=("q", "k", "v", "initial_state", "decay", "slopes")):
    (out_p, st_p, grads_p), (out_a, st_a, grads_a) = packed, alone
    assert torch.isfinite(out_p).all() and torch.isfinite(st_p).all()
    assert_close(out_p, out_a, "out")
    assert_close(st_p, st_a, "state")
    for name, gp, ga in zip(names, grads_p, grads_a):
        assert (gp is None) == (ga is None), name
        if gp is not None:
            assert_close(gp, ga, f"d{name}")


def inputs(heads_q, heads_kv, n, d, dv, seed=0):
    return (randn(1, heads_q, n, d, seed=seed, scale=0.5), randn(1, heads_kv, n, d, seed=seed + 1, scale=0.5),
            randn(1, heads_kv, n, dv, seed=seed + 2))


# --------------------------------------------------------------------------- packed = one by one

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_lightning_packed_equals_one_by_one(backend, with_state):
    q, k, v = inputs(4, 2, sum(LENGTHS), 16, 24)
    s0 = randn(len(LENGTHS), 4, 16, 24, seed=5, scale=0.5) if with_state else None
    slopes = attnkit.lightning_slopes(4).to(DEVICE)
    packed, alone = packed_and_one_by_one(attnkit.lightning_attention, q, k, v, LENGTHS, LENGTHS, s0,
                                          slopes=slopes, backend=backend)
    check_equal(packed, alone)
    assert packed[1].shape == (len(LENGTHS), 4, 16, 24)       # one state per sequence


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("options", [
    {"feature_map": "elu+1"},
    {"feature_map": "relu", "normalize": True, "scale": 0.5},
    {"feature_map": "taylor"},
], ids=["elu", "relu_normalize", "taylor"])
def test_linear_packed_equals_one_by_one(backend, with_state, options):
    d = 4 if options["feature_map"] == "taylor" else 16
    feature = 1 + d + d * d if options["feature_map"] == "taylor" else d
    dv = 8 + int(options.get("normalize", False))
    q, k, v = inputs(2, 1, sum(LENGTHS), d, 8, seed=3)
    s0 = randn(len(LENGTHS), 2, feature, dv, seed=4, scale=0.3).abs() if with_state else None
    decay = randn(2, seed=6).abs() * 0.2 + 0.01
    packed, alone = packed_and_one_by_one(attnkit.linear_attention, q, k, v, LENGTHS, LENGTHS, s0, decay=decay,
                                          backend=backend, **options)
    check_equal(packed, alone)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_no_decay_hedgehog(backend):
    """A learnable feature map (Hedgehog) and no decay: the state sums every token of its sequence."""
    torch.manual_seed(0)
    fmap = attnkit.feature_maps.Hedgehog(16).to(DEVICE)
    q, k, v = inputs(2, 2, sum(LENGTHS), 16, 16, seed=8)
    s0 = randn(len(LENGTHS), 2, 32, 16, seed=9, scale=0.1)
    packed, alone = packed_and_one_by_one(attnkit.linear_attention, q, k, v, LENGTHS, LENGTHS, s0,
                                          feature_map=fmap, backend=backend)
    check_equal(packed, alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_noncausal_reads_its_own_keys(backend, with_state):
    """Non-causal: each sequence's queries read only its own keys, and Nq may differ from Nk."""
    lengths_q, lengths_k = (1, 17, 30, 0), (5, 0, 40, 3)
    q = randn(1, 4, sum(lengths_q), 16, seed=10, scale=0.5)
    k, v = randn(1, 2, sum(lengths_k), 16, seed=11, scale=0.5), randn(1, 2, sum(lengths_k), 8, seed=12)
    s0 = randn(4, 4, 16, 9, seed=13, scale=0.3).abs() if with_state else None
    packed, alone = packed_and_one_by_one(attnkit.linear_attention, q, k, v, lengths_q, lengths_k, s0,
                                          causal=False, feature_map="elu+1", normalize=True, backend=backend)
    check_equal(packed, alone)


@pytest.mark.parametrize("tiling", [(16, 16), (64, 32)])
def test_triton_packed_tilings(tiling):
    """Chunks of 16 rows (a sequence spans many, and ends inside one) and of 64 (several short
    sequences would share a chunk if chunks crossed boundaries)."""
    q, k, v = inputs(2, 2, sum(LENGTHS), 16, 16, seed=14)
    s0 = randn(len(LENGTHS), 2, 16, 16, seed=15)
    slopes = attnkit.lightning_slopes(2).to(DEVICE).requires_grad_(False)
    with force_chunk(*tiling):
        packed, alone = packed_and_one_by_one(attnkit.lightning_attention, q, k, v, LENGTHS, LENGTHS, s0,
                                              slopes=slopes, backend="triton")
    check_equal(packed, alone)


@pytest.mark.parametrize("lengths", [(1,), (0, 1, 0)], ids=["one_token", "one_token_among_empty"])
def test_triton_packed_decoding_step(lengths):
    """A packed total of one token takes the recurrent (decoding) kernel, per sequence too."""
    q, k, v = inputs(2, 2, sum(lengths), 16, 16, seed=16)
    s0 = randn(len(lengths), 2, 16, 16, seed=17)
    slopes = attnkit.lightning_slopes(2).to(DEVICE)
    packed, alone = packed_and_one_by_one(attnkit.lightning_attention, q, k, v, lengths, lengths, s0,
                                          slopes=slopes, backend="triton")
    check_equal(packed, alone)


def test_triton_matches_reference_packed():
    """The two backends agree on a packed batch (not only each with itself)."""
    q, k, v = inputs(2, 2, sum(LENGTHS), 16, 16, seed=18)
    cu = offsets(LENGTHS)
    s0 = randn(len(LENGTHS), 2, 16, 16, seed=19)
    decay = torch.tensor([0.05, 0.2], device=DEVICE)
    results = [attnkit.linear_attention(q, k, v, decay=decay, feature_map="elu+1", cu_seqlens=cu, initial_state=s0,
                                        return_state=True, backend=b) for b in BACKENDS]
    assert_close(results[1][0], results[0][0], "out", 2e-5)
    assert_close(results[1][1], results[0][1], "state", 2e-5)


def test_decay_restarts_and_empty_sequence_passes_its_state():
    """The first token of each packed sequence sees only itself (and its own initial state,
    decayed once); an empty sequence returns its initial state unchanged."""
    q, k, v = inputs(1, 1, 3, 4, 4, seed=20)
    cu = offsets((2, 0, 1))
    s0 = randn(3, 1, 4, 4, seed=21)
    slopes = torch.tensor([0.3], device=DEVICE)
    for backend in BACKENDS:
        out, state = attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0,
                                                 return_state=True, backend=backend)
        lam = torch.exp(-slopes)
        first = q[0, 0, 2] @ (lam * s0[2, 0] + torch.outer(k[0, 0, 2], v[0, 0, 2]))
        assert_close(out[0, 0, 2], first, f"{backend}: first token of the last sequence", 1e-5)
        assert torch.equal(state[1], s0[1]), backend


def test_pair_and_single_offsets_agree():
    """``cu_seqlens`` (flash-linear-attention) and ``cu_seqlens_q/k`` (flash) are the same call."""
    q, k, v = inputs(2, 2, 30, 16, 16, seed=22)
    cu = offsets((10, 20))
    slopes = attnkit.lightning_slopes(2).to(DEVICE)
    a = attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="reference")
    b = attnkit.lightning_attention(q, k, v, slopes, cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), backend="reference")
    c = attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu, cu_seqlens_q=cu.clone(), cu_seqlens_k=cu,
                                    backend="reference")
    assert torch.equal(a, b) and torch.equal(a, c)


def test_explain_packed_lightning_takes_the_kernel():
    q, k, v = inputs(2, 2, 30, 16, 16)
    decision = attnkit.explain(q, k, v, "lightning", "triton", slopes=attnkit.lightning_slopes(2).to(DEVICE),
                               cu_seqlens=offsets((10, 20)))
    assert decision.backend == "triton", decision


# --------------------------------------------------------------------------- bad input

def _call(variant, q, k, v, **kw):
    if variant == "lightning":
        return attnkit.lightning_attention(q, k, v, attnkit.lightning_slopes(q.shape[1]).to(DEVICE), **kw)
    return attnkit.linear_attention(q, k, v, **kw)


def i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD = [
    ({"cu_seqlens": torch.tensor([0, 4, 10], device=DEVICE)}, TypeError, "cu_seqlens must have dtype torch.int32"),
    ({"cu_seqlens": i32(0, 6, 4, 10)}, ValueError, "cu_seqlens must be non-decreasing"),
    ({"cu_seqlens": i32(1, 4, 10)}, ValueError, "cu_seqlens must start at 0"),
    ({"cu_seqlens": i32(0, 4, 9)}, ValueError, "cu_seqlens must end at the packed length 10"),
    ({"cu_seqlens": [0, 4, 10]}, TypeError, "cu_seqlens must be an int32 tensor"),
    ({"cu_seqlens": i32(0, 4, 10).view(1, 3)}, ValueError, "cu_seqlens must be 1-D"),
    ({"cu_seqlens_q": i32(0, 4, 10)}, ValueError, "cu_seqlens_q and cu_seqlens_k must be given together"),
    ({"cu_seqlens_q": i32(0, 4, 10), "cu_seqlens_k": i32(0, 4, 9)}, ValueError,
     "cu_seqlens_k must end at the packed length 10"),
    ({"cu_seqlens_q": i32(0, 4, 10), "cu_seqlens_k": i32(0, 10)}, ValueError, "the same number of sequences"),
    ({"cu_seqlens_q": i32(0, 4, 10), "cu_seqlens_k": i32(0, 5, 10)}, ValueError,
     "cu_seqlens_q must equal cu_seqlens_k"),
    ({"cu_seqlens": i32(0, 4, 10), "cu_seqlens_q": i32(0, 5, 10), "cu_seqlens_k": i32(0, 5, 10)}, ValueError,
     "cu_seqlens_q must equal cu_seqlens when both are given"),
    ({"cu_seqlens": i32(0, 4, 10), "cu_seqlens_k": i32(0, 5, 10)}, ValueError,
     "cu_seqlens_k must equal cu_seqlens when both are given"),
    ({"cu_seqlens": i32(0, 4, 10), "initial_state": torch.zeros(1, 2, 8, 8, device=DEVICE)}, ValueError,
     r"initial_state must have shape \(S, Hq, D, Dv\) = \(2, 2, 8, 8\).*one row per packed sequence"),
    ({"cu_seqlens": i32(0, 4, 10), "initial_state": torch.zeros(3, 2, 8, 8, device=DEVICE)}, ValueError,
     r"\(2, 2, 8, 8\).*one row per packed sequence \(2 in cu_seqlens\), got \(3, 2, 8, 8\)"),
]


@pytest.mark.parametrize("variant", ["linear", "lightning"])
@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_packing(variant, kwargs, error, match):
    q = randn(1, 2, 10, 8, seed=0)
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            _call(variant, q, q, q, backend=backend, **kwargs)


@pytest.mark.parametrize("variant", ["linear", "lightning"])
@pytest.mark.parametrize("name", ["cu_seqlens", "cu_seqlens_q"])
def test_packed_needs_batch_one(variant, name):
    q = randn(2, 2, 10, 8, seed=0)
    kw = {name: i32(0, 4, 10)}
    if name == "cu_seqlens_q":
        kw["cu_seqlens_k"] = i32(0, 4, 10)
    with pytest.raises(ValueError, match=f"with {name[:12]}.*batch size must be 1, got 2"):
        _call(variant, q, q, q, **kw)


def test_single_offsets_need_nq_equal_nk():
    q, k = randn(1, 2, 10, 8, seed=0), randn(1, 2, 12, 8, seed=1)
    with pytest.raises(ValueError, match="cu_seqlens .* needs Nq == Nk.*give cu_seqlens_q and cu_seqlens_k"):
        attnkit.linear_attention(q, k, k, causal=False, cu_seqlens=i32(0, 4, 10))


def test_callable_feature_map_state_rows():
    """A callable feature map's dim is known only once applied: the packed state is still one row a sequence."""
    def fmap(x):
        return torch.cat([x, x.square()], dim=-1)

    q = randn(1, 2, 10, 8, seed=0)
    with pytest.raises(ValueError, match="one row per packed sequence"):
        attnkit.linear_attention(q, q, q, feature_map=fmap, cu_seqlens=i32(0, 4, 10),
                                 initial_state=torch.zeros(1, 2, 16, 8, device=DEVICE))
