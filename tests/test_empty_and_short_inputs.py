"""Short and empty inputs (issue 17, items 2, 3, 7 and part of 9): MoBA with fewer keys
than one block, packed flash batches holding an empty sequence, empty batches and
sequences on every variant and both backends, and windows too large to represent."""

import math

import pytest
import torch

import attnkit
from attnkit.registry import Case
from attnkit.testing import check_case

from conftest import DEVICE


def int32(values):
    return lambda g: torch.tensor(values, dtype=torch.int32)


# --- item 2: MoBA with Nk < block_size -------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("nq,nk", [(12, 10), (20, 15), (5, 15)])
def test_moba_fewer_keys_than_one_block(nq, nk, top_k):
    """No complete block exists, so every query attends its own (only) block causally:
    the reference matches the kernel, forward and backward, and causal flash attention."""
    case = Case((1, 2, nq, 16), (1, 2, nk, 16), (1, 2, nk, 16), {"block_size": 16, "top_k": top_k})
    report = check_case("moba", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)
    q, k, v, _ = attnkit.testing.make_inputs(case, DEVICE)
    out, lse = attnkit.moba_attention(q, k, v, block_size=16, top_k=top_k, return_lse=True, backend="reference")
    want, want_lse = attnkit.flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)


# --- item 3: packed flash with an empty sequence --------------------------------------------

@pytest.mark.parametrize("cu_q,cu_k", [
    ([0, 0, 5], [0, 3, 6]),      # an empty query sequence
    ([0, 2, 5], [0, 0, 6]),      # an empty key sequence: its rows output 0, LSE -inf
    ([0, 2, 2, 5], [0, 0, 4, 6]),  # both, and a sequence empty on both sides
])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_flash_with_an_empty_sequence(cu_q, cu_k, causal):
    case = Case((1, 2, 5, 16), (1, 2, 6, 16), (1, 2, 6, 16), {"causal": causal},
                tensors={"cu_seqlens_q": int32(cu_q), "cu_seqlens_k": int32(cu_k)})
    report = check_case("flash", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)
    # the rows of a sequence with no keys: out 0, LSE -inf, no gradient to q
    q, k, v, t = attnkit.testing.make_inputs(case, DEVICE)
    q.requires_grad_(True)
    out, lse = attnkit.flash_attention(q, k, v, causal=causal, return_lse=True, backend="reference", **t)
    out.sum().backward()
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        if k0 == k1:
            assert torch.all(out[:, :, q0:q1] == 0)
            assert torch.all(torch.isneginf(lse[:, :, q0:q1]))
            assert torch.all(q.grad[:, :, q0:q1] == 0)
    assert math.isfinite(float(q.grad.abs().sum()))


# --- item 9: windows too large to represent ------------------------------------------------

HUGE = 2 ** 70


@pytest.mark.parametrize("window,unbounded_as", [
    (HUGE, (-1, 0)),
    ((HUGE, 0), (-1, 0)),
    ((5, HUGE), (5, -1)),
    ((HUGE, HUGE), (-1, -1)),
    ("int64_max", (-1, -1)),  # an int64 tensor at the top of its range: position + extent used to wrap around
], ids=["int", "left", "right", "both", "int64_tensor"])
def test_huge_window_means_unbounded_on_both_backends(window, unbounded_as):
    """An extent past every key of any sequence is unbounded: reference and kernel agree with
    each other and with the same window written with -1."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).to(DEVICE) for n in (20, 24, 24))
    if window == "int64_max":
        window = torch.full((2, 2), 2 ** 63 - 1, dtype=torch.int64, device=DEVICE)
    want = attnkit.sliding_window_attention(q, k, v, window=unbounded_as, backend="reference")
    for backend in ("reference", "triton"):
        out = attnkit.sliding_window_attention(q, k, v, window=window, backend=backend)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_huge_window_parses_as_unbounded():
    from attnkit.sliding_window.window import head_windows

    assert head_windows(HUGE, 2) == [(-1, 0), (-1, 0)]
    assert head_windows((3, HUGE), 1) == [(3, -1)]
    assert head_windows(torch.tensor([[2 ** 63 - 1, 0], [4, 2 ** 62]]), 2) == [(-1, 0), (4, -1)]
    assert head_windows((2 ** 62 - 1, 0), 1) == [(2 ** 62 - 1, 0)]  # still representable: kept as given


def test_huge_window_decodes_on_both_backends():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 1, 16, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(2, 1, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    lengths = torch.tensor([40, 23], dtype=torch.int32, device=DEVICE)
    want = attnkit.decode_attention(q, k_cache, v_cache, lengths, backend="reference")
    for backend in ("reference", "triton"):
        out = attnkit.decode_attention(q, k_cache, v_cache, lengths, window=HUGE, backend=backend)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# --- item 9: radial_mask_fn checks its sizes when built ------------------------------------

@pytest.mark.parametrize("args,kwargs,error,match", [
    ((4, 0), {}, ValueError, "tokens_per_frame must be >= 1, got 0"),
    ((0, 4), {}, ValueError, "frames must be >= 1, got 0"),
    ((4, 4.0), {}, TypeError, "tokens_per_frame must be an int"),
    ((4, 4), {"min_width": 0}, ValueError, "min_width must be >= 1"),
    ((4, 4), {"dense_frames": -1}, ValueError, "dense_frames must be >= 0"),
    ((4, 4), {"sink_frames": -2}, ValueError, "sink_frames must be >= 0"),
    ((4, 4), {"decay_factor": 0.0}, ValueError, "decay_factor must be a finite number > 0"),
    ((4, 4), {"decay_factor": math.inf}, ValueError, "decay_factor must be a finite number > 0"),
    ((4, 4), {"decay_factor": "1"}, TypeError, "decay_factor must be a float"),
])
def test_radial_mask_fn_rejects_bad_sizes(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attnkit.patterns.radial_mask_fn(*args, **kwargs)


def test_radial_rejects_bad_sizes_with_the_same_words():
    with pytest.raises(ValueError, match="tokens_per_frame must be >= 1, got 0"):
        attnkit.patterns.radial(4, 0, 16)
    with pytest.raises(ValueError, match="decay_factor must be a finite number > 0"):
        attnkit.patterns.radial(4, 16, 16, decay_factor=-1.0)


# --- item 7: empty inputs (B = 0, Hq = 0, Nq = 0, Nk = 0) on every variant and both backends ----------------

BACKENDS = ["reference", "triton"]

#: (name, q shape, k shape, v shape): one of B, Hq, Nq, Nk is 0 (Dv = 24 != D = 16)
EMPTY_SHAPES = [
    ("B=0", (0, 2, 8, 16), (0, 1, 8, 16), (0, 1, 8, 24)),
    ("Hq=0", (1, 0, 8, 16), (1, 1, 8, 16), (1, 1, 8, 24)),
    ("Hq=Hkv=0", (1, 0, 8, 16), (1, 0, 8, 16), (1, 0, 8, 24)),
    ("Nq=0", (2, 2, 0, 16), (2, 1, 8, 16), (2, 1, 8, 24)),
    ("Nk=0", (2, 2, 8, 16), (2, 1, 0, 16), (2, 1, 0, 24)),
    ("Nq=Nk=0", (2, 2, 0, 16), (2, 1, 0, 16), (2, 1, 0, 24)),
]

SOFTMAX_VARIANTS = [
    ("flash", lambda hq: {}),
    ("flash", lambda hq: {"causal": True, "softcap": 5.0}),
    ("sliding_window", lambda hq: {"window": 4, "sinks": 1}),
    ("sliding_window", lambda hq: {"window": torch.tensor([2, 0], device=DEVICE).repeat(hq, 1)}),  # per-head windows
    ("moba", lambda hq: {"block_size": 16, "top_k": 2}),
    ("flex", lambda hq: {"mask_mod": attnkit.mods.causal()}),
    ("flex", lambda hq: {"score_mod": attnkit.mods.alibi(torch.ones(hq, device=DEVICE))}),
]


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(DEVICE).requires_grad_(True) for s in shapes]


def grads_of(outputs, inputs):
    """Gradients of sum(outputs) (all of them, so every output must stay on the autograd graph)."""
    return torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,qs,ks,vs", EMPTY_SHAPES, ids=[s[0] for s in EMPTY_SHAPES])
@pytest.mark.parametrize("variant,options", SOFTMAX_VARIANTS,
                         ids=["flash", "flash_causal_softcap", "sliding_window", "sliding_window_per_head",
                              "moba", "flex_mask", "flex_score"])
def test_softmax_variants_take_empty_inputs(variant, options, kind, qs, ks, vs, backend):
    """Empty outputs of the right shape, or with no keys zeros and LSE -inf; zero gradients."""
    q, k, v = leaves(qs, ks, vs)
    out, lse = attnkit.attention(q, k, v, variant, backend, return_lse=True, **options(qs[1]))
    assert out.shape == qs[:3] + (vs[-1],) and out.dtype == q.dtype
    assert lse.shape == qs[:3] and lse.dtype == torch.float32
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv = grads_of([out, lse], [q, k, v])
    for x, dx in ((q, dq), (k, dk), (v, dv)):
        assert dx.shape == x.shape and torch.all(dx == 0)
    explanation = attnkit.explain(q, k, v, variant, backend, **options(qs[1]))
    assert explanation.backend == "reference" and "empty inputs" in str(explanation)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,qs,ks,vs", EMPTY_SHAPES, ids=[s[0] for s in EMPTY_SHAPES])
def test_flash_on_empty_inputs_matches_sdpa(kind, qs, ks, vs, causal):
    q, k, v = leaves(qs, ks, vs)
    out = attnkit.flash_attention(q, k, v, causal=causal, backend="triton")
    if qs[1] == 0:  # SDPA broadcasts Hkv = 1 onto Hq = 0 only with enable_gqa
        k, v = k[:, :0], v[:, :0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal and 0 not in qs[:3] + ks[2:3],
                                                              enable_gqa=True)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want)


def test_empty_inputs_with_sink_logits_and_packed_sequences():
    # no keys but a sink logit: out 0 and LSE = the sink logit (the sink is the whole denominator)
    q, k, v = leaves((1, 2, 5, 16), (1, 2, 0, 16), (1, 2, 0, 16))
    sinks = torch.tensor([0.5, -1.0], device=DEVICE, requires_grad=True)
    for backend in BACKENDS:
        out, lse = attnkit.flash_attention(q, k, v, sink_logits=sinks, return_lse=True, backend=backend)
        assert torch.all(out == 0)
        torch.testing.assert_close(lse, sinks.detach().view(1, 2, 1).expand(1, 2, 5))
    # a packed batch holding no tokens at all
    q, k, v = leaves((1, 2, 0, 16), (1, 2, 0, 16), (1, 2, 0, 16))
    cu = torch.tensor([0, 0], dtype=torch.int32, device=DEVICE)
    for backend in BACKENDS:
        out, lse = attnkit.flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True,
                                           backend=backend)
        assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qs", [(0, 2, 32, 16), (1, 0, 32, 16)], ids=["B=0", "Hq=0"])
def test_block_sparse_takes_empty_batches_and_heads(qs, backend):
    """(A BlockMask describes sequences of at least one token, so Nq/Nk = 0 cannot be posed.)"""
    mask = attnkit.BlockMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, (32, 32))
    q, k, v = leaves(qs, qs, qs[:3] + (24,))
    out, lse = attnkit.block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    assert out.shape == qs[:3] + (24,) and lse.shape == qs[:3]
    assert all(torch.all(d == 0) for d in grads_of([out], [q, k, v]))


NEIGHBORHOOD_SHAPES = [
    ("B=0", (0, 2, 9, 16), 3),
    ("Hq=0", (1, 0, 9, 16), 3),
    ("L=0", (2, 2, 0, 16), 3),
    ("2d_X0=0", (1, 2, 0, 5, 16), (3, 3)),
    ("2d_X1=0", (1, 2, 5, 0, 16), 3),
    ("3d_B=0", (0, 1, 4, 4, 4, 16), 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shape,kernel_size", NEIGHBORHOOD_SHAPES, ids=[s[0] for s in NEIGHBORHOOD_SHAPES])
def test_neighborhood_takes_empty_inputs(kind, shape, kernel_size, backend):
    """An empty batch, head set or spatial axis: no query, so no window to fit (kernel_size may
    exceed an empty axis); the output keeps every spatial axis."""
    vshape = shape[:-1] + (24,)
    q, k, v = leaves(shape, shape, vshape)
    out, lse = attnkit.neighborhood_attention(q, k, v, kernel_size=kernel_size, return_lse=True, backend=backend)
    assert out.shape == vshape and lse.shape == shape[:-1] and lse.dtype == torch.float32
    assert all(torch.all(d == 0) for d in grads_of([out, lse], [q, k, v]))


def test_neighborhood_still_checks_kernel_size_on_non_empty_axes():
    q = torch.randn(1, 2, 0, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="kernel_size \\* dilation must be <= the axis length"):
        attnkit.neighborhood_attention(q, q, q, kernel_size=7)


def linear_call(variant, q, k, v, backend, **options):
    if variant == "lightning":
        slopes = torch.full((q.shape[1],), 0.3, device=DEVICE)
        return attnkit.lightning_attention(q, k, v, slopes, return_state=True, backend=backend, **options)
    return attnkit.linear_attention(q, k, v, return_state=True, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["linear", "lightning"])
@pytest.mark.parametrize("shape", [(0, 2, 6, 16), (1, 0, 6, 16), (2, 2, 0, 16)], ids=["B=0", "Hq=0", "N=0"])
def test_linear_empty_inputs_pass_the_state_through(variant, shape, backend):
    """The recurrence over no token leaves the state as it was: out is empty, the returned
    state is initial_state (zeros without one), and its gradient reaches initial_state."""
    q, k, v = leaves(shape, shape, shape[:3] + (24,))
    state0 = torch.randn(shape[0], shape[1], 16, 24, device=DEVICE, requires_grad=True)
    out, state = linear_call(variant, q, k, v, backend, initial_state=state0)
    assert out.shape == shape[:3] + (24,)
    assert state.shape == state0.shape and state.dtype == torch.float32
    if shape[2] == 0:
        torch.testing.assert_close(state, state0.detach())
    dq, dk, dv, ds = grads_of([out, state], [q, k, v, state0])
    assert all(torch.all(d == 0) for d in (dq, dk, dv)) and torch.all(ds == 1)
    out, state = linear_call(variant, q.detach(), k.detach(), v.detach(), backend)
    assert out.shape == shape[:3] + (24,) and torch.all(state == 0) and state.shape == state0.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncausal_linear_with_no_keys_or_no_queries(backend):
    """Non-causal: O = scale Q (S_0 + K^T V). No keys: O = scale Q S_0 (zeros without S_0);
    no queries: empty O, and the state still sums the keys."""
    q, k, v = leaves((1, 2, 5, 16), (1, 2, 0, 16), (1, 2, 0, 24))
    state0 = torch.randn(1, 2, 16, 24, device=DEVICE)
    out = attnkit.linear_attention(q, k, v, causal=False, initial_state=state0, backend=backend)
    torch.testing.assert_close(out, q.detach() @ state0 / 4)
    out = attnkit.linear_attention(q, k, v, causal=False, backend=backend)
    assert out.shape == (1, 2, 5, 24) and torch.all(out == 0)
    q, k, v = leaves((1, 2, 0, 16), (1, 2, 7, 16), (1, 2, 7, 24))
    out, state = attnkit.linear_attention(q, k, v, causal=False, initial_state=state0, return_state=True,
                                          backend=backend)
    assert out.shape == (1, 2, 0, 24)
    torch.testing.assert_close(state, state0 + k.detach().transpose(-1, -2) @ v.detach())


DECODE_CASES = [
    ("B=0", (0, 2, 1, 16), (0, 1, 32, 16), []),
    ("Hq=0", (2, 0, 1, 16), (2, 1, 32, 16), [5, 32]),
    ("Nq=0", (2, 2, 0, 16), (2, 1, 32, 16), [5, 0]),
    ("capacity=0", (2, 2, 0, 16), (2, 1, 0, 16), [0, 0]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,qs,cs,lengths", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_takes_empty_inputs(kind, qs, cs, lengths, backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(qs, generator=g).to(DEVICE)
    k_cache, v_cache = torch.randn(cs, generator=g).to(DEVICE), torch.randn(cs[:3] + (24,), generator=g).to(DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse, scores = attnkit.decode_attention(q, k_cache, v_cache, seqlens, window=8, return_lse=True,
                                                return_key_scores=True, backend=backend)
    assert out.shape == qs[:3] + (24,) and lse.shape == qs[:3] and scores.shape == (qs[0], qs[1], cs[2])
    assert torch.all(scores == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_with_page_selection_and_no_queries(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 0, 16, generator=g).to(DEVICE)
    k_cache, v_cache = (torch.randn(6, 1, 16, 16, generator=g).to(DEVICE) for _ in range(2))
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([40, 17], dtype=torch.int32, device=DEVICE)
    out = attnkit.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, page_top_k=2, backend=backend)
    assert out.shape == (2, 2, 0, 16)


def test_heads_rule_for_empty_head_sets():
    """Hq = 0 goes with any Hkv (as in SDPA with enable_gqa); Hq > 0 still needs Hkv dividing it."""
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 0, 4, 16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads \\(0\\)"):
        attnkit.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="multiple of the cache's kv heads \\(0\\)"):
        attnkit.decode_attention(q, k, k)
    with pytest.raises(ValueError, match="head dims must be at least 1"):
        attnkit.flash_attention(q[..., :0], q[..., :0], q)
