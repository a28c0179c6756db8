"""The delta_rule variant (issue 15, item 2): the reference and the chunked WY/UT torch
backend against a literal float64 recurrence (forward, final state, every gradient),
pieces with states, packed sequences, awkward lengths, the harness in float32/bfloat16,
the beta -> 0 limit and bad input (the Triton kernel: tests/test_delta_rule_kernel.py)."""

import pytest
import torch

import attnkit
from attnkit.delta_rule.reference import l2_normalize, recurrent_delta_rule
from attnkit.registry import Case, packed_offsets
from attnkit.testing import check_case


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def inputs(B, H, N, Dk, Dv, seed=0, gated=True, hkv=None):
    g = torch.Generator().manual_seed(seed + 100)
    hkv = hkv or H
    return {"q": rand(B, H, N, Dk, seed=seed), "k": rand(B, hkv, N, Dk, seed=seed + 1),
            "v": rand(B, hkv, N, Dv, seed=seed + 2),
            "beta": torch.rand(B, H, N, generator=g, dtype=torch.float64) * 0.8 + 0.1,
            "g": (-torch.rand(B, H, N, generator=g, dtype=torch.float64) * 0.3) if gated else None,
            "initial_state": rand(B, H, Dk, Dv, seed=seed + 3) * 0.5}


def literal(q, k, v, beta, g, initial_state, scale):
    """The issue's recurrence written out with the identity matrix: S_t = exp(g_t) (I - beta_t
    k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale q_t S_t, on l2-normalised q and k."""
    q, k = l2_normalize(q), l2_normalize(k)
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    S, outs = initial_state, []
    for t in range(q.shape[2]):
        kt = k[:, :, t, :, None]                                              # column k_t^T
        decay = 1.0 if g is None else torch.exp(g[:, :, t])[..., None, None]
        S = decay * ((eye - beta[:, :, t, None, None] * kt @ kt.transpose(-1, -2)) @ S) \
            + beta[:, :, t, None, None] * kt @ v[:, :, t, None, :]
        outs.append(scale * (q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=2), S


# the chunked torch backend at awkward lengths (1, under, across and over chunks of 64); the
# reference (the recurrence itself) once plain and once gated with MQA
@pytest.mark.parametrize("backend,N,gated,hkv", [("torch", 1, True, 2), ("torch", 17, False, 2), ("torch", 113, True, 1),
                                                 ("torch", 203, True, 2), ("reference", 17, False, 2),
                                                 ("reference", 70, True, 1)])
def test_matches_literal_recurrence_float64_with_every_gradient(backend, N, gated, hkv):
    x = inputs(1, 2, N, 16, 8, gated=gated, hkv=hkv)
    leaves = {n: t.requires_grad_() for n, t in x.items() if t is not None}
    out, state = attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], g=x["g"], scale=0.7,
                                              qk_l2norm=True, initial_state=x["initial_state"],
                                              return_state=True, backend=backend)
    want_out, want_state = literal(**x, scale=0.7)
    assert out.dtype == torch.float64 and state.shape == (1, 2, 16, 8)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)
    dout, dstate = rand(*out.shape, seed=7), rand(*state.shape, seed=8)
    names = list(leaves)
    got = torch.autograd.grad((out, state), [leaves[n] for n in names], (dout, dstate))
    want = torch.autograd.grad((want_out, want_state), [leaves[n] for n in names], (dout, dstate))
    assert set(names) == {"q", "k", "v", "beta", "initial_state"} | ({"g"} if gated else set())
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d{name}: {m}")


def test_scale_defaults_to_dk_rsqrt_and_auto_on_cpu_runs_torch():
    x = inputs(1, 2, 20, 16, 24)
    out = attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], g=x["g"], qk_l2norm=True,
                                       initial_state=x["initial_state"])
    want, _ = literal(**x, scale=16 ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    e = attnkit.explain(x["q"], x["k"], x["v"], "delta_rule", beta=x["beta"])
    assert e.backend == "torch", str(e)


def test_pieces_with_states_equal_one_call():
    x = inputs(2, 2, 113, 16, 8)
    kw = {"qk_l2norm": True, "return_state": True, "backend": "torch"}
    whole, final = attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], g=x["g"],
                                                initial_state=x["initial_state"], **kw)
    state, outs = x["initial_state"], []
    for a, b in ((0, 40), (40, 41), (41, 113)):                           # a decode-sized piece in the middle
        out, state = attnkit.delta_rule_attention(*(x[n][:, :, a:b] for n in ("q", "k", "v", "beta")),
                                                  g=x["g"][:, :, a:b], initial_state=state, **kw)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_packed_sequences_equal_per_sequence_calls(backend):
    lengths = [1, 70, 0, 42]
    x = inputs(1, 4, sum(lengths), 16, 8, hkv=2)
    s0 = rand(len(lengths), 4, 16, 8, seed=5)
    cu = torch.tensor([0, 1, 71, 71, 113], dtype=torch.int32)
    out, state = attnkit.delta_rule_attention(x["q"], x["k"], x["v"], x["beta"], g=x["g"], qk_l2norm=True,
                                              initial_state=s0, return_state=True, cu_seqlens=cu, backend=backend)
    assert state.shape == (4, 4, 16, 8)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_s, st_s = attnkit.delta_rule_attention(*(x[n][:, :, a:b] for n in ("q", "k", "v", "beta")),
                                                 g=x["g"][:, :, a:b], qk_l2norm=True, initial_state=s0[s:s + 1],
                                                 return_state=True, backend=backend)
        torch.testing.assert_close(out[:, :, a:b], o_s, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state[s:s + 1], st_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state[2], s0[2])                            # the empty sequence keeps its state


def test_beta_zero_leaves_the_state_unchanged():
    # beta = 0 is outside the op's (0, 1] (validation rejects it), so the property is checked on
    # the reference's recurrence itself, and through the op with beta = 1e-30 (the limit)
    x = inputs(1, 2, 17, 16, 8)
    q, k, v, s0 = (l2_normalize(x["q"]), l2_normalize(x["k"]), x["v"], x["initial_state"])
    zero = torch.zeros(1, 2, 17, dtype=torch.float64)
    _, state = recurrent_delta_rule(q, k, v, zero, None, 1.0, s0)
    assert torch.equal(state, s0)
    _, state = recurrent_delta_rule(q, k, v, zero, x["g"], 1.0, s0)       # gated: only the decay remains
    torch.testing.assert_close(state, torch.exp(x["g"].sum(-1))[..., None, None] * s0, rtol=1e-12, atol=0)
    for backend in ("torch", "reference"):
        _, state = attnkit.delta_rule_attention(q, k, v, torch.full_like(zero, 1e-30), initial_state=s0,
                                                return_state=True, backend=backend)
        torch.testing.assert_close(state, s0, rtol=1e-12, atol=1e-12)


HARNESS_CASES = [
    Case((1, 2, 113, 16), (1, 2, 113, 16), (1, 2, 113, 24), {"qk_l2norm": True},
         {"beta": lambda g: torch.rand(1, 2, 113, generator=g, dtype=torch.float64) * 0.9 + 0.1,
          "g": lambda g: -torch.rand(1, 2, 113, generator=g, dtype=torch.float64) * 0.2,
          "initial_state": lambda g: torch.randn(1, 2, 16, 24, generator=g, dtype=torch.float64)},
         name="n113_dk16_dv24"),
    Case((1, 2, 80, 16), (1, 1, 80, 16), (1, 1, 80, 16), {"qk_l2norm": True},
         {"beta": lambda g: torch.rand(1, 2, 80, generator=g, dtype=torch.float64) * 0.9 + 0.1,
          "cu_seqlens": packed_offsets(17, 63)}, name="varlen_mqa_deltanet"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", HARNESS_CASES, ids=lambda c: c.id)
def test_torch_backend_within_the_harness_error_rule(case, dtype):
    report = check_case("delta_rule", case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)
    assert {"out", "state", "dq", "dk", "dv", "dbeta"} <= {c.name for c in report.comparisons}


def _call(**changes):
    x = inputs(1, 2, 9, 16, 8)
    args = {"q": x["q"], "k": x["k"], "v": x["v"], "beta": x["beta"], "g": x["g"],
            "initial_state": x["initial_state"]}
    args.update(changes)
    return attnkit.delta_rule_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("beta"), **args)


@pytest.mark.parametrize("changes,error,match", [
    ({"beta": torch.zeros(1, 2, 9, dtype=torch.float64)}, ValueError, r"beta must lie in \(0, 1\]"),
    ({"beta": torch.full((1, 2, 9), 1.5, dtype=torch.float64)}, ValueError, r"beta must lie in \(0, 1\]"),
    ({"beta": torch.full((1, 2, 9), float("nan"), dtype=torch.float64)}, ValueError, r"beta must lie in"),
    ({"beta": torch.full((1, 2, 8), 0.5, dtype=torch.float64)}, ValueError, r"beta must have shape \(B, Hq, N\)"),
    ({"beta": torch.ones(1, 2, 9, dtype=torch.int64)}, TypeError, "beta must be a floating tensor"),
    ({"beta": None}, TypeError, "needs beta"),
    ({"g": torch.full((1, 2, 9), 0.1, dtype=torch.float64)}, ValueError, "g must be <= 0"),
    ({"g": torch.full((1, 2, 9), -float("inf"), dtype=torch.float64)}, ValueError, "g must be finite"),
    ({"g": torch.zeros(1, 2, 9, 16, dtype=torch.float64)}, ValueError, r"g must have shape \(B, Hq, N\)"),
    ({"initial_state": torch.zeros(1, 2, 8, 16, dtype=torch.float64)}, ValueError, "initial_state must have shape"),
    ({"initial_state": torch.zeros(1, 2, 16, 8, dtype=torch.float16)}, TypeError, "initial_state must have dtype"),
    ({"k": rand(1, 2, 10, 16), "v": rand(1, 2, 10, 8)}, ValueError, "needs Nq == Nk"),
    ({"qk_l2norm": 1}, TypeError, "qk_l2norm must be a bool"),
    ({"cu_seqlens": torch.tensor([0, 4, 8], dtype=torch.int32)}, ValueError, "cu_seqlens must end at"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)
