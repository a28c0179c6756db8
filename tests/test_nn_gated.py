"""attnkit.nn.Attention with the gated linear variants (gla, delta_rule): the gates it computes
from its input, gradients into their projections, decoding with the recurrent state, bad
options, and the hybrid LM example."""

import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import attnkit

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: (variant, gate): every gate form of the two variants
FORMS = [("gla", "channel"), ("gla", "scalar"), ("delta_rule", "scalar"), ("delta_rule", "none")]


def make(variant, gate, backend="auto", **extra):
    torch.manual_seed(0)
    # GQA (4 query heads on 2 kv heads) and RoPE: the gates are per query head, the positions continue
    return attnkit.nn.Attention(32, num_heads=4, num_kv_heads=2, variant=variant, gate=gate, rope=True,
                                backend=backend, **extra).to(DEVICE)


@pytest.mark.parametrize("variant,gate", FORMS)
def test_forward_shapes_and_gate_shapes(variant, gate):
    block = make(variant, gate)
    x = torch.randn(2, 9, 32, device=DEVICE)
    assert block(x).shape == (2, 9, 32)
    gates = block.gates(x)
    if variant == "gla":
        assert set(gates) == {"g"}
        assert gates["g"].shape == ((2, 4, 9, 8) if gate == "channel" else (2, 4, 9))
    else:
        assert set(gates) == ({"beta", "g"} if gate == "scalar" else {"beta"})
        assert gates["beta"].shape == (2, 4, 9)
        assert ((gates["beta"] > 0) & (gates["beta"] < 1)).all()
        if gate == "scalar":
            assert gates["g"].shape == (2, 4, 9)
    if "g" in gates:
        assert gates["g"].dtype == torch.float32 and (gates["g"] <= 0).all() and gates["g"].isfinite().all()


def test_gates_are_the_standard_forms():
    x = torch.randn(2, 7, 32, device=DEVICE)
    # GLA: logsigmoid of a low-rank projection (32 -> 16 -> Dk per head), divided by 16
    block = make("gla", "channel")
    low_rank, up = block.gates.gk_proj
    assert (low_rank.in_features, low_rank.out_features, up.out_features) == (32, 16, 4 * 8)
    assert low_rank.bias is None and up.bias is not None
    want = F.logsigmoid(block.gates.gk_proj(x)) / 16
    torch.testing.assert_close(block.gates(x)["g"], want.view(2, 7, 4, 8).transpose(1, 2))
    # gate_logit_normalizer and gate_low_rank_dim are the user's
    block = make("gla", "channel", gate_low_rank_dim=4, gate_logit_normalizer=8)
    assert block.gates.gk_proj[0].out_features == 4
    torch.testing.assert_close(block.gates(x)["g"],
                               (F.logsigmoid(block.gates.gk_proj(x)) / 8).view(2, 7, 4, 8).transpose(1, 2))
    # Mamba-2's scalar gate: g = -exp(A_log) * softplus(dt_proj(x) + dt_bias), per head
    for variant in ("gla", "delta_rule"):
        gates = make(variant, "scalar").gates
        want = -gates.A_log.exp() * F.softplus(gates.dt_proj(x) + gates.dt_bias)
        torch.testing.assert_close(gates(x)["g"], want.transpose(1, 2))
        assert gates.A_log.shape == gates.dt_bias.shape == (4,)
        assert (gates.A_log.exp() >= 1).all() and (gates.A_log.exp() <= 16).all()   # A in [1, 16]
        dt = F.softplus(gates.dt_bias)                                               # dt in [1e-3, 0.1]
        assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    # delta rule: beta = sigmoid(b_proj(x)); q and k L2-normalised by default
    block = make("delta_rule", "none")
    torch.testing.assert_close(block.gates(x)["beta"], torch.sigmoid(block.gates.b_proj(x)).transpose(1, 2))
    assert block.options()["qk_l2norm"] is True
    assert make("delta_rule", "none", qk_l2norm=False).options()["qk_l2norm"] is False


@pytest.mark.parametrize("variant,gate", FORMS)
def test_gradients_reach_the_gate_projections(variant, gate):
    block = make(variant, gate)
    block(torch.randn(2, 11, 32, device=DEVICE)).square().mean().backward()
    for name, param in block.gates.named_parameters():
        assert param.grad is not None, name
        assert param.grad.isfinite().all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("variant,gate", FORMS)
def test_decoding_through_the_cache_equals_the_full_sequence(variant, gate, backend):
    block = make(variant, gate, backend)
    x = torch.randn(2, 13, 32, device=DEVICE)
    with torch.no_grad():
        full = block(x)
        cache = block.new_cache()
        assert isinstance(cache, attnkit.nn.RecurrentStateCache)
        parts = [block(x[:, :6], cache=cache)]                               # prefill with the state
        parts += [block(x[:, t:t + 1], cache=cache) for t in range(6, 13)]  # then one token at a time
    assert cache.seen == 13
    assert cache.state.shape == (2, 4, 8, 8) and cache.state.dtype == torch.float32  # (B, H, Dk, Dv)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"variant": "gla", "gate": "vector"}, ValueError, r"gate must be one of \('channel', 'scalar'\)"),
    ({"variant": "gla", "gate": 1}, TypeError, "gate must be"),
    ({"variant": "delta_rule", "gate": "channel"}, ValueError, r"gate must be one of \('scalar', 'none'\)"),
    ({"variant": "flash", "causal": True, "gate": "scalar"}, ValueError, "variant 'flash' has no data-dependent gates"),
    ({"variant": "lightning", "gate_low_rank_dim": 8}, ValueError, "gate_low_rank_dim.*'gla', 'delta_rule'"),
    ({"variant": "gla", "gate": "scalar", "gate_low_rank_dim": 8}, ValueError, "gate_low_rank_dim.*gate='channel'"),
    ({"variant": "delta_rule", "gate_logit_normalizer": 8.0}, ValueError, "gate_logit_normalizer.*gate='channel'"),
    ({"variant": "gla", "gate_low_rank_dim": 0}, ValueError, "gate_low_rank_dim must be >= 1"),
    ({"variant": "gla", "gate_low_rank_dim": 2.0}, TypeError, "gate_low_rank_dim must be an int"),
    ({"variant": "gla", "gate_logit_normalizer": 0.0}, ValueError, "gate_logit_normalizer must be a finite number > 0"),
    ({"variant": "gla", "gate_logit_normalizer": float("nan")}, ValueError, "gate_logit_normalizer must be a finite"),
    ({"variant": "gla", "gate_logit_normalizer": "16"}, TypeError, "gate_logit_normalizer must be a number"),
    ({"variant": "gla", "g": torch.zeros(1, 4, 1)}, ValueError, "g is computed by the block from its input"),
    ({"variant": "delta_rule", "beta": torch.ones(1, 4, 1)}, ValueError, "beta is computed by the block"),
    ({"variant": "delta_rule", "qk_l2norm": "yes"}, TypeError, "qk_l2norm must be a bool"),
    ({"variant": "gla", "scale": float("inf")}, ValueError, "scale must be finite"),
])
def test_bad_options_raise_clear_errors_when_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        attnkit.nn.Attention(32, 4, **kwargs)


def test_hybrid_lm_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "hybrid_lm.py"), "--fast"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loss decreased" in result.stdout
    assert "cached generation equals the no-cache generation" in result.stdout


@pytest.mark.parametrize("per_channel", [False, True])
def test_gla_torch_backend_takes_strided_inputs_of_whole_chunks(per_channel):
    # a block's q, k, v are views of its fused projection and its gates a transpose: with N a
    # multiple of the chunk (nothing padded) the torch backend viewed them and raised
    B, N, H, D = 2, 64, 2, 8
    q, k, v = torch.randn(B, N, 3, H, D, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    g = F.logsigmoid(torch.randn(B, N, H, *((D,) if per_channel else ()), dtype=torch.float64)).transpose(1, 2)
    assert not q.is_contiguous() and not g.is_contiguous()
    want = attnkit.gated_linear_attention(q, k, v, g, backend="reference", return_state=True)
    got = attnkit.gated_linear_attention(q, k, v, g, backend="torch", return_state=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["gla", "delta_rule"])
def test_a_block_builds_on_the_meta_device(variant):
    # the build-time check's one-token stand-in gates sit on the CPU beside its q, not on the default device
    with torch.device("meta"):
        block = attnkit.nn.Attention(32, 4, variant=variant)
    gate_params = list(block.gates.parameters())
    assert gate_params and all(p.is_meta for p in block.parameters())


@pytest.mark.parametrize("variant,gate", FORMS)
def test_decoding_through_the_kernels(variant, gate):
    # the Triton kernels (the interpreter on CPU): prefill, then the recurrent decode steps, equal the
    # whole sequence, and the reference
    torch.manual_seed(0)
    block = attnkit.nn.Attention(32, 2, num_kv_heads=1, variant=variant, gate=gate, rope=True,
                                 backend="triton").to(DEVICE)
    reference = attnkit.nn.Attention(32, 2, num_kv_heads=1, variant=variant, gate=gate, rope=True,
                                     backend="reference").to(DEVICE)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(1, 9, 32, device=DEVICE)
    with torch.no_grad():
        full = block(x)
        cache = block.new_cache()
        parts = [block(x[:, :5], cache=cache)] + [block(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
        torch.testing.assert_close(full, reference(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)
