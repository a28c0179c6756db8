"""Drop-ins: the SDPA function and nn.MultiheadAttention, against torch's own."""

import pytest
import torch
import torch.nn.functional as F

import attnkit

from conftest import DEVICE


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- scaled_dot_product_attention


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_routes_to_the_kernel_and_matches_torch(is_causal, gqa):
    q = rand(2, 4, 33, 32, seed=1)
    k, v = rand(2, 2 if gqa else 4, 33, 32, seed=2), rand(2, 2 if gqa else 4, 33, 32, seed=3)
    assert attnkit.sdpa_route(q, k, v, is_causal=is_causal, enable_gqa=gqa, backend="triton") == []
    got = attnkit.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa, backend="triton")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool_mask", "float_mask", "causal_l<s", "dropout", "3d"])
def test_sdpa_other_calls_take_torchs_path_with_torchs_semantics(kind):
    q, k, v = rand(2, 4, 7, 16, seed=1), rand(2, 4, 11, 16, seed=2), rand(2, 4, 11, 16, seed=3)
    kwargs = {}
    if kind == "bool_mask":
        kwargs["attn_mask"] = rand(7, 11, seed=4) > 0
    elif kind == "float_mask":
        kwargs["attn_mask"] = rand(2, 1, 7, 11, seed=4)
    elif kind == "causal_l<s":
        kwargs["is_causal"] = True  # torch: top-left; the kernel would be bottom-right
    elif kind == "dropout":
        kwargs["dropout_p"] = 0.5
    else:
        q, k, v = q[0], k[0], v[0]
    assert attnkit.sdpa_route(q, k, v, backend="triton", **kwargs)
    torch.manual_seed(0)
    got = attnkit.scaled_dot_product_attention(q, k, v, backend="triton", **kwargs)
    torch.manual_seed(0)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, want)


def test_sdpa_gradients_through_the_kernel():
    q, k, v = (rand(1, 2, 20, 16, seed=s).requires_grad_() for s in range(3))
    attnkit.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton").sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_sdpa_bad_backend():
    q = rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        attnkit.scaled_dot_product_attention(q, q, q, backend="reference")


# ---------------------------------------------------------------- MultiheadAttention


def pair(**kwargs):
    """A torch MHA and an attnkit MHA holding the same weights (loaded via state_dict)."""
    torch.manual_seed(0)
    variant_options = {k: kwargs.pop(k) for k in ("causal", "softcap") if k in kwargs}
    ref = torch.nn.MultiheadAttention(**kwargs).to(DEVICE).eval()
    ours = attnkit.nn.MultiheadAttention(**kwargs, backend="triton", **variant_options).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("config", [
    dict(embed_dim=32, num_heads=4),
    dict(embed_dim=32, num_heads=4, batch_first=True),
    dict(embed_dim=32, num_heads=2, kdim=24, vdim=40, batch_first=True),
    dict(embed_dim=32, num_heads=4, bias=False),
    dict(embed_dim=32, num_heads=4, add_bias_kv=True, add_zero_attn=True, batch_first=True),
], ids=["default", "batch_first", "kdim_vdim", "no_bias", "bias_kv_zero_attn"])
def test_mha_state_dict_loads_and_outputs_match(config):
    ref, ours = pair(**config)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    kdim, vdim = config.get("kdim", 32), config.get("vdim", 32)
    L, S, N = 9, 13, 2
    shape = (lambda n, d: (N, n, d)) if config.get("batch_first") else (lambda n, d: (n, N, d))
    query, key, value = rand(*shape(L, 32), seed=1), rand(*shape(S, kdim), seed=2), rand(*shape(S, vdim), seed=3)
    got, got_w = ours(query, key, value, need_weights=False)
    want, _ = ref(query, key, value, need_weights=False)
    assert got_w is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mha_unbatched_input():
    ref, ours = pair(embed_dim=16, num_heads=2)
    x = rand(6, 16)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool_attn_mask", "float_attn_mask", "key_padding_mask", "need_weights"])
def test_mha_masks_and_weights_match_torch(kind):
    ref, ours = pair(embed_dim=32, num_heads=4, batch_first=True)
    x = rand(2, 10, 32, seed=1)
    kwargs = {"need_weights": kind == "need_weights"}
    if kind == "bool_attn_mask":
        kwargs["attn_mask"] = torch.triu(torch.ones(10, 10, dtype=torch.bool, device=DEVICE), 1)
    elif kind == "float_attn_mask":
        kwargs["attn_mask"] = rand(10, 10, seed=2)
    elif kind == "key_padding_mask":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 10, [False] * 7 + [True] * 3], device=DEVICE)
    got, got_w = ours(x, x, x, **kwargs)
    want, want_w = ref(x, x, x, **kwargs)
    torch.testing.assert_close(got, want)
    if kind == "need_weights":
        torch.testing.assert_close(got_w, want_w)
        assert got_w.shape == (2, 10, 10)


def test_mha_causal_hint_runs_the_causal_kernel():
    ref, ours = pair(embed_dim=32, num_heads=4, batch_first=True)
    x = rand(2, 12, 32, seed=1)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(12, device=DEVICE)
    got, _ = ours(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    want, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mha_variant_options_and_gradients():
    _, ours = pair(embed_dim=32, num_heads=4, batch_first=True, causal=True)
    x = rand(2, 12, 32, seed=1).requires_grad_()
    out, _ = ours(x, x, x, need_weights=False)
    out.sum().backward()
    assert ours.in_proj_weight.grad is not None and x.grad is not None
    # causal: the first position depends only on itself
    y = x.detach().clone()
    y[:, 1:] += 1.0
    torch.testing.assert_close(ours(y, y, y, need_weights=False)[0][:, 0], out.detach()[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,call,match", [
    (lambda: attnkit.nn.MultiheadAttention(30, 4), None, "embed_dim .30. must be divisible by num_heads .4."),
    (lambda: attnkit.nn.MultiheadAttention(32, 4, causal=True), lambda m, x: m(x, x, x), "need_weights=True"),
    (lambda: attnkit.nn.MultiheadAttention(32, 4, softcap=2.0),
     lambda m, x: m(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5)), "attn_mask .*softcap=2.0"),
    (lambda: attnkit.nn.MultiheadAttention(32, 4), lambda m, x: m(x, x, x, need_weights=False, is_causal=True),
     "is_causal=True needs attn_mask"),
    (lambda: attnkit.nn.MultiheadAttention(32, 4, variant="nope"), None, "unknown attention variant"),
])
def test_mha_bad_combinations(make, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        m = make()
        call(m, torch.randn(5, 1, 32))
