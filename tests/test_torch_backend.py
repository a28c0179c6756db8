"""The "torch" backend (issue 16): every variant's torch implementation against its
reference (the contract test of the torch backend), the shared primitives of
attnkit.torch_backend, flash's fast paths, and dispatch: auto on CPU takes it."""

import math

import pytest
import torch

import attnkit
from attnkit.flash.reference import dense_attention
from attnkit.registry import Case, packed_offsets
from attnkit.testing import check_case
from attnkit.torch_backend import (
    add_sink_logits,
    blocked_attention,
    sdpa_with_lse,
    softcap_attention,
    softmax_with_lse,
)

TORCH_VARIANTS = [name for name in attnkit.list_variants() if attnkit.get_variant(name).torch_impl is not None]
CASES = [(name, case) for name in TORCH_VARIANTS for case in attnkit.get_variant(name).examples()]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
#: the extra cases below: float64 is the contract's (every example), these add sizes and options
FAST_DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


# ---------------------------------------------------------------- the contract


def test_flash_has_a_torch_implementation():
    assert "flash" in TORCH_VARIANTS and "flex" in TORCH_VARIANTS


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{c.id}" for n, c in CASES])
def test_torch_backend_matches_reference(name, case, dtype):
    report = check_case(name, case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)
    assert report.comparisons, "nothing was compared"


@pytest.mark.parametrize("name", TORCH_VARIANTS)
def test_auto_on_cpu_takes_torch_and_says_so(name):
    case = attnkit.get_variant(name).examples()[0]
    q, k, v, tensors = attnkit.testing.make_inputs(case)
    options = {**case.options, **case.tensor_options(tensors)}
    e = attnkit.explain(q.float(), k.float(), v.float(), name, **options)
    assert e.backend == "torch", str(e)
    assert any("torch backend" in r for r in e.reasons), str(e)
    assert "-> torch" in str(e)


def test_auto_on_cpu_runs_the_torch_implementation(monkeypatch):
    import attnkit.flash.reference
    import attnkit.flash.torch_backend

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa_with_lse(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("auto ran the reference on CPU")

    monkeypatch.setattr(attnkit.flash.torch_backend, "sdpa_with_lse", spy)
    monkeypatch.setattr(attnkit.flash.reference, "dense_attention", refuse)
    q = rand(1, 2, 9, 16, dtype=torch.float32)
    attnkit.flash_attention(q, q, q, causal=True)
    assert len(calls) == 1 and calls[0]["causal"] is True


def test_a_variant_without_torch_implementation_auto_reference_and_torch_refused():
    import dataclasses

    from attnkit.registry import register_variant, unregister_variant

    register_variant(dataclasses.replace(attnkit.get_variant("flash"), name="flash_without_torch", torch_impl=None))
    try:
        q = rand(1, 2, 9, 16, dtype=torch.float32)
        e = attnkit.explain(q, q, q, "flash_without_torch")
        assert e.backend == "reference" and not any("torch backend" in r for r in e.reasons), str(e)
        with pytest.raises(ValueError, match="has no torch implementation"):
            attnkit.attention(q, q, q, "flash_without_torch", "torch")
    finally:
        unregister_variant("flash_without_torch")


# ---------------------------------------------------------------- flash: awkward sizes and options


FLASH_CASES = [
    Case((1, 2, 1, 40), (1, 1, 1, 40), (1, 1, 1, 40), {"causal": True}, name="1x1"),
    Case((1, 2, 113, 40), (1, 1, 203, 40), (1, 1, 203, 40), {"causal": True}, name="113x203"),
    Case((1, 2, 203, 40), (1, 1, 113, 40), (1, 1, 113, 40), {"causal": True}, name="203x113"),
    Case((2, 4, 45, 40), (2, 2, 61, 40), (2, 2, 61, 24), {"causal": True, "softcap": 2.5}, name="softcap_gqa_dv"),
    Case((1, 4, 70, 24), (1, 2, 50, 24), (1, 2, 50, 40), {"causal": True},
         {"sink_logits": lambda g: torch.randn(4, generator=g, dtype=torch.float64)}, name="sink_nq>nk_dv>d"),
    Case((1, 4, 30, 16), (1, 1, 64, 16), (1, 1, 64, 16), {"causal": True},
         {"alibi_slopes": lambda g: torch.rand(4, generator=g, dtype=torch.float64)}, name="alibi_mqa"),
    Case((1, 2, 44, 32), (1, 2, 66, 32), (1, 2, 66, 32), {"causal": True},
         {"sink_logits": lambda g: torch.randn(2, generator=g, dtype=torch.float64),
          "cu_seqlens_q": packed_offsets(0, 17, 20, 7), "cu_seqlens_k": packed_offsets(9, 0, 30, 27)},
         name="varlen_empty_sequences_sink"),
]


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: c.id)
def test_flash_torch_awkward_sizes(case, dtype):
    report = check_case("flash", case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)


def test_flash_torch_score_mod_matches_reference():
    slopes = rand(2, dtype=torch.float32, seed=5).abs()
    mod = attnkit.mods.alibi(slopes)
    q, k, v = (rand(1, 2, 37, 16, dtype=torch.float32, seed=s) for s in range(3))
    got = attnkit.flash_attention(q, k, v, causal=True, score_mod=mod, return_lse=True, backend="torch")
    want = attnkit.flash_attention(q, k, v, causal=True, score_mod=mod, return_lse=True, backend="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_flash_torch_dropout_is_the_references_mask():
    q, k, v = (rand(1, 2, 33, 16, dtype=torch.float32, seed=s) for s in range(3))
    outs = []
    for backend in ("torch", "reference"):
        torch.manual_seed(3)
        outs.append(attnkit.flash_attention(q, k, v, causal=True, dropout_p=0.3, backend=backend))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_flash_torch_fully_masked_rows(softcap):
    # Nq > Nk with causal: the first Nq - Nk rows see no key at all.
    q, k, v = rand(1, 2, 40, 16, grad=True), rand(1, 2, 10, 16, seed=1, grad=True), rand(1, 2, 10, 16, seed=2, grad=True)
    out, lse = attnkit.flash_attention(q, k, v, causal=True, softcap=softcap, return_lse=True, backend="torch")
    assert torch.all(out[:, :, :30] == 0) and torch.all(torch.isneginf(lse[:, :, :30]))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :30] == 0)


# ---------------------------------------------------------------- the shared primitives


SHAPES = [  # Hq, Hkv, Nq, Nk, D, Dv
    (2, 2, 9, 9, 8, 8), (4, 2, 5, 13, 8, 6), (2, 1, 13, 5, 6, 8), (2, 2, 1, 7, 8, 8), (4, 1, 16, 16, 8, 8),
]


def _loss(out, lse, w_out, w_lse):
    return (out * w_out).sum() + (lse.masked_fill(torch.isinf(lse), 0) * w_lse).sum()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sdpa_with_lse_and_blocked_match_the_reference_with_lse_gradients(shape, causal):
    # the harness differentiates the output only: the LSE's gradient is checked here
    Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = rand(1, Hq, Nq, D, grad=True), rand(1, Hkv, Nk, D, seed=1, grad=True), rand(1, Hkv, Nk, Dv, seed=2,
                                                                                           grad=True)
    sink = rand(Hq, seed=3, grad=True)
    w_out, w_lse = rand(1, Hq, Nq, Dv, seed=4), rand(1, Hq, Nq, seed=5)
    want = dense_attention(q, k, v, causal=causal, sm_scale=0.3, sink_logits=sink)
    want_grads = torch.autograd.grad(_loss(*want, w_out, w_lse), (q, k, v, sink))
    fused = add_sink_logits(*sdpa_with_lse(q, k, v, causal=causal, scale=0.3), sink)
    blocked = blocked_attention(q, k, v, scale=0.3, causal=causal, sink_logits=sink, rows=4)
    for got in (fused, blocked):
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(_loss(*got, w_out, w_lse), (q, k, v, sink))
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("softcap", [3.0, 80.0], ids=["softcap3", "softcap80_row_max"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softcap_attention_matches_the_reference_with_lse_gradients(shape, causal, softcap):
    Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = rand(1, Hq, Nq, D, grad=True), rand(1, Hkv, Nk, D, seed=1, grad=True), rand(1, Hkv, Nk, Dv, seed=2,
                                                                                           grad=True)
    w_out, w_lse = rand(1, Hq, Nq, Dv, seed=4), rand(1, Hq, Nq, seed=5)
    want = dense_attention(q, k, v, causal=causal, sm_scale=0.7, softcap=softcap)
    want_grads = torch.autograd.grad(_loss(*want, w_out, w_lse), (q, k, v))
    got = softcap_attention(q, k, v, scale=0.7, softcap=softcap, causal=causal)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(_loss(*got, w_out, w_lse), (q, k, v)), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_flash_torch_softcap_float16():
    case = Case((1, 4, 45, 32), (1, 2, 61, 32), (1, 2, 61, 32), {"causal": True, "softcap": 20.0}, name="fp16")
    report = check_case("flash", case, dtype=torch.float16, device="cpu", backend="torch")
    assert report.ok, str(report)


def test_sdpa_with_lse_empty_problems_keep_the_graph():
    q = rand(1, 2, 4, 8, grad=True)
    out, lse = sdpa_with_lse(q, rand(1, 2, 0, 8), rand(1, 2, 0, 8))
    assert out.shape == (1, 2, 4, 8) and torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    assert torch.all(q.grad == 0)
    out, lse = sdpa_with_lse(rand(1, 2, 0, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8), causal=True)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


def test_sdpa_with_lse_dtypes():
    for dtype, lse_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float64, torch.float64)):
        q = rand(1, 2, 6, 8, dtype=dtype)
        out, lse = sdpa_with_lse(q, q, q, causal=True)
        assert out.dtype == dtype and lse.dtype == lse_dtype


def test_softmax_with_lse_dead_rows():
    s = rand(3, 5, grad=True)
    s2 = s.masked_fill(torch.tensor([[False], [True], [False]]), -math.inf)
    p, lse = softmax_with_lse(s2)
    assert torch.all(p[1] == 0) and torch.isneginf(lse[1])
    torch.testing.assert_close(lse[[0, 2]], torch.logsumexp(s2[[0, 2]], -1))
    torch.testing.assert_close(p[[0, 2]], torch.softmax(s2[[0, 2]], -1))
    (p.sum() + lse[[0, 2]].sum()).backward()
    assert torch.isfinite(s.grad).all() and torch.all(s.grad[1] == 0)


# ---------------------------------------------------------------- flex


def _flex_cases():
    from attnkit import mods

    docs = lambda g: torch.repeat_interleave(torch.arange(3), torch.tensor([30, 50, 20]))
    return [
        Case((1, 2, 100, 16), (1, 1, 100, 16), (1, 1, 100, 16), build=lambda t: {"mask_mod": mods.sliding_window(9)},
             name="sliding_window_mask_mqa"),
        Case((1, 2, 100, 16), (1, 2, 100, 16), (1, 2, 100, 16), tensors={"docs": docs},
             build=lambda t: {"mask_mod": mods.and_masks(mods.causal(), mods.document(t["docs"]))},
             name="document_causal"),
        Case((1, 2, 50, 16), (1, 2, 20, 16), (1, 2, 20, 16), {"softcap": 3.0},
             build=lambda t: {"mask_mod": mods.causal()}, name="causal_nq>nk_empty_rows_softcap"),
        Case((1, 2, 37, 16), (1, 2, 37, 16), (1, 2, 37, 24), name="no_mods_dv24"),
        Case((1, 4, 37, 16), (1, 2, 45, 16), (1, 2, 45, 16), {"softcap": 2.0}, name="softcap_only_gqa"),
    ]


@pytest.mark.parametrize("dtype", FAST_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", _flex_cases(), ids=lambda c: c.id)
def test_flex_torch_masks(case, dtype):
    report = check_case("flex", case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)


def test_flex_torch_scores_only_the_keys_the_mask_keeps(monkeypatch):
    # a sliding window of 8 keys over 256: each query chunk scores its window's span, not all keys
    import attnkit.torch_backend as tb

    scored = []
    real = tb.grouped_scores

    def counting(q, k):
        scored.append(q.shape[2] * k.shape[2])
        return real(q, k)

    monkeypatch.setattr(tb, "grouped_scores", counting)
    q, k, v = (rand(1, 2, 256, 16, dtype=torch.float32, seed=s) for s in range(3))
    mask = attnkit.mods.sliding_window(7)
    got = blocked_attention(q, k, v, scale=0.25, mask_mod=mask.specialize(attnkit.mods.Problem.of("flex", q, k)),
                            rows=32)
    want = attnkit.flex_attention(q, k, v, mask_mod=mask, scale=0.25, return_lse=True, backend="reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert sum(scored) <= 256 * (32 + 8)  # every chunk: 32 rows x at most 32 + 7 keys


# ---------------------------------------------------------------- Hugging Face on CPU


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
def test_hf_llama_on_cpu_runs_the_torch_backend(monkeypatch, padded):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (attnkit[hf])")
    import attnkit.flash.reference
    import attnkit.flash.torch_backend
    import attnkit.integrations.transformers as hf

    hf.register()
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(0, 97, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 14, dtype=torch.long)
    if padded:
        mask[1, :5] = 0  # left padding: the packed varlen path
    logits = {}
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return sdpa_with_lse(*args, **kwargs)

    for impl in ("sdpa", "attnkit"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
        if impl == "attnkit":

            def refuse(*args, **kwargs):
                raise AssertionError("auto ran the reference on CPU")

            monkeypatch.setattr(attnkit.flash.torch_backend, "sdpa_with_lse", spy)
            monkeypatch.setattr(attnkit.flash.reference, "dense_attention", refuse)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    assert calls, "the torch backend did not run"
    keep = mask.bool()
    torch.testing.assert_close(logits["attnkit"][keep], logits["sdpa"][keep], rtol=1e-4, atol=1e-4)


def test_sdpa_with_lse_expands_kv_heads_where_the_cpu_kernel_lacks_gqa(monkeypatch):
    import attnkit.torch_backend as tb

    q, k, v = rand(1, 4, 9, 8, grad=True), rand(1, 2, 13, 8, seed=1, grad=True), rand(1, 2, 13, 8, seed=2, grad=True)
    want = dense_attention(q, k, v, causal=True, sm_scale=0.3)
    monkeypatch.setattr(tb, "_CPU_FLASH_GQA", False)
    got = sdpa_with_lse(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got[0].sum(), (k, v))
    for a, b in zip(grads, torch.autograd.grad(want[0].sum(), (k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_softmax_with_lse_gradient_is_p_in_bfloat16():
    """The LSE's gradient is the softmax itself: on flat bfloat16 rows, differentiating
    lse = m - log(max p) in the input dtype cancelled to ~10% errors."""
    from attnkit.torch_backend import softmax_with_lse

    torch.manual_seed(0)
    s = (0.01 * torch.randn(4, 64, dtype=torch.float64)).requires_grad_()
    g = torch.randn(4, dtype=torch.float64)
    want = torch.autograd.grad((torch.logsumexp(s, -1) * g).sum(), s)[0]
    sb = s.detach().bfloat16().requires_grad_()
    _, lse = softmax_with_lse(sb)
    got = torch.autograd.grad((lse * g.bfloat16()).sum(), sb)[0].double()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
