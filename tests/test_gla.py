"""Gated linear attention (the ``gla`` variant, issue 15): the chunked torch backend against
the step-by-step recurrence in float64 (forward, final state, every gradient), an explicit
formula for the recurrence itself, states across pieces, packed sequences, the two gate
forms, the constant-decay case against lightning/linear, the harness in float32 and
bfloat16, and bad input."""

import math

import pytest
import torch
from torch.nn.functional import logsigmoid

import attnkit
from attnkit.gla import torch_backend
from attnkit.gla.reference import recurrent_form
from attnkit.registry import Case
from attnkit.testing import check_case

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def gates(*shape, seed=1, shift=2.0):
    return logsigmoid(rand(*shape, seed=seed) + shift)


def inputs(B=1, H=2, N=17, Dk=8, Dv=12, per_channel=True, seed=0, Hkv=None):
    Hkv = H if Hkv is None else Hkv
    q, k = rand(B, H, N, Dk, seed=seed), rand(B, Hkv, N, Dk, seed=seed + 1)
    v = rand(B, Hkv, N, Dv, seed=seed + 2)
    g = gates(B, H, N, *((Dk,) if per_channel else ()), seed=seed + 3)
    s0 = rand(B, H, Dk, Dv, seed=seed + 4, scale=0.5)
    return q, k, v, g, s0


def outputs_and_grads(backend, q, k, v, g, s0, **options):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, s0)]
    out, state = attnkit.gated_linear_attention(*leaves[:4], initial_state=leaves[4], return_state=True,
                                                backend=backend, **options)
    up = rand(*out.shape, seed=9)
    up_state = rand(*state.shape, seed=10)
    grads = torch.autograd.grad((out * up).sum() + (state * up_state).sum(), leaves)
    return [out, state, *grads]


NAMES = ["out", "state", "dq", "dk", "dv", "dg", "dinitial_state"]


def assert_close(got, want, names=NAMES, tol=1e-10):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} != {tuple(b.shape)}"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: max error {err:.3g}"


# ---------------------------------------------------------------- the recurrence itself


@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "scalar"])
def test_recurrence_matches_the_explicit_formula(per_channel):
    """o_t = c sum_{s <= t} sum_d q_td k_sd exp(G_td - G_sd) v_s + c (q_t * exp(G_t)) S_0 with
    G the cumulative log-gates: the closed form of S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t."""
    q, k, v, g, s0 = inputs(N=13, per_channel=per_channel)
    gc = g if per_channel else g.unsqueeze(-1)
    G = gc.cumsum(2)
    decay = torch.exp(G[:, :, :, None, :] - G[:, :, None, :, :])               # (B, H, t, s, Dk)
    causal = torch.ones(13, 13, dtype=torch.bool).tril()[..., None]
    scores = (q[:, :, :, None, :] * k[:, :, None, :, :] * decay * causal).sum(-1)
    c = 0.7
    want = c * (scores @ v) + c * (q * torch.exp(G)) @ s0
    final = torch.exp(G[:, :, -1, :, None]) * s0 + ((k * torch.exp(G[:, :, -1:] - G)).transpose(-1, -2) @ v)
    out, state = recurrent_form(q, k, v, gc, c, s0)
    assert_close([out, state], [want, final], ["out", "state"], tol=1e-12)


# ---------------------------------------------------------------- torch backend vs the recurrence


@pytest.mark.parametrize("n", [1, 17, 113, 203])
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "scalar"])
def test_torch_backend_matches_the_recurrence_float64(n, per_channel):
    """Forward, final state and the gradients of q, k, v, g and initial_state, Dk != Dv, N
    from one token to several chunks with a ragged last one."""
    data = inputs(N=n, per_channel=per_channel)
    assert_close(outputs_and_grads("torch", *data), outputs_and_grads("reference", *data))


def test_torch_backend_gqa_and_scale():
    data = inputs(B=2, H=4, Hkv=2, N=70, Dk=8, Dv=4)
    assert_close(outputs_and_grads("torch", *data, scale=0.3), outputs_and_grads("reference", *data, scale=0.3))


def test_strong_decay_stays_finite():
    """Gates summing far below -88 within a chunk: every factor of the chunked form is
    exp(<= 0), so nothing overflows (no inf * 0 = NaN), forward or backward."""
    q, k, v, g, s0 = inputs(N=80, Dk=8, Dv=8)
    g = -40.0 * torch.rand(g.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    got = outputs_and_grads("torch", q, k, v, g, s0)
    assert all(bool(torch.isfinite(x).all()) for x in got)
    assert_close(got, outputs_and_grads("reference", q, k, v, g, s0))


def test_per_channel_pieces_match_one_piece(monkeypatch):
    """The per-channel (C, C, Dk) product runs a few chunks at a time, checkpointed: forcing one
    chunk per piece gives the same forward and gradients."""
    data = inputs(N=150, Dk=8, Dv=8)
    whole = outputs_and_grads("torch", *data)
    monkeypatch.setattr(torch_backend, "PAIR_BUDGET", 1)
    assert_close(outputs_and_grads("torch", *data), whole, tol=1e-12)


# ---------------------------------------------------------------- states, packing, gate forms


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_pieces_with_states_equal_one_call(backend):
    q, k, v, g, s0 = inputs(N=113)
    want, want_state = attnkit.gated_linear_attention(q, k, v, g, initial_state=s0, return_state=True,
                                                      backend=backend)
    outs, state = [], s0
    for a, b in ((0, 1), (1, 40), (40, 41), (41, 113)):
        out, state = attnkit.gated_linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], g[:, :, a:b],
                                                    initial_state=state, return_state=True, backend=backend)
        outs.append(out)
    assert_close([torch.cat(outs, dim=2), state], [want, want_state], ["out", "state"], tol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "scalar"])
def test_packed_sequences_equal_separate_calls(backend, per_channel):
    lengths = [17, 0, 70, 1]
    cu = torch.tensor([0, 17, 17, 87, 88], dtype=torch.int32)
    q, k, v, g, _ = inputs(N=88, per_channel=per_channel)
    s0 = rand(4, 2, 8, 12, seed=7, scale=0.5)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, s0)]
    out, states = attnkit.gated_linear_attention(*leaves[:4], initial_state=leaves[4], cu_seqlens=cu,
                                                 return_state=True, backend=backend)
    packed = [out, states, *torch.autograd.grad((out * rand(*out.shape, seed=3)).sum() + states.sum(), leaves)]
    outs, finals, start = [], [], 0
    for s, n in enumerate(lengths):
        piece = slice(start, start + n)
        o, f = attnkit.gated_linear_attention(leaves[0][:, :, piece], leaves[1][:, :, piece], leaves[2][:, :, piece],
                                              leaves[3][:, :, piece], initial_state=leaves[4][s:s + 1],
                                              return_state=True, backend=backend)
        outs.append(o)
        finals.append(f)
        start += n
    out, states = torch.cat(outs, dim=2), torch.cat(finals)
    separate = [out, states, *torch.autograd.grad((out * rand(*out.shape, seed=3)).sum() + states.sum(), leaves)]
    assert_close(packed, separate, tol=1e-12)
    assert torch.equal(states[1], s0[1])  # an empty sequence passes its state through


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_scalar_gates_equal_vector_gates_broadcast(backend):
    q, k, v, g, s0 = inputs(N=70, per_channel=False)
    scalar = outputs_and_grads(backend, q, k, v, g, s0)
    vector = outputs_and_grads(backend, q, k, v, g[..., None].expand(*g.shape, 8).contiguous(), s0)
    vector[5] = vector[5].sum(-1)  # the broadcast gate's gradient is the sum over its channels
    assert_close(scalar, vector, tol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_constant_gates_equal_lightning_and_linear_with_that_decay(backend):
    """g_t = -s_h for every token is a per-head decay lambda_h = exp(-s_h): lightning attention
    with slopes s (lightning's scale is 1, so gla gets scale=1) and linear attention with
    decay s (both default to the scale Dk^-1/2). Same state layout (Dk, Dv) and sign."""
    q, k, v, _, s0 = inputs(N=70)
    s = torch.tensor([0.05, 0.4], dtype=F64)
    g = (-s).view(1, 2, 1).expand(1, 2, 70).contiguous()
    out, state = attnkit.gated_linear_attention(q, k, v, g, scale=1.0, initial_state=s0, return_state=True,
                                                backend=backend)
    want = attnkit.lightning_attention(q, k, v, s, initial_state=s0, return_state=True, backend=backend)
    assert_close([out, state], list(want), ["out", "state"], tol=1e-12)
    out = attnkit.gated_linear_attention(q, k, v, g[..., None].expand(1, 2, 70, 8), backend=backend)
    assert_close([out], [attnkit.linear_attention(q, k, v, decay=s, backend=backend)], ["out"], tol=1e-12)


# ---------------------------------------------------------------- dtypes, dispatch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_harness_error_rule_awkward_sizes(dtype):
    """The harness's rule (2x the reference's own error forward, 3x for gradients) in the
    input dtype, N = 113 and 203 (ragged chunks), Dk != Dv, both gate forms."""
    cases = [Case((1, 2, 113, 16), (1, 2, 113, 16), (1, 2, 113, 8), {},
                  {"g": lambda gen: logsigmoid(torch.randn(1, 2, 113, 16, generator=gen, dtype=F64) + 2)}),
             Case((1, 1, 203, 8), (1, 1, 203, 8), (1, 1, 203, 24), {},
                  {"g": lambda gen: logsigmoid(torch.randn(1, 1, 203, generator=gen, dtype=F64) + 2),
                   "initial_state": lambda gen: torch.randn(1, 1, 8, 24, generator=gen, dtype=F64)})]
    for case in cases:
        report = check_case("gla", case, dtype=dtype, backend="torch")
        assert report.ok, str(report)
        assert {"out", "state", "dq", "dk", "dv", "dg"} <= {c.name for c in report.comparisons}


def test_bf16_inputs_float32_state():
    q, k, v, g, s0 = (x.to(torch.bfloat16) for x in inputs())
    out, state = attnkit.gated_linear_attention(q, k, v, g, initial_state=s0.float(), return_state=True)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert state.shape == (1, 2, 8, 12)


# ---------------------------------------------------------------- bad input


def bad(match, exc=ValueError, **changes):
    q, k, v, g, _ = (x.float() for x in inputs())
    args = {"q": q, "k": k, "v": v, "g": g, "initial_state": None, **changes}
    with pytest.raises(exc, match=match):
        attnkit.gated_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), **args)


def test_bad_gates():
    g = gates(1, 2, 17, 8).float()
    bad(r"g must be <= 0 .*largest value of 0\.5", g=torch.where(g == g.max(), 0.5, g))
    bad(r"g must be finite", g=torch.where(g == g.min(), -math.inf, g))
    bad(r"g must be finite", g=torch.where(g == g.min(), math.nan, g))
    bad(r"g must have shape \(B, Hq, N\) = \(1, 2, 17\) or \(B, Hq, N, Dk\) = \(1, 2, 17, 8\), got \(1, 2, 17, 12\)",
        g=torch.zeros(1, 2, 17, 12))
    bad(r"g must have shape .*got \(1, 1, 17\)", g=torch.zeros(1, 1, 17))
    bad(r"g must be a floating tensor", TypeError, g=torch.zeros(1, 2, 17, dtype=torch.int64))
    bad(r"g must be a tensor of log-gates", TypeError, g=-0.5)
    bad(r"needs g", TypeError, g=None)


def test_bad_states_and_packing():
    bad(r"initial_state must have shape \(B, Hq, D, Dv\) = \(1, 2, 8, 12\)", initial_state=torch.zeros(1, 2, 12, 8))
    bad(r"initial_state must have dtype torch.float32", TypeError,
        initial_state=torch.zeros(1, 2, 8, 12, dtype=torch.float16))
    bad(r"initial_state must have shape \(S, Hq, D, Dv\).*2 in cu_seqlens", initial_state=torch.zeros(1, 2, 8, 12),
        cu_seqlens=torch.tensor([0, 5, 17], dtype=torch.int32))
    bad(r"cu_seqlens must end at the packed length 17", cu_seqlens=torch.tensor([0, 5, 16], dtype=torch.int32))
    bad(r"return_state must be a bool", TypeError, return_state=1)
    q = inputs()[0].float()
    bad(r"needs Nq == Nk", q=torch.cat([q, q], dim=2))


@pytest.mark.parametrize("chunk", [16, 24, 48])
def test_chunk_sizes_match_the_recurrence(chunk):
    """Chunks of one sub-chunk (16), of a size that sub-chunks do not divide (24: one exact
    block) and of three sub-chunks (48) all give the recurrence."""
    q, k, v, g, s0 = inputs(N=70)
    want = recurrent_form(q, k, v, g, 0.5, s0)
    assert_close(torch_backend.chunked_gla(q, k, v, g, 0.5, s0, chunk=chunk), want, ["out", "state"], tol=1e-12)
