"""layout="bshd" on every functional op (issue 14, item 5) and attnkit.compat.flash_attn (item 4).

layout="bshd" must equal transposing (B, N, H, D) tensors to (B, H, N, D), running the op, and
transposing the output back, forward and backward, on both backends; the kernels must read the
(B, H, N, D) views through their strides (no copy of q, k, v).
"""

import pytest
import torch
from conftest import DEVICE

import attnkit
from attnkit.block_sparse.variant import _random_mask
from attnkit.compat import flash_attn as fa

BACKENDS = ["reference", "triton"]


def rand(*shape, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    return x.requires_grad_(grad)


def t12(x):
    return x.transpose(1, 2)


# ---------------------------------------------------------------- layout="bshd" == transpose + "bhsd"

def _slopes(heads):
    return attnkit.mods.alibi_slopes(heads).to(DEVICE)


# (name, op, q shape in bshd, k/v shape in bshd, options); every op of the library that takes q, k, v
LAYOUT_CASES = [
    ("flash", attnkit.flash_attention, (1, 37, 4, 32), (1, 45, 2, 32),
     {"causal": True, "alibi_slopes": "slopes4", "return_lse": True}),
    ("sliding_window", attnkit.sliding_window_attention, (2, 40, 2, 16), (2, 40, 1, 16),
     {"window": (8, 2), "sinks": 2, "return_lse": True}),
    ("block_sparse", attnkit.block_sparse_attention, (1, 70, 2, 16), (1, 90, 1, 16),
     {"block_mask": "mask", "causal": True, "return_lse": True}),
    ("moba", attnkit.moba_attention, (1, 64, 2, 16), (1, 64, 2, 16), {"block_size": 16, "top_k": 2, "return_lse": True}),
    ("linear", attnkit.linear_attention, (1, 40, 2, 16), (1, 40, 1, 16), {"decay": "decay2", "return_state": True}),
    ("lightning", attnkit.lightning_attention, (1, 40, 2, 16), (1, 40, 2, 16), {"slopes": "decay2",
                                                                                  "return_state": True}),
    ("flex", attnkit.flex_attention, (1, 33, 2, 16), (1, 33, 2, 16), {"mask_mod": "causal", "return_lse": True}),
    ("neighborhood", attnkit.neighborhood_attention, (1, 45, 2, 16), (1, 45, 2, 16), {"kernel_size": 7}),
]


def _options(options):
    resolved = {}
    for name, value in options.items():
        if value == "slopes4":
            value = _slopes(4)
        elif value == "mask":
            value = _random_mask(1, 1, 70, 90, (32, 16), 0.6, seed=2)
            if DEVICE != "cpu":
                value = value.to(DEVICE)
        elif value == "decay2":
            value = torch.tensor([0.1, 0.3], device=DEVICE)
        elif value == "causal":
            value = attnkit.mods.causal()
        resolved[name] = value
    return resolved


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,op,q_shape,kv_shape,options", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_bshd_equals_transposed_bhsd(name, op, q_shape, kv_shape, options, backend):
    options = _options(options)
    q, k, v = rand(*q_shape, seed=1, grad=True), rand(*kv_shape, seed=2, grad=True), rand(*kv_shape, seed=3,
                                                                                          grad=True)
    ours = _outputs(op(q, k, v, backend=backend, layout="bshd", **options))
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    theirs = _outputs(op(t12(q2), t12(k2), t12(v2), backend=backend, **options))
    assert ours[0].shape == q_shape[:-1] + (kv_shape[-1],)
    torch.testing.assert_close(ours[0], t12(theirs[0]))
    for a, b in zip(ours[1:], theirs[1:]):  # LSE (B, H, N) and states keep their head-major shapes
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    grad = rand(*ours[0].shape, seed=4)
    ours[0].backward(grad)
    theirs[0].backward(t12(grad))
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_neighborhood_2d_bshd_is_heads_second_to_last():
    q, k, v = rand(1, 9, 11, 2, 16, seed=1), rand(1, 9, 11, 2, 16, seed=2), rand(1, 9, 11, 2, 16, seed=3)
    ours = attnkit.neighborhood_attention(q, k, v, kernel_size=(5, 3), layout="bshd")
    heads = [x.movedim(-2, 1) for x in (q, k, v)]
    torch.testing.assert_close(ours, attnkit.neighborhood_attention(*heads, kernel_size=(5, 3)).movedim(1, -2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_decode_bshd_equals_transposed_bhsd(backend, paged):
    q = rand(2, 2, 4, 16, seed=1)                                   # (B, Nq, Hq, D)
    lengths = torch.tensor([20, 37], dtype=torch.int32, device=DEVICE)
    if paged:
        cache_k, cache_v = rand(6, 16, 2, 16, seed=2), rand(6, 16, 2, 16, seed=3)   # (pages, page_size, Hkv, D)
        table = torch.tensor([[4, 0, 5], [1, 3, 2]], dtype=torch.int32, device=DEVICE)
        extra = {"block_table": table}
    else:
        cache_k, cache_v = rand(2, 40, 2, 16, seed=2), rand(2, 40, 2, 16, seed=3)   # (B, Nmax, Hkv, D)
        extra = {}
    out, lse = attnkit.decode_attention(q, cache_k, cache_v, lengths, backend=backend, layout="bshd",
                                        return_lse=True, **extra)
    ref, ref_lse = attnkit.decode_attention(t12(q), t12(cache_k), t12(cache_v), lengths, backend=backend,
                                            return_lse=True, **extra)
    torch.testing.assert_close(out, t12(ref))
    torch.testing.assert_close(lse, ref_lse)


def test_attention_explain_and_check_call_take_layout():
    q, k, v = rand(1, 20, 4, 16, seed=1), rand(1, 24, 2, 16, seed=2), rand(1, 24, 2, 16, seed=3)
    out = attnkit.attention(q, k, v, "flash", layout="bshd", causal=True)
    torch.testing.assert_close(out, t12(attnkit.attention(t12(q), t12(k), t12(v), "flash", causal=True)))
    assert attnkit.explain(q, k, v, "flash", layout="bshd").backend == ("triton" if DEVICE == "cuda" else "torch")
    attnkit.dispatch.check_call(q, k, v, "flash", layout="bshd")
    # the same tensors read as "bhsd" are a different problem: 20 heads vs 24 kv heads is refused
    with pytest.raises(ValueError):
        attnkit.dispatch.check_call(q, k, v, "flash")


@pytest.mark.parametrize("name,op,q_shape,kv_shape,options", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
@pytest.mark.parametrize("layout", ["BSHD", "bsh", "thd", None, 1])
def test_unknown_layout_is_a_value_error_naming_it(name, op, q_shape, kv_shape, options, layout):
    q, k, v = rand(*q_shape), rand(*kv_shape), rand(*kv_shape)
    with pytest.raises(ValueError, match=r"layout must be one of \('bhsd', 'bshd'\).*got " + repr(layout)):
        op(q, k, v, layout=layout, **_options(options))


def test_unknown_layout_on_decode_attention_explain_and_check_call():
    q, cache = rand(1, 1, 2, 16), rand(1, 8, 2, 16)
    for call in (lambda: attnkit.decode_attention(q, cache, cache, layout="bsdh"),
                 lambda: attnkit.attention(q, cache, cache, "flash", layout="bsdh"),
                 lambda: attnkit.explain(q, cache, cache, "flash", layout="bsdh"),
                 lambda: attnkit.dispatch.check_call(q, cache, cache, "flash", layout="bsdh")):
        with pytest.raises(ValueError, match="layout must be one of .*'bsdh'"):
            call()


def test_bshd_shape_errors_say_they_speak_of_the_views():
    q, k = rand(1, 20, 4, 16), rand(1, 24, 2, 8)
    with pytest.raises(ValueError, match=r"head dim.*layout='bshd': shapes in this message are the \(B, H, N, D\) "
                                         r"views"):
        attnkit.flash_attention(q, k, k, layout="bshd")


# ---------------------------------------------------------------- no copy: the kernels read the views' strides

class _Spy:
    """Wraps a launcher or a Triton kernel (``kernel[grid](...)``) and records its first three arguments."""

    def __init__(self, target, indexed=False):
        self.target, self.indexed, self.seen = target, indexed, []

    def _record(self, args):
        self.seen.append([(a.data_ptr(), a.stride()) for a in args[:3]])

    def __call__(self, *args, **kwargs):
        self._record(args)
        return self.target(*args, **kwargs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._record(args)
            return self.target[grid](*args, **kwargs)

        return launch


def _views(*tensors):
    return [(x.data_ptr(), t12(x).stride()) for x in tensors]


@pytest.mark.parametrize("name,op,q_shape,kv_shape,options",
                         [c for c in LAYOUT_CASES if c[0] not in ("neighborhood", "linear", "lightning")],
                         ids=[c[0] for c in LAYOUT_CASES if c[0] not in ("neighborhood", "linear", "lightning")])
def test_fused_engine_reads_bshd_without_a_copy(monkeypatch, name, op, q_shape, kv_shape, options):
    from attnkit.kernels import engine

    spy = _Spy(engine.attention_forward)
    monkeypatch.setattr(engine, "attention_forward", spy)
    q, k, v = rand(*q_shape, seed=1), rand(*kv_shape, seed=2), rand(*kv_shape, seed=3)
    op(q, k, v, backend="triton", layout="bshd", **_options(options))
    assert spy.seen and all(seen == _views(q, k, v) for seen in spy.seen)


@pytest.mark.parametrize("op,options", [(attnkit.linear_attention, {"decay": "decay2"}),
                                        (attnkit.lightning_attention, {"slopes": "decay2"})])
def test_linear_engine_reads_bshd_without_a_copy(monkeypatch, op, options):
    from attnkit.kernels import linear

    spy = _Spy(linear.linear_forward)
    monkeypatch.setattr(linear, "linear_forward", spy)
    q, k, v = rand(1, 40, 2, 16, seed=1), rand(1, 40, 2, 16, seed=2), rand(1, 40, 2, 16, seed=3)
    op(q, k, v, backend="triton", layout="bshd", **_options(options))
    assert spy.seen == [_views(q, k, v)]


def test_decode_kernel_reads_bshd_caches_without_a_copy(monkeypatch):
    from attnkit.kernels import decode

    spy = _Spy(decode.decode_split_kernel, indexed=True)
    monkeypatch.setattr(decode, "decode_split_kernel", spy)
    q, cache_k, cache_v = rand(2, 1, 4, 16, seed=1), rand(2, 40, 2, 16, seed=2), rand(2, 40, 2, 16, seed=3)
    lengths = torch.tensor([20, 37], dtype=torch.int32, device=DEVICE)
    attnkit.decode_attention(q, cache_k, cache_v, lengths, backend="triton", layout="bshd")
    assert spy.seen == [_views(q, cache_k, cache_v)]


# ================================================================ attnkit.compat.flash_attn (item 4)

INF = float("inf")


def flash_attn_semantics(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None):
    """flash-attn's documented semantics restated densely, in float64 (tests only).

    q (B, Sq, H, D), k/v (B, Sk, Hk, D). Query i sits at key position i + Sk - Sq and sees keys in
    [pos - left, pos + right] (-1 = unbounded; causal sets right = 0; flash_api.cpp treats an
    extent >= Sk as unbounded). Scores: scale, softcap, then -slope * |pos - j|. A row that sees
    no key: out 0, LSE +inf. Returns out (B, Sq, H, Dv), lse (B, H, Sq).
    """
    q, k, v = q.double(), k.double(), v.double()
    _B, Sq, H, D = q.shape
    Sk = k.shape[1]
    k, v = (x.repeat_interleave(H // x.shape[2], dim=2) for x in (k, v))
    left, right = window_size
    if causal:
        right = 0
    left, right = (-1 if left >= Sk else left), (-1 if right >= Sk else right)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (softmax_scale if softmax_scale is not None else D ** -0.5)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Sq, device=q.device)[:, None] + Sk - Sq
    j = torch.arange(Sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(-1, H)[:, :, None, None]    # (1 or B, H, 1, 1)
        s = s - slopes * (pos - j).abs()
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    s = s.masked_fill(~visible, -INF)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.masked_fill(lse == -INF, INF)


WINDOWS = [(-1, -1), (5, 3), (7, 0), (-1, 4), (3, -1), (0, 0)]


@pytest.mark.parametrize("window_size", WINDOWS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(13, 29), (29, 13)])
def test_flash_attn_func_matches_flash_attn_semantics(window_size, causal, sq, sk):
    q, k, v = rand(2, sq, 4, 16, seed=1), rand(2, sk, 2, 16, seed=2), rand(2, sk, 2, 16, seed=3)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size, return_attn_probs=True)
    ref_out, ref_lse = flash_attn_semantics(q, k, v, causal=causal, window_size=window_size)
    assert out.shape == (2, sq, 4, 16) and lse.shape == (2, 4, sq) and probs is None
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window_size", [(-1, -1), (6, 2), (-1, 0)])
def test_flash_attn_func_softcap_alibi_scale(window_size):
    q, k, v = rand(2, 21, 4, 16, seed=1), rand(2, 30, 4, 16, seed=2), rand(2, 30, 4, 16, seed=3)
    for slopes in (_slopes(4), _slopes(4)[None].repeat(2, 1) * torch.tensor([[1.0], [0.5]], device=DEVICE)):
        out = fa.flash_attn_func(q, k, v, softmax_scale=0.3, window_size=window_size, softcap=2.0,
                                 alibi_slopes=slopes)
        ref, _ = flash_attn_semantics(q, k, v, softmax_scale=0.3, window_size=window_size, softcap=2.0,
                                      alibi_slopes=slopes)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_flash_attn_func_is_the_native_call():
    q, k, v = rand(1, 20, 4, 16, seed=1), rand(1, 26, 2, 16, seed=2), rand(1, 26, 2, 16, seed=3)
    slopes = _slopes(4)
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0),
                               attnkit.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, softcap=3.0,
                                                       layout="bshd"), rtol=0, atol=0)
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, window_size=(4, 1)),
                               attnkit.sliding_window_attention(q, k, v, window=(4, 1), layout="bshd"),
                               rtol=0, atol=0)
    ours = fa.flash_attn_func(q, k, v, causal=True, window_size=(4, 9), alibi_slopes=slopes)
    native = attnkit.sliding_window_attention(q, k, v, window=(4, 0), score_mod=attnkit.mods.alibi(slopes),
                                              layout="bshd")
    torch.testing.assert_close(ours, native, rtol=0, atol=0)


def test_flash_attn_func_gradients_match_the_semantics():
    q, k, v = (rand(2, n, h, 16, seed=s, grad=True) for n, h, s in ((17, 4, 1), (23, 2, 2), (23, 2, 3)))
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), softcap=2.5)
    grad = rand(*out.shape, seed=4)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    ref, _ = flash_attn_semantics(q, k, v, causal=True, window_size=(6, -1), softcap=2.5)
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compat_runs_the_kernels_when_asked(monkeypatch):
    monkeypatch.setattr(fa, "backend", "triton")
    q, k, v = rand(1, 33, 4, 16, seed=1), rand(1, 40, 2, 16, seed=2), rand(1, 40, 2, 16, seed=3)
    for window in ((-1, 0), (6, 2)):
        out, lse, _ = fa.flash_attn_func(q, k, v, window_size=window, return_attn_probs=True)
        ref_out, ref_lse = flash_attn_semantics(q, k, v, window_size=window)
        torch.testing.assert_close(out.double(), ref_out, rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-4, atol=2e-4)


def test_packed_forms_equal_flash_attn_func_and_backpropagate_into_the_pack():
    qkv = rand(2, 19, 3, 4, 16, seed=1, grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(5, 0))
    q, k, v = (x.detach().requires_grad_() for x in qkv.unbind(2))
    ref = fa.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = rand(*out.shape, seed=2)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))

    q, kv = rand(2, 7, 4, 16, seed=3, grad=True), rand(2, 25, 2, 2, 16, seed=4, grad=True)
    out = fa.flash_attn_kvpacked_func(q, kv, causal=True, softcap=4.0)
    torch.testing.assert_close(out, fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True, softcap=4.0))
    out.sum().backward()
    assert kv.grad.shape == kv.shape and bool(kv.grad.abs().sum() > 0)


def _cu(*lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("window_size,causal", [((-1, -1), False), ((-1, -1), True), ((4, 2), False),
                                                ((6, 5), True)])
def test_varlen_equals_sequences_one_by_one(window_size, causal):
    lens_q, lens_k = (1, 17, 0, 30), (5, 17, 3, 22)     # sequence 0 and 3 have Sq != Sk (bottom-right per sequence)
    cu_q, cu_k = _cu(*lens_q), _cu(*lens_k)
    q, k, v = rand(sum(lens_q), 4, 16, seed=1, grad=True), rand(sum(lens_k), 2, 16, seed=2, grad=True), \
        rand(sum(lens_k), 2, 16, seed=3, grad=True)
    slopes = _slopes(4)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                            window_size=window_size, alibi_slopes=slopes, return_attn_probs=True)
    assert out.shape == (sum(lens_q), 4, 16) and lse.shape == (4, sum(lens_q))
    grad = rand(*out.shape, seed=4)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    for s in range(len(lens_q)):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        ref_out, ref_lse = flash_attn_semantics(q[None, qs], k[None, ks], v[None, ks], causal=causal,
                                                window_size=window_size, alibi_slopes=slopes)
        torch.testing.assert_close(out[qs].double(), ref_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[:, qs].double(), ref_lse[0], rtol=1e-5, atol=1e-5)
        ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad[None, qs].double(), allow_unused=True)
        for g, rg, sl in zip(grads, ref_grads, (qs, ks, ks)):
            torch.testing.assert_close(g[sl], rg[sl], rtol=1e-5, atol=1e-5)


def test_varlen_packed_forms():
    cu = _cu(5, 0, 14)
    qkv = rand(19, 3, 2, 16, seed=1)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 14, causal=True),
                               fa.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, 14, 14, causal=True))
    q, kv = rand(19, 4, 16, seed=2), rand(30, 2, 2, 16, seed=3)
    cu_k = _cu(10, 10, 10)
    torch.testing.assert_close(fa.flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 14, 10, window_size=(2, 2)),
                               fa.flash_attn_varlen_func(q, *kv.unbind(1), cu, cu_k, 14, 10, window_size=(2, 2)))


def test_empty_rows_give_zero_and_plus_inf_lse_as_flash_attn():
    q, k, v = rand(1, 9, 2, 16, seed=1), rand(1, 4, 2, 16, seed=2), rand(1, 4, 2, 16, seed=3)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert bool((out[:, :5] == 0).all()) and bool((lse[:, :, :5] == INF).all())
    assert bool(torch.isfinite(lse[:, :, 5:]).all())


def test_dropout_passes_through_to_the_op_with_the_same_seed():
    q, k, v = rand(1, 20, 2, 16, seed=1), rand(1, 20, 2, 16, seed=2), rand(1, 20, 2, 16, seed=3)
    for window, native in (((-1, 0), lambda: attnkit.flash_attention(q, k, v, causal=True, dropout_p=0.3,
                                                                      layout="bshd")),
                           ((5, 0), lambda: attnkit.sliding_window_attention(q, k, v, window=(5, 0), dropout_p=0.3,
                                                                             layout="bshd"))):
        torch.manual_seed(7)
        ours = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, window_size=window)
        torch.manual_seed(7)
        torch.testing.assert_close(ours, native(), rtol=0, atol=0)
        assert not torch.allclose(ours, fa.flash_attn_func(q, k, v, causal=True, window_size=window))


def test_dropout_without_an_op_that_has_it_is_not_implemented(monkeypatch):
    q = rand(1, 8, 2, 16)

    def no_dropout(q, k, v, *, causal=False, scale=None, softcap=None, alibi_slopes=None, return_lse=False,
                   layout="bhsd", backend="auto"):
        raise AssertionError("must not run")

    monkeypatch.setattr(fa, "flash_attention", no_dropout)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        fa.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(AssertionError):  # dropout_p = 0 is no dropout: the op runs
        fa.flash_attn_func(q, q, q, dropout_p=0.0)


def test_return_attn_probs_with_dropout_is_not_implemented():
    q = rand(1, 8, 2, 16)
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        fa.flash_attn_func(q, q, q, dropout_p=0.2, return_attn_probs=True)


@pytest.mark.parametrize("call,error,match", [
    (lambda q: fa.flash_attn_func(q, q, q, window_size=(-2, 0)), ValueError, r"window_size\[0\]"),
    (lambda q: fa.flash_attn_func(q, q, q, window_size=4), ValueError, "window_size must be a pair"),
    (lambda q: fa.flash_attn_func(q, q, q, window_size=(1.5, 0)), TypeError, r"window_size\[0\]"),
    (lambda q: fa.flash_attn_func(q, q, q, softcap="big"), TypeError, "softcap"),
    (lambda q: fa.flash_attn_func(q, q, q, causal=1), TypeError, "causal"),
    (lambda q: fa.flash_attn_func(q, q, q, deterministic=None), TypeError, "deterministic"),
    (lambda q: fa.flash_attn_func(q, q, q, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q: fa.flash_attn_qkvpacked_func(q), ValueError, "qkv must have shape"),
    (lambda q: fa.flash_attn_qkvpacked_func(torch.stack([q, q], dim=2)), ValueError, "qkv must have shape"),
    (lambda q: fa.flash_attn_kvpacked_func(q, q), ValueError, "kv must have shape"),
    (lambda q: fa.flash_attn_varlen_func(q, q, q, _cu(8), _cu(8), 8, 8), ValueError,
     r"q must have shape \(total, nheads, headdim\)"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], _cu(8), _cu(8), 8, 8, block_table=_cu(8)),
     NotImplementedError, "block_table"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], _cu(8).long(), _cu(8), 8, 8), TypeError,
     "cu_seqlens_q must have dtype torch.int32"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], _cu(3, 4), _cu(8), 8, 8), ValueError, "cu_seqlens"),
])
def test_bad_compat_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(rand(1, 8, 2, 16))


# ---------------------------------------------------------------- flash_attn_with_kvcache

def _kvcache_semantics(q, k_cache, v_cache, lengths, **kwargs):
    """Each sequence's q over its first lengths[b] cached keys, flash-attn's semantics."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        out, lse = flash_attn_semantics(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], **kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_appends_in_place_and_attends(monkeypatch, backend):
    monkeypatch.setattr(fa, "backend", backend)
    k_cache, v_cache = rand(2, 48, 2, 16, seed=1), rand(2, 48, 2, 16, seed=2)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    lengths = torch.tensor([10, 37], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(2, 3, 4, 16, seed=3), rand(2, 3, 2, 16, seed=4), rand(2, 3, 2, 16, seed=5)
    slopes = _slopes(4)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, causal=True,
                                          window_size=(8, 0), softcap=3.0, alibi_slopes=slopes,
                                          return_softmax_lse=True)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, n in enumerate(lengths.tolist()):
        expected_k[b, n:n + 3], expected_v[b, n:n + 3] = k[b], v[b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    ref_out, ref_lse = _kvcache_semantics(q, expected_k, expected_v, lengths + 3, causal=True, window_size=(8, 0),
                                          softcap=3.0, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=2e-4, atol=2e-4)


def test_kvcache_without_new_tokens_is_decode_attention():
    k_cache, v_cache = rand(2, 40, 2, 16, seed=1), rand(2, 40, 2, 16, seed=2)
    q = rand(2, 1, 4, 16, seed=3)
    lengths = torch.tensor([20, 40], dtype=torch.int32, device=DEVICE)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths)   # causal=False, one query
    torch.testing.assert_close(out, attnkit.decode_attention(q, k_cache, v_cache, lengths, layout="bshd"),
                               rtol=0, atol=0)
    ref, _ = _kvcache_semantics(q, k_cache, v_cache, lengths)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    full = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=40)     # an int length
    torch.testing.assert_close(full, fa.flash_attn_with_kvcache(q, k_cache, v_cache))


def test_kvcache_paged_append():
    pages_k, pages_v = rand(6, 16, 2, 16, seed=1), rand(6, 16, 2, 16, seed=2)
    table = torch.tensor([[4, 0, 5], [1, 3, 2]], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([15, 30], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(2, 2, 4, 16, seed=3), rand(2, 2, 2, 16, seed=4), rand(2, 2, 2, 16, seed=5)
    out = fa.flash_attn_with_kvcache(q, pages_k, pages_v, k, v, cache_seqlens=lengths, block_table=table,
                                     causal=True)
    # the same sequences laid out contiguously
    flat_k = pages_k[table.long()].reshape(2, 48, 2, 16)
    flat_v = pages_v[table.long()].reshape(2, 48, 2, 16)
    for b, n in enumerate(lengths.tolist()):       # sequence 0's new tokens straddle its pages 0 -> 1
        torch.testing.assert_close(flat_k[b, n:n + 2], k[b], rtol=0, atol=0)
        torch.testing.assert_close(flat_v[b, n:n + 2], v[b], rtol=0, atol=0)
    ref, _ = _kvcache_semantics(q, flat_k, flat_v, lengths + 2, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("viewable", [True, False])
def test_kvcache_batch_idx_reads_and_writes_the_chosen_rows(viewable):
    k_cache, v_cache = rand(4, 32, 2, 16, seed=1), rand(4, 32, 2, 16, seed=2)
    if not viewable:  # rows that are not one after another in memory: read by a gather
        k_cache = rand(32, 4, 2, 16, seed=1).transpose(0, 1)
        v_cache = rand(32, 4, 2, 16, seed=2).transpose(0, 1)
    idx = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([7, 20], dtype=torch.int32, device=DEVICE)
    q, k, v = rand(2, 1, 4, 16, seed=3), rand(2, 1, 2, 16, seed=4), rand(2, 1, 2, 16, seed=5)
    before = k_cache.clone()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths, cache_batch_idx=idx)
    assert torch.equal(k_cache[3, 7], k[0, 0]) and torch.equal(k_cache[1, 20], k[1, 0])
    untouched = torch.ones(4, 32, dtype=torch.bool, device=DEVICE)
    untouched[3, 7] = untouched[1, 20] = False
    assert torch.equal(k_cache[untouched], before[untouched])
    ref, _ = _kvcache_semantics(q, k_cache[idx.long()], v_cache[idx.long()], lengths + 1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding restated with complex numbers: pairs (x_a, x_b) turn by e^{i theta}."""
    half = cos.shape[-1]
    theta = torch.atan2(sin, cos)[positions].double()[:, :, None]          # (B, S, 1, half)
    x = x.double()
    if interleaved:
        pairs = torch.complex(x[..., 0:2 * half:2], x[..., 1:2 * half:2]) * torch.exp(1j * theta)
        turned = torch.stack([pairs.real, pairs.imag], dim=-1).flatten(-2)
    else:
        pairs = torch.complex(x[..., :half], x[..., half:2 * half]) * torch.exp(1j * theta)
        turned = torch.cat([pairs.real, pairs.imag], dim=-1)
    return torch.cat([turned, x[..., 2 * half:]], dim=-1)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary(interleaved, causal):
    k_cache, v_cache = rand(2, 40, 2, 16, seed=1), rand(2, 40, 2, 16, seed=2)
    lengths = torch.tensor([5, 30], dtype=torch.int32, device=DEVICE)
    seqlen_q = 2 if causal else 1
    q, k, v = rand(2, seqlen_q, 4, 16, seed=3), rand(2, seqlen_q, 2, 16, seed=4), rand(2, seqlen_q, 2, 16, seed=5)
    angles = torch.arange(64, device=DEVICE, dtype=torch.float32)[:, None] * torch.tensor(
        [0.3, 0.05, 0.01, 0.002, 0.0005, 0.0001], device=DEVICE)             # rotary_dim 12 < headdim 16
    cos, sin = angles.cos(), angles.sin()
    old_k = k_cache.clone()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                     cache_seqlens=lengths, causal=causal, rotary_interleaved=interleaved)
    positions = lengths.long()[:, None] + torch.arange(seqlen_q, device=DEVICE)
    k_rot = _rotate(k, cos, sin, positions, interleaved)
    q_rot = _rotate(q, cos, sin, positions if causal else lengths.long()[:, None].expand(2, seqlen_q), interleaved)
    expected = old_k.double()
    for b, n in enumerate(lengths.tolist()):
        expected[b, n:n + seqlen_q] = k_rot[b]
    torch.testing.assert_close(k_cache.double(), expected, rtol=1e-6, atol=1e-6)
    ref, _ = _kvcache_semantics(q_rot, k_cache, v_cache, lengths + seqlen_q, causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"cache_leftpad": "k"}, NotImplementedError, "cache_leftpad"),
    ({"k": "k"}, ValueError, "k and v must be given together"),
    ({"rotary_cos": "cos", "rotary_sin": "cos"}, ValueError, "pass k and v"),
    ({"k": "k", "v": "v"}, ValueError, "cache_seqlens is required"),
    ({"k": "k", "v": "v", "cache_seqlens": 38}, ValueError, "cache_seqlens must be in"),
    ({"k": "k_bad", "v": "v", "cache_seqlens": 3}, ValueError, "k must have shape"),
    ({"q": "q3", "causal": False}, NotImplementedError, "causal=False with seqlen_q = 3"),
    ({"num_splits": -1}, ValueError, "num_splits"),
    ({"block_table": "table", "cache_batch_idx": "idx"}, ValueError, "cache_batch_idx"),
    ({"cache_batch_idx": "bad_idx"}, ValueError, r"cache_batch_idx must hold rows"),
])
def test_kvcache_bad_arguments_are_named_and_leave_the_cache_alone(kwargs, error, match):
    k_cache, v_cache = rand(2, 40, 2, 16, seed=1), rand(2, 40, 2, 16, seed=2)
    before = k_cache.clone()
    values = {"k": rand(2, 3, 2, 16), "v": rand(2, 3, 2, 16), "k_bad": rand(2, 3, 1, 16), "q3": rand(2, 3, 4, 16),
              "cos": rand(64, 4), "table": torch.zeros(2, 1, dtype=torch.int32, device=DEVICE),
              "idx": torch.zeros(2, dtype=torch.int32, device=DEVICE),
              "bad_idx": torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)}
    kwargs = {name: values.get(value, value) if isinstance(value, str) else value for name, value in kwargs.items()}
    q = kwargs.pop("q", rand(2, 1, 4, 16))
    with pytest.raises(error, match=match):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    assert torch.equal(k_cache, before)


def test_compat_outputs_are_contiguous_as_flash_attns():
    """flash-attn returns contiguous outputs and callers .view them (attnkit's own bshd ops may give
    views: the kernel writes a head-major buffer)."""
    q, k, v = rand(2, 9, 4, 16, seed=1), rand(2, 9, 2, 16, seed=2), rand(2, 9, 2, 16, seed=3)
    assert not attnkit.flash_attention(q, k, v, layout="bshd", backend="triton").is_contiguous()
    outs = [fa.flash_attn_func(q, k, v), fa.flash_attn_func(q, k, v, return_attn_probs=True)[0],
            fa.flash_attn_func(q, k, v, window_size=(3, 0)), fa.flash_attn_varlen_func(q[0], k[0], v[0], _cu(9), _cu(9),
                                                                                         9, 9),
            fa.flash_attn_with_kvcache(q[:, :1], k, v), fa.flash_attn_with_kvcache(q[:, :1], k, v,
                                                                                   return_softmax_lse=True)[0]]
    for out in outs:
        assert out.is_contiguous()
        out.view(*out.shape[:-2], -1)
