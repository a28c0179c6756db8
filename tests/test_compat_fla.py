"""attnkit.compat.fla (issue 15, item 5): flash-linear-attention's chunk ops on attnkit.

Each function against the attnkit op on transposed inputs and against fla's recurrences
restated step by step in its own (B, T, H, D) layout in float64 (outputs, final states,
gradients), packed sequences (fla's int64 ``cu_seqlens``) against per-sequence calls,
states carried from piece to piece, ``state_v_first``, ``reverse``, GVA, the in-kernel
gate/beta/l2norm options, linear attention's normalisation, and the errors for what
attnkit cannot honour.
"""

import inspect

import pytest
import torch
from conftest import DEVICE
from torch.nn.functional import logsigmoid, softplus

import attnkit
from attnkit.compat import fla

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64) * scale


def t12(x):
    return x.transpose(1, 2)


def recurrence(q, k, v, g=None, beta=None, scale=None, h0=None, reverse=False):
    """fla's naive recurrences in (B, T, H, D), one token at a time: the state (B, H, K, V)
    decays by exp(g_t) (g (B, T, H) or per channel (B, T, H, K)), then takes k_t^T v_t, or the
    delta rule's k_t^T beta_t (v_t - k_t S) with beta (B, T, H); o_t = scale q_t S_t."""
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1]) if h0 is None else h0
    outs = {}
    for t in (reversed(range(T)) if reverse else range(T)):
        if g is not None:
            d = g[:, t].exp()
            S = S * (d[..., None] if d.dim() == 3 else d[..., None, None])
        new = v[:, t]
        if beta is not None:
            new = (new - torch.einsum("bhk,bhkv->bhv", k[:, t], S)) * beta[:, t, :, None]
        S = S + k[:, t, :, :, None] * new[:, :, None, :]
        outs[t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
    o = torch.stack([outs[t] for t in range(T)], dim=1) if T else v.new_zeros(B, 0, H, v.shape[-1])
    return o, S


def assert_close(got, want, tol=1e-10, name="out"):
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel():
        err = (got - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), f"{name}: max error {err:.3g}"


def inputs(B=2, T=37, H=2, K=8, V=12, seed=0):
    q, k, v = rand(B, T, H, K, seed=seed), rand(B, T, H, K, seed=seed + 1), rand(B, T, H, V, seed=seed + 2)
    return q, k, v, rand(B, H, K, V, seed=seed + 3, scale=0.5)


# ---------------------------------------------------------------- fla's signatures (0.5), argument for argument

FLA_SIGNATURES = {
    "chunk_simple_gla": ["q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state",
                         "state_v_first", "cu_seqlens", "cu_seqlens_cpu", "kwargs"],
    "fused_recurrent_simple_gla": ["q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state",
                                   "reverse", "state_v_first", "cu_seqlens", "kwargs"],
    "chunk_gla": ["q", "k", "v", "g", "scale", "initial_state", "output_final_state", "state_v_first", "cu_seqlens",
                  "cu_seqlens_cpu"],
    "chunk_gated_delta_rule": ["q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                               "use_qk_l2norm_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval",
                               "state_v_first", "cu_seqlens", "cu_seqlens_cpu", "chunk_indices", "cp_context",
                               "kwargs"],
    "chunk_linear_attn": ["q", "k", "v", "scale", "initial_state", "output_final_state", "normalize", "cu_seqlens"],
}


@pytest.mark.parametrize("name", sorted(FLA_SIGNATURES))
def test_signatures_are_flas(name):
    params = inspect.signature(getattr(fla, name)).parameters
    assert list(params) == FLA_SIGNATURES[name]
    defaults = {p.name: p.default for p in params.values() if p.default is not inspect.Parameter.empty}
    assert defaults.get("scale", None) is None and defaults.get("output_final_state", False) is False
    if name == "chunk_linear_attn":
        assert defaults["normalize"] is True  # fla normalizes by default


# ---------------------------------------------------------------- each function == the op == fla's recurrence

def test_chunk_simple_gla_equals_the_op_and_the_recurrence():
    q, k, v, h0 = inputs()
    g = logsigmoid(rand(2, 37, 2, seed=5) + 2)
    o, ht = fla.chunk_simple_gla(q, k, v, g, scale=0.3, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 37, 2, 12) and o.is_contiguous() and ht.shape == (2, 2, 8, 12)
    want_o, want_s = attnkit.gated_linear_attention(t12(q), t12(k), t12(v), t12(g), scale=0.3, initial_state=h0,
                                                    return_state=True)
    assert_close(o, t12(want_o), 1e-14)
    assert_close(ht, want_s, 1e-14, "state")
    ref_o, ref_s = recurrence(q, k, v, g=g, scale=0.3, h0=h0)
    assert_close(o, ref_o)
    assert_close(ht, ref_s, name="state")
    # without output_final_state: None, as fla; the default scale is K ** -0.5
    o, ht = fla.chunk_simple_gla(q, k, v, g)
    assert ht is None
    assert_close(o, recurrence(q, k, v, g=g)[0])


def test_chunk_simple_gla_g_gamma_runs_linear_attention_with_the_decay():
    q, k, v, h0 = inputs(T=20)
    g_gamma = torch.tensor([-0.1, -0.5], dtype=F64)
    o, ht = fla.chunk_simple_gla(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True)
    want_o, want_s = attnkit.linear_attention(t12(q), t12(k), t12(v), decay=-g_gamma, initial_state=h0,
                                              return_state=True)
    assert_close(o, t12(want_o), 1e-14)
    assert_close(ht, want_s, 1e-14, "state")
    ref_o, ref_s = recurrence(q, k, v, g=g_gamma.expand(2, 20, 2), h0=h0)
    assert_close(o, ref_o)
    assert_close(ht, ref_s, name="state")
    # no gate at all: undecayed linear attention
    assert_close(fla.chunk_simple_gla(q, k, v)[0], recurrence(q, k, v)[0])


def test_chunk_gla_forward_state_and_every_gradient():
    q, k, v, h0 = inputs(B=1, T=29, K=8, V=4)
    g = logsigmoid(rand(1, 29, 2, 8, seed=6) + 2)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    copies = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = fla.chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    ref_o, ref_s = recurrence(*copies[:3], g=copies[3], h0=copies[4])
    assert_close(o, ref_o)
    assert_close(ht, ref_s, name="state")
    up_o, up_s = rand(*o.shape, seed=9), rand(*ht.shape, seed=10)
    grads = torch.autograd.grad((o * up_o).sum() + (ht * up_s).sum(), leaves)
    want = torch.autograd.grad((ref_o * up_o).sum() + (ref_s * up_s).sum(), copies)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dh0"], grads, want):
        assert_close(a, b, name=name)


def test_chunk_gated_delta_rule_gva_in_kernel_options_and_every_gradient():
    """GVA (2 value heads per q/k head), q/k L2-normalised, beta from logits, Mamba-2's gate from
    A_log and dt_bias, states (N, HV, V, K): against the recurrence given the transformed inputs."""
    B, T, H, HV, K, V = 1, 21, 2, 4, 8, 4
    q, k, v = rand(B, T, H, K, seed=1), rand(B, T, H, K, seed=2), rand(B, T, HV, V, seed=3)
    g_raw, beta_raw = rand(B, T, HV, seed=4), rand(B, T, HV, seed=5)
    A_log, dt_bias, h0 = rand(HV, seed=6, scale=0.5), rand(HV, seed=7), rand(B, HV, V, K, seed=8, scale=0.5)
    tensors = (q, k, v, g_raw, beta_raw, A_log, dt_bias, h0)
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    copies = [x.clone().requires_grad_(True) for x in tensors]
    o, ht = fla.chunk_gated_delta_rule(*leaves[:5], initial_state=leaves[7], output_final_state=True,
                                       use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                       state_v_first=True, use_gate_in_kernel=True, A_log=leaves[5],
                                       dt_bias=leaves[6], chunk_size=32)
    q_, k_, v_, g_, b_, a_, d_, s_ = copies

    def l2(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    value_heads = (l2(q_).repeat_interleave(2, dim=2), l2(k_).repeat_interleave(2, dim=2))
    ref_o, ref_s = recurrence(*value_heads, v_, g=-a_.exp() * softplus(g_ + d_), beta=torch.sigmoid(b_),
                              h0=s_.transpose(-1, -2))
    assert o.shape == (B, T, HV, V) and ht.shape == (B, HV, V, K)
    assert_close(o, ref_o)
    assert_close(ht, ref_s.transpose(-1, -2), name="state")
    up_o, up_s = rand(*o.shape, seed=9), rand(*ht.shape, seed=10)
    grads = torch.autograd.grad((o * up_o).sum() + (ht * up_s).sum(), leaves)
    want = torch.autograd.grad((ref_o * up_o).sum() + (ref_s.transpose(-1, -2) * up_s).sum(), copies)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0"], grads, want):
        assert_close(a, b, name=name)


def test_chunk_gated_delta_rule_equals_the_op_and_g_none_is_deltanet():
    q, k, v, h0 = inputs(T=25, K=8, V=8)
    beta = torch.rand(2, 25, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.1
    g = -torch.rand(2, 25, 2, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.2
    o, ht = fla.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    want_o, want_s = attnkit.delta_rule_attention(t12(q), t12(k), t12(v), t12(beta), g=t12(g), qk_l2norm=True,
                                                  initial_state=h0, return_state=True)
    assert_close(o, t12(want_o), 1e-14)
    assert_close(ht, want_s, 1e-14, "state")
    qn, kn = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    o, ht = fla.chunk_gated_delta_rule(qn, kn, v, None, beta, initial_state=h0, output_final_state=True)
    ref_o, ref_s = recurrence(qn, kn, v, beta=beta, h0=h0)
    assert_close(o, ref_o)
    assert_close(ht, ref_s, name="state")


def test_chunk_linear_attn_normalizes_as_fla_and_chains_its_z_state():
    q, k, v, _ = inputs(T=30)
    q, k = q.relu(), k.relu() + 0.1  # positive scores: a denominator far from 0
    o, (ht, z) = fla.chunk_linear_attn(q, k, v, scale=0.5, output_final_state=True)
    plain, state = recurrence(q, k, v, scale=0.5)
    zs = k.cumsum(1)
    assert_close(o, plain / (0.5 * (q * zs).sum(-1, keepdim=True) + 1e-10))
    assert_close(ht, state, name="state")
    assert_close(z, zs[:, -1:], name="z_state")
    # two pieces, the second given (kv_state, z_state), equal one call
    o1, (h1, z1) = fla.chunk_linear_attn(q[:, :11], k[:, :11], v[:, :11], scale=0.5, output_final_state=True)
    o2, (h2, z2) = fla.chunk_linear_attn(q[:, 11:], k[:, 11:], v[:, 11:], scale=0.5, initial_state=(h1, z1),
                                         output_final_state=True)
    assert_close(torch.cat([o1, o2], dim=1), o)
    assert_close(h2, ht, name="state")
    assert_close(z2, z, name="z_state")
    # without output_final_state fla still returns (None, z_state) when normalizing
    assert fla.chunk_linear_attn(q, k, v)[1][0] is None
    # normalize=False: the plain recurrence, the state a tensor
    o, ht = fla.chunk_linear_attn(q, k, v, normalize=False, output_final_state=True)
    plain, state = recurrence(q, k, v)
    assert_close(o, plain)
    assert_close(ht, state, name="state")


def test_fused_recurrent_simple_gla_forward_and_reverse():
    q, k, v, h0 = inputs(T=19)
    g = logsigmoid(rand(2, 19, 2, seed=5) + 2)
    for reverse in (False, True):
        o, ht = fla.fused_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                               reverse=reverse)
        ref_o, ref_s = recurrence(q, k, v, g=g, h0=h0, reverse=reverse)
        assert_close(o, ref_o, name=f"out reverse={reverse}")
        assert_close(ht, ref_s, name=f"state reverse={reverse}")
    # a decoding step (T = 1), in fla's old spelling of state_v_first
    o, ht = fla.fused_recurrent_simple_gla(q[:, :1], k[:, :1], v[:, :1], g[:, :1], initial_state=h0.mT,
                                           output_final_state=True, transpose_state_layout=True)
    ref_o, ref_s = recurrence(q[:, :1], k[:, :1], v[:, :1], g=g[:, :1], h0=h0)
    assert_close(o, ref_o)
    assert_close(ht, ref_s.mT, name="state")


def test_the_functions_run_the_kernels_when_asked(monkeypatch):
    """backend "triton" (the module's setting) on lightning's kernel: g_gamma and chunk_linear_attn,
    float32, against the float64 recurrence (under the interpreter on CPU)."""
    monkeypatch.setattr(fla, "backend", "triton")
    q, k, v, h0 = (x.float().to(DEVICE) for x in inputs(B=1, T=20, K=16, V=16))
    g_gamma = torch.tensor([-0.1, -0.5], device=DEVICE)
    o, ht = fla.chunk_simple_gla(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True)
    ref_o, ref_s = recurrence(*(x.double() for x in (q, k, v)), g=g_gamma.double().expand(1, 20, 2), h0=h0.double())
    assert_close(o.double(), ref_o, 2e-5)
    assert_close(ht.double(), ref_s, 2e-5, "state")
    o, (ht, _) = fla.chunk_linear_attn(q, k.abs(), v, output_final_state=True)
    ref_o, ref_s = recurrence(*(x.double() for x in (q, k.abs(), v)))
    denom = (q.double() * k.abs().double().cumsum(1)).sum(-1, keepdim=True) / 4 + 1e-10
    assert_close(o.double(), ref_o / denom, 2e-5)
    assert_close(ht.double(), ref_s, 2e-5, "state")


# ---------------------------------------------------------------- packed sequences: fla's int64 cu_seqlens

LENGTHS = [5, 0, 17, 9]


def _packed_case(name, T, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, _ = inputs(B=1, T=T, seed=seed)
    beta = torch.rand(1, T, 2, dtype=F64, generator=gen) * 0.9 + 0.1
    gates = {"chunk_simple_gla": ((logsigmoid(rand(1, T, 2, seed=7) + 2),), {}),
             "fused_recurrent_simple_gla": ((logsigmoid(rand(1, T, 2, seed=7) + 2),), {"reverse": True}),
             "chunk_gla": ((logsigmoid(rand(1, T, 2, 8, seed=7) + 2),), {}),
             "chunk_gated_delta_rule": ((-torch.rand(1, T, 2, dtype=F64, generator=gen) * 0.2, beta),
                                        {"use_qk_l2norm_in_kernel": True}),
             "chunk_linear_attn": ((), {"normalize": False})}
    extra, options = gates[name]
    return (q, k, v, *extra), options


@pytest.mark.parametrize("name", ["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_gla",
                                  "chunk_gated_delta_rule", "chunk_linear_attn"])
def test_packed_sequences_equal_per_sequence_calls(name):
    fn = getattr(fla, name)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int64)
    tensors, options = _packed_case(name, int(cu[-1]))
    h0 = rand(len(LENGTHS), 2, 8, 12, seed=11, scale=0.5)
    o, ht = fn(*tensors, initial_state=h0, output_final_state=True, cu_seqlens=cu, **options)
    assert ht.shape == (len(LENGTHS), 2, 8, 12)
    for s in range(len(LENGTHS)):
        part = [x[:, cu[s]:cu[s + 1]] for x in tensors]
        o_s, h_s = fn(*part, initial_state=h0[s:s + 1], output_final_state=True, **options)
        assert_close(o[:, cu[s]:cu[s + 1]], o_s, 1e-12, f"out of sequence {s}")
        assert_close(ht[s:s + 1], h_s, 1e-12, f"state of sequence {s}")


def test_packed_normalized_linear_attn_keeps_a_z_state_per_sequence():
    cu = torch.tensor([0, 5, 5, 22, 31])
    q, k, v, _ = inputs(B=1, T=31)
    q, k = q.relu(), k.relu() + 0.1
    z0 = rand(4, 1, 2, 8, seed=12).abs()
    o, (_, z) = fla.chunk_linear_attn(q, k, v, initial_state=(None, z0), cu_seqlens=cu)
    for s in range(4):
        a, b = int(cu[s]), int(cu[s + 1])
        o_s, (_, z_s) = fla.chunk_linear_attn(q[:, a:b], k[:, a:b], v[:, a:b], initial_state=(None, z0[s:s + 1]))
        assert_close(o[:, a:b], o_s, 1e-12, f"out of sequence {s}")
        assert_close(z[s:s + 1], z_s, 1e-12, f"z_state of sequence {s}")
    assert_close(z[1:2], z0[1:2], 0.0, "an empty sequence keeps its z_state")


# ---------------------------------------------------------------- what attnkit cannot honour: named errors

def _args(T=8):
    q, k, v, h0 = inputs(B=1, T=T)
    return q, k, v, -torch.rand(1, T, 2, dtype=F64), torch.full((1, T, 2), 0.5, dtype=F64), h0


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g, head_first=True), TypeError, "head_first"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, head_first=False), TypeError, "head_first"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g, bogus=1), TypeError, "bogus"),
    (lambda q, k, v, g, b, h0: fla.fused_recurrent_simple_gla(q, k, v, g, chunk_size=64), TypeError, "chunk_size"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g, chunk_size=48), ValueError, "power of two"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, chunk_size=128), ValueError, "chunk_size"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g, g_gamma=torch.zeros(2, dtype=F64)), ValueError,
     "not both"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g_gamma=torch.tensor([-0.1, 0.2], dtype=F64)),
     ValueError, "g_gamma must hold finite log-decays <= 0"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g_gamma=torch.zeros(3, dtype=F64)), ValueError,
     "g_gamma must have shape"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, torch.zeros(1, 8, 2, 8, dtype=F64)), ValueError,
     "per-channel gates: chunk_gla"),
    (lambda q, k, v, g, b, h0: fla.chunk_gla(q, k, v, g), ValueError, r"g must have shape \(B, T, H, K\)"),
    (lambda q, k, v, g, b, h0: fla.chunk_gla(q, k, v, -g[..., None].expand(1, 8, 2, 8)), ValueError, "g must be <= 0"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, cp_context=object()), NotImplementedError,
     "cp_context"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, allow_neg_eigval=True,
                                                          use_beta_sigmoid_in_kernel=True), NotImplementedError,
     "allow_neg_eigval"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, allow_neg_eigval=True), ValueError,
     "use_beta_sigmoid_in_kernel"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, use_gate_in_kernel=True), ValueError,
     "A_log"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, A_log=torch.zeros(2)), ValueError,
     "use_gate_in_kernel"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k[:, :, :1], v, g, b), ValueError,
     "same number of heads"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v[:, :, :1], g[..., :1], b[..., :1]), ValueError,
     "multiple"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b * 3), ValueError, r"beta must lie in \(0, 1\]"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b, state_v_first=True,
                                                          transpose_state_layout=True), ValueError, "not both"),
    (lambda q, k, v, g, b, h0: fla.chunk_linear_attn(q, k, v, initial_state=(h0, None), normalize=False), TypeError,
     "normalize=False"),
    (lambda q, k, v, g, b, h0: fla.chunk_linear_attn(q, k, v, initial_state=(h0, torch.zeros(1, 2, 8, dtype=F64))),
     ValueError, "z_state"),
    (lambda q, k, v, g, b, h0: fla.chunk_gla(q, k, v, g[..., None].expand(1, 8, 2, 8), output_final_state=1),
     TypeError, "output_final_state"),
    (lambda q, k, v, g, b, h0: fla.chunk_simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 3, 9])), ValueError,
     "cu_seqlens"),
    (lambda q, k, v, g, b, h0: fla.fused_recurrent_simple_gla(q, k, v, g, reverse=True, cu_seqlens=torch.tensor(
        [0, 3, 9])), ValueError, "cu_seqlens"),
    (lambda q, k, v, g, b, h0: fla.chunk_gla(q, k[0], v, g[..., None]), ValueError, r"k must have shape \(B, T, H, K\)"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, g, b[0]), ValueError,
     r"beta must have shape \(B, T, HV\)"),
    (lambda q, k, v, g, b, h0: fla.chunk_linear_attn(q, k, v[0]), ValueError, r"v must have shape \(B, T, H, V\)"),
    (lambda q, k, v, g, b, h0: fla.chunk_gated_delta_rule(q, k, v, None, b, use_gate_in_kernel=True,
                                                          A_log=torch.zeros(2, dtype=F64)), ValueError, "needs g"),
])
def test_unsupported_and_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(*_args())
