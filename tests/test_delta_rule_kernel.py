"""The delta_rule Triton kernel (issue 15, item 3): the chunked WY/UT forward and backward
against the float64 recurrence (output, final state and every gradient, through the output
and through the returned state), plain and gated, packed sequences, awkward lengths across
chunks of 64, Dk != Dv, beta = 0, fp32 and fp16 (the interpreter gets bf16 dots wrong), and
what the kernel refuses."""

import pytest
import torch
from conftest import DEVICE, DTYPES

import attnkit
from attnkit.delta_rule.kernel import MAX_KERNEL_DIM, DeltaRuleFunction
from attnkit.delta_rule.reference import l2_normalize
from attnkit.registry import Case, packed_offsets
from attnkit.testing import check_case


def _uniform(lo, hi, *shape):
    return lambda gen: torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def _normal(*shape):
    return lambda gen: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5


def case(N, Dk, Dv, *, gated=True, state=True, heads=(2, 2), lengths=None, scale=None):
    """A Case of the harness: q, k, v ~ N(0, 1) L2-normalised by the op (qk_l2norm); ``lengths``
    packs sequences of these lengths (cu_seqlens)."""
    hq, hkv = heads
    cu = None if lengths is None else packed_offsets(*lengths)
    rows = 1 if lengths is None else len(lengths)
    tensors = {"beta": _uniform(0.1, 1.0, 1, hq, N)}
    if gated:
        tensors["g"] = _uniform(-0.3, 0.0, 1, hq, N)
    if state:
        tensors["initial_state"] = _normal(rows, hq, Dk, Dv)
    if cu is not None:
        tensors["cu_seqlens"] = cu
    options = {"qk_l2norm": True} if scale is None else {"qk_l2norm": True, "scale": scale}
    name = f"n{N}_dk{Dk}_dv{Dv}_{'gated' if gated else 'plain'}_h{hq}-{hkv}{'_varlen' if cu is not None else ''}"
    return Case((1, hq, N, Dk), (1, hkv, N, Dk), (1, hkv, N, Dv), options, tensors, name=name)


# the contract test runs the registered examples (one chunk per sequence, GQA, a decoding
# step) on the kernel: these add several chunks, partial last chunks and a full packed chunk
CASES = [
    case(1, 16, 16, heads=(1, 1)),                                      # a decoding step with a state
    case(17, 16, 24, gated=False, state=False, heads=(1, 1)),           # plain DeltaNet, under one chunk
    case(113, 32, 16, gated=False, heads=(1, 1), scale=0.5),            # plain across two chunks, Dk > Dv
    case(130, 16, 40, heads=(1, 1)),                                    # gated, three chunks, the last of 2 rows
    case(90, 16, 8, heads=(1, 1), lengths=(1, 64, 0, 25)),              # packed: a full chunk, an empty sequence
]


# every dtype on the gated cases; the plain ones in float32 (and natively in every dtype)
RUNS = [(c, d) for c in CASES for d in DTYPES if d != torch.float16 or "gated" in c.id or DEVICE == "cuda"]


@pytest.mark.parametrize("c,dtype", RUNS, ids=[f"{c.id}-{str(d).replace('torch.', '')}" for c, d in RUNS])
def test_kernel_matches_the_float64_recurrence(c, dtype):
    # out and final state within 2x the input-dtype reference's error, every gradient within 3x
    report = check_case("delta_rule", c, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    names = {x.name for x in report.comparisons}
    assert {"out", "state", "dq", "dk", "dv", "dbeta"} <= names, names
    assert ("dg" in names) == ("g" in c.tensors) and ("dinitial_state" in names) == ("initial_state" in c.tensors)


def test_wide_heads_on_the_kernel():
    # Dk = Dv = 128 (the GPU's main shape): several key-dim slices and value blocks per program
    report = check_case("delta_rule", case(40, 128, 128, heads=(1, 1)), dtype=torch.float32, device=DEVICE,
                        backend="triton")
    assert report.ok, str(report)


@pytest.mark.parametrize("through", ["out_and_state", "state_only"])
def test_gradients_through_the_returned_state(through):
    # the harness differentiates the output only: here the state's gradient enters too (the
    # reverse pass starts from it), or alone (no gradient reaches the output)
    g = torch.Generator().manual_seed(2)
    leaves = {"q": torch.randn(1, 1, 90, 16, generator=g), "k": torch.randn(1, 1, 90, 16, generator=g),
              "v": torch.randn(1, 1, 90, 24, generator=g), "beta": torch.rand(1, 1, 90, generator=g) * 0.9 + 0.1,
              "g": -torch.rand(1, 1, 90, generator=g) * 0.2, "initial_state": torch.randn(2, 1, 16, 24, generator=g)}
    d_out, d_state = torch.randn(1, 1, 90, 24, generator=g), torch.randn(2, 1, 16, 24, generator=g)
    cu = torch.tensor([0, 70, 90], dtype=torch.int32, device=DEVICE)       # two sequences, two chunks

    def grads(dtype, backend):
        xs = {n: x.to(DEVICE, dtype).requires_grad_() for n, x in leaves.items()}
        out, state = attnkit.delta_rule_attention(xs["q"], xs["k"], xs["v"], xs["beta"], g=xs["g"],
                                                  initial_state=xs["initial_state"], qk_l2norm=True,
                                                  return_state=True, cu_seqlens=cu, backend=backend)
        loss = (state * d_state.to(DEVICE, dtype)).sum()
        if through == "out_and_state":
            loss = loss + (out * d_out.to(DEVICE, dtype)).sum()
        loss.backward()
        return {n: x.grad for n, x in xs.items()}

    want, got = grads(torch.float64, "reference"), grads(torch.float32, "triton")
    for name in leaves:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-4, msg=name)


def test_prenormalised_inputs_without_qk_l2norm():
    # the variant expects unit-norm q and k: normalised by the caller equals qk_l2norm=True
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 40, 16, generator=g).to(DEVICE) for _ in range(3))
    beta = (torch.rand(1, 1, 40, generator=g) * 0.9 + 0.1).to(DEVICE)
    gates = (-torch.rand(1, 1, 40, generator=g) * 0.2).to(DEVICE)
    a = attnkit.delta_rule_attention(l2_normalize(q), l2_normalize(k), v, beta, g=gates, backend="triton")
    b = attnkit.delta_rule_attention(q, k, v, beta, g=gates, qk_l2norm=True, backend="triton")
    want = attnkit.delta_rule_attention(*(x.double() for x in (q, k, v, beta)), g=gates.double(), qk_l2norm=True,
                                        backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_beta_zero_leaves_the_state_unchanged(gated):
    # beta = 0 is outside the op's (0, 1] (validation rejects it): the kernel's autograd function
    # is called directly. Nothing is written; the state only decays (exactly kept without gates).
    g = torch.Generator().manual_seed(4)
    q, k = (l2_normalize(torch.randn(1, 1, 70, 16, generator=g)).to(DEVICE) for _ in range(2))
    v = torch.randn(1, 1, 70, 8, generator=g).to(DEVICE)
    s0 = torch.randn(1, 1, 16, 8, generator=g).to(DEVICE)
    gates = (-torch.rand(1, 1, 70, generator=g) * 0.02).to(DEVICE) if gated else None
    out, state = DeltaRuleFunction.apply(q, k, v, torch.zeros(1, 1, 70, device=DEVICE), gates, 0.25, s0, None)
    if gated:
        decay = torch.exp(gates.cumsum(-1))
        torch.testing.assert_close(state, decay[..., -1, None, None] * s0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, 0.25 * decay[..., None] * (q @ s0), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(state, s0)
        torch.testing.assert_close(out, 0.25 * (q @ s0), rtol=1e-5, atol=1e-5)


def test_triton_backend_runs_the_kernel_and_refuses_wide_heads_with_the_reason():
    x = torch.randn(1, 2, 20, 16, device=DEVICE)
    beta = torch.full((1, 2, 20), 0.5, device=DEVICE)
    e = attnkit.explain(x, x, x, "delta_rule", "triton", beta=beta)
    assert e.backend == "triton", str(e)
    wide = torch.randn(1, 2, 20, MAX_KERNEL_DIM + 16, device=DEVICE)
    e = attnkit.explain(wide, wide, x, "delta_rule", "triton", beta=beta)
    assert e.backend == "error" and any(f"key head dim {MAX_KERNEL_DIM + 16}" in r for r in e.reasons), str(e)
    assert attnkit.explain(wide, wide, x, "delta_rule", "auto", beta=beta).backend == "torch"
    with pytest.raises(ValueError, match="key head dim"):
        attnkit.delta_rule_attention(wide, wide, x, beta, backend="triton")
    # keys wider than 128: the forward runs on the kernel, a call that needs gradients does not
    k160 = torch.randn(1, 2, 20, 160, device=DEVICE)
    assert attnkit.explain(k160, k160, x, "delta_rule", "triton", beta=beta).backend == "triton"
    k160.requires_grad_(True)
    e = attnkit.explain(k160, k160, x, "delta_rule", "triton", beta=beta)
    assert e.backend == "error" and any("backward kernel takes key head dims up to 128" in r for r in e.reasons), str(e)
    with torch.no_grad():
        assert attnkit.explain(k160, k160, x, "delta_rule", "triton", beta=beta).backend == "triton"


def test_pieces_with_states_equal_one_call_on_the_kernel():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 80, 16, generator=g).to(DEVICE) for _ in range(3))
    beta = (torch.rand(1, 1, 80, generator=g) * 0.9 + 0.1).to(DEVICE)
    gates = (-torch.rand(1, 1, 80, generator=g) * 0.2).to(DEVICE)
    kw = {"qk_l2norm": True, "return_state": True, "backend": "triton"}
    whole, final = attnkit.delta_rule_attention(q, k, v, beta, g=gates, **kw)
    state, outs = None, []
    for a, b in ((0, 65), (65, 66), (66, 80)):             # a decoding-sized piece in the middle
        out, state = attnkit.delta_rule_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], beta[:, :, a:b],
                                                  g=gates[:, :, a:b], initial_state=state, **kw)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)
