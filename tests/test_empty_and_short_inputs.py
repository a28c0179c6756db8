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
