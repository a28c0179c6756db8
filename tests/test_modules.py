"""attnkit.nn.Attention: variants, GQA, RoPE, tensor options as buffers, incremental decoding."""

import pytest
import torch

import attnkit

from conftest import DEVICE

VARIANTS = {
    "flash": dict(causal=True),
    "sliding_window": dict(window=5, sinks=2),
    "sliding_window_per_head": dict(window=torch.tensor([[4, 0], [-1, 0], [2, 0], [6, 0]], dtype=torch.int32)),
    "linear": dict(feature_map="elu+1"),
    "lightning": dict(slopes=attnkit.lightning_slopes(4)),
}


def make(name, backend="reference", **extra):
    torch.manual_seed(0)
    options = dict(VARIANTS[name], **extra)
    variant = "sliding_window" if name.startswith("sliding_window") else name
    return attnkit.nn.Attention(32, num_heads=4, num_kv_heads=2, variant=variant, rope=True, backend=backend,
                                **options).to(DEVICE)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decoding_through_the_cache_equals_the_full_sequence(name, backend):
    block = make(name, backend)
    x = torch.randn(2, 13, 32, device=DEVICE)
    with torch.no_grad():
        full = block(x)
        cache = block.new_cache()
        parts = [block(x[:, :6], cache=cache)]  # chunked prefill
        parts += [block(x[:, t:t + 1], cache=cache) for t in range(6, 13)]  # one token at a time
    assert cache.seen == 13
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_rope_depends_only_on_relative_position():
    rope = attnkit.nn.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    at = lambda x, p: rope(x, torch.tensor([p]))  # noqa: E731
    dot = lambda m, n: (at(q, m) * at(k, n)).sum()  # noqa: E731
    torch.testing.assert_close(dot(7, 3), dot(104, 100))
    assert not torch.allclose(dot(7, 3), dot(7, 4))
    torch.testing.assert_close(at(q, 0), q)  # position 0 is the identity
    torch.testing.assert_close(at(q, 5).norm(), q.norm())  # a rotation


def test_rope_matches_transformers_convention():
    pytest.importorskip("transformers", reason="transformers is an optional extra")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    D, N = 16, 9
    rope = attnkit.nn.RotaryEmbedding(D, base=500.0)
    q, k = torch.randn(1, 2, N, D), torch.randn(1, 2, N, D)
    pos = torch.arange(N)
    freqs = pos[:, None].float() * (500.0 ** (-torch.arange(0, D, 2).float() / D))[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    want_q, want_k = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(rope(q, pos), want_q)
    torch.testing.assert_close(rope(k, pos), want_k)


def test_tensor_options_follow_the_module():
    block = make("lightning")
    assert "option_slopes" in dict(block.named_buffers())
    block = block.double()
    assert block.option_slopes.dtype == torch.float64
    assert block(torch.randn(1, 5, 32, dtype=torch.float64, device=DEVICE)).dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="flash"), "needs causal=True"),
    (dict(variant="linear", causal=False), "needs causal=True"),
])
def test_new_cache_refuses_what_cannot_decode(kwargs, match):
    block = attnkit.nn.Attention(32, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        block.new_cache()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rope="yes"), TypeError, "rope must be"),
    (dict(rope=True, num_heads=32), ValueError, "even head dim"),
])
def test_bad_rope(kwargs, error, match):
    kwargs = dict(dict(dim=32, num_heads=4), **kwargs)
    with pytest.raises(error, match=match):
        attnkit.nn.Attention(**kwargs)


def test_input_width_is_checked():
    block = attnkit.nn.Attention(32, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\)"):
        block(torch.randn(1, 3, 16))
