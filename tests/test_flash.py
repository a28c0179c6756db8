"""Flash variant: the reference against torch SDPA, the kernel's special cases, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import attnkit
from attnkit.flash.reference import flash_reference
from attnkit.kernels.engine import force_config
from attnkit.registry import Case
from attnkit.testing import check_case, relative_error

from conftest import DEVICE


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa(causal):
    q, k, v = rand(2, 4, 50, 24, seed=1), rand(2, 2, 50, 24, seed=2), rand(2, 2, 50, 24, seed=3)
    ours = flash_reference(q.double(), k.double(), v.double(), causal=causal)
    theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_reference_causal_is_bottom_right():
    Nq, Nk = 7, 19
    q, k, v = rand(1, 2, Nq, 16, seed=1).double(), rand(1, 2, Nk, 16, seed=2).double(), rand(1, 2, Nk, 16).double()
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    mask = j <= i + (Nk - Nq)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flash_reference(q, k, v, causal=True), theirs, rtol=1e-10, atol=1e-10)


def test_reference_softcap_and_sink_by_hand():
    q, k, v = rand(1, 3, 9, 8, seed=1).double(), rand(1, 3, 11, 8, seed=2).double(), rand(1, 3, 11, 8).double()
    sink = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = 4.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.3 / 4.0)
    s = torch.cat([s, sink.view(1, 3, 1, 1).expand(1, 3, 9, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :-1]
    out, lse = flash_reference(q, k, v, scale=0.3, softcap=4.0, sink_logits=sink, return_lse=True)
    torch.testing.assert_close(out, p @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1))


def test_reference_chunking_does_not_change_results(monkeypatch):
    q, k, v = rand(1, 2, 70, 16, seed=1).double(), rand(1, 2, 70, 16, seed=2).double(), rand(1, 2, 70, 16).double()
    whole = flash_reference(q, k, v, causal=True, return_lse=True)
    monkeypatch.setattr("attnkit.flash.reference.query_chunk_rows", lambda bh, nk: 16)
    chunked = flash_reference(q, k, v, causal=True, return_lse=True)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- kernel special cases


@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16), (64, 32)])
def test_kernel_tilings(tile):
    case = Case((2, 4, 45, 40), (2, 2, 61, 40), (2, 2, 61, 40), {"causal": True}, name="tiling")
    with force_config(*tile):
        report = check_case("flash", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)


@pytest.mark.parametrize("head_dim", [96, 256])
def test_kernel_large_and_odd_head_dims(head_dim):
    case = Case((1, 1, 20, head_dim), (1, 1, 20, head_dim), (1, 1, 20, head_dim), {"causal": True})
    report = check_case("flash", case, dtype=torch.float16, device=DEVICE)
    assert report.ok, str(report)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fully_masked_rows_give_zero_output_and_finite_grads(backend):
    # Nq > Nk with causal: the first Nq - Nk rows see no key at all.
    q = rand(1, 2, 40, 16, seed=1).requires_grad_()
    k = rand(1, 2, 10, 16, seed=2).requires_grad_()
    v = rand(1, 2, 10, 16, seed=3).requires_grad_()
    out, lse = attnkit.flash_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert torch.all(out[:, :, :30] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :30]))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :30] == 0)


def test_varlen_equals_separate_sequences():
    lengths_q, lengths_k = [5, 33, 1], [9, 33, 20]
    q = rand(1, 4, sum(lengths_q), 32, seed=1)
    k, v = rand(1, 2, sum(lengths_k), 32, seed=2), rand(1, 2, sum(lengths_k), 32, seed=3)
    cu_q = torch.tensor([0, 5, 38, 39], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 42, 62], dtype=torch.int32, device=DEVICE)
    packed = attnkit.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    parts = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        parts.append(attnkit.flash_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], causal=True,
                                             backend="triton"))
    torch.testing.assert_close(packed, torch.cat(parts, dim=2), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    # (B, N, H, D) storage viewed as (B, H, N, D), as a model's projections produce it
    q = rand(2, 37, 4, 32, seed=1).transpose(1, 2)
    k = rand(2, 37, 4, 32, seed=2).transpose(1, 2)
    v = rand(2, 37, 4, 32, seed=3).transpose(1, 2)
    got = attnkit.flash_attention(q, k, v, causal=True, backend="triton")
    want = attnkit.flash_attention(q, k, v, causal=True, backend="reference")
    assert relative_error(got, want) < 1e-5


def test_output_dtypes_and_shapes():
    q, k, v = (rand(2, 4, 17, 32, dtype=torch.float16, seed=s) for s in range(3))
    v = rand(2, 4, 17, 24, dtype=torch.float16)
    for backend in ("triton", "reference"):
        out, lse = attnkit.flash_attention(q, k, v, return_lse=True, backend=backend)
        assert out.dtype == torch.float16 and out.shape == (2, 4, 17, 24)
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 17)


def test_reference_backend_upcasts_half_and_keeps_grad_dtype():
    q, k, v = (rand(1, 2, 9, 16, dtype=torch.float16, seed=s).requires_grad_() for s in range(3))
    out = attnkit.flash_attention(q, k, v, backend="reference")
    out.float().sum().backward()
    assert q.grad.dtype == torch.float16 and out.dtype == torch.float16


def test_sink_logits_gradient_flows():
    q, k, v = (rand(1, 2, 12, 16, seed=s) for s in range(3))
    sink = torch.zeros(2, device=DEVICE, requires_grad=True)
    attnkit.flash_attention(q, k, v, sink_logits=sink, backend="triton").sum().backward()
    assert sink.grad is not None and torch.all(sink.grad != 0)


# ---------------------------------------------------------------- dispatch


def test_auto_on_cpu_uses_torch_backend_and_explains():
    q = rand(1, 1, 8, 16)
    e = attnkit.explain(q, q, q, "flash")
    assert e.backend == ("triton" if DEVICE == "cuda" else "torch")
    assert e.reasons and isinstance(str(e), str)


def test_head_dim_too_large_falls_back_and_triton_refuses():
    q = rand(1, 1, 8, 320)
    e = attnkit.explain(q, q, q, "flash", backend="auto")
    assert e.backend == "torch"
    assert any("head dim 320" in r for r in e.kernel_blockers)
    with pytest.raises(ValueError, match="head dim 320"):
        attnkit.flash_attention(q, q, q, backend="triton")
    out = attnkit.flash_attention(q, q, q)  # auto works through the torch backend
    assert out.shape == (1, 1, 8, 320)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("only meaningful for CPU tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = rand(1, 1, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attnkit.flash_attention(q, q, q, backend="triton")


# ---------------------------------------------------------------- bad input


def _qkv(B=1, Hq=2, Hkv=2, N=8, D=16):
    return rand(B, Hq, N, D), rand(B, Hkv, N, D), rand(B, Hkv, N, D)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have rank 4"),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "same sequence"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "same head dim"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "same number of heads"),
    (lambda q, k, v: (q[:, :1], k, v), ValueError, "multiple of the number of key/value heads"),
    (lambda q, k, v: (q, torch.cat([k, k]), v), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "dtype"),
    (lambda q, k, v: (q, k, v.to(torch.int32)), TypeError, "floating"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "on one device"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), ValueError, "head dims must be at least 1"),  # empty N is fine
])
def test_bad_shapes(mutate, error, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises(error, match=match):
        attnkit.flash_attention(q, k, v)


@pytest.mark.parametrize("options,error,match", [
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"scale": math.inf}, ValueError, "scale must be finite"),
    ({"scale": math.nan}, ValueError, "scale must be finite"),
    ({"scale": "x"}, TypeError, "scale"),
    ({"causal": 1}, TypeError, "causal must be a bool"),
    ({"sink_logits": torch.zeros(3)}, ValueError, r"sink_logits must have shape \(2,\)"),
    ({"window": 3}, TypeError, "unknown option"),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        attnkit.flash_attention(*_qkv(), **options) if "window" not in options else attnkit.attention(
            *_qkv(), "flash", **options)


@pytest.mark.parametrize("cu_q,cu_k,match", [
    ([0, 4, 8], None, "given together"),
    (torch.tensor([0, 4, 8]), torch.tensor([0, 4, 8]), "int32"),
    ([0, 6, 4, 8], [0, 2, 4, 8], "non-decreasing"),
    ([0, 4, 7], [0, 4, 8], "end at the packed length 8"),
    ([1, 4, 8], [0, 4, 8], "start at 0"),
    ([0, 4, 8], [0, 2, 4, 8], "same number of sequences"),
])
def test_bad_cu_seqlens(cu_q, cu_k, match):
    as_tensor = lambda c: c if isinstance(c, torch.Tensor) or c is None else torch.tensor(c, dtype=torch.int32)  # noqa
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=match):
        attnkit.flash_attention(q, k, v, cu_seqlens_q=as_tensor(cu_q), cu_seqlens_k=as_tensor(cu_k))


def test_cu_seqlens_need_batch_one():
    q, k, v = _qkv(B=2)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        attnkit.flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        attnkit.flash_attention(*_qkv(), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_autotuned_kernel_at_realistic_size_bf16(head_dim, causal):
    """Natively on a GPU: the autotuned configs compile and are right in bfloat16."""
    case = Case((2, 8, 2048, head_dim), (2, 2, 2048, head_dim), (2, 2, 2048, head_dim), {"causal": causal})
    report = check_case("flash", case, dtype=torch.bfloat16, device="cuda")
    assert report.ok, str(report)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (17, 17), (113, 203), (203, 113)])
def test_awkward_sequence_lengths(seqlen_q, seqlen_k):
    case = Case((1, 2, seqlen_q, 40), (1, 1, seqlen_k, 40), (1, 1, seqlen_k, 40), {"causal": True})
    report = check_case("flash", case, dtype=torch.float16, device=DEVICE)
    assert report.ok, str(report)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqlen_q=st.integers(1, 70), seqlen_k=st.integers(1, 70), head_dim=st.sampled_from([8, 24, 40, 64]),
       groups=st.sampled_from([1, 2, 4]), causal=st.booleans(), softcap=st.sampled_from([None, 2.5]))
def test_random_problems_match_the_reference(seqlen_q, seqlen_k, head_dim, groups, causal, softcap):
    options = {"causal": causal, "softcap": softcap}
    case = Case((1, 4, seqlen_q, head_dim), (1, 4 // groups, seqlen_k, head_dim),
                (1, 4 // groups, seqlen_k, head_dim), options)
    report = check_case("flash", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)
