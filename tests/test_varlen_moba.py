"""moba on packed variable-length batches (cu_seqlens_q/k, B = 1): every sequence has its
own key blocks (boundaries at the sequence's first key + multiples of block_size, a short
last block), its own gate and its own bottom-right positions, so a packed call equals the
sequences run one by one: forward, LSE and gradients, on both backends; the Triton gate's
selection table per sequence; bad offsets are refused with flash's words."""

import itertools

import pytest
import torch
from conftest import DEVICE

import attnkit
from attnkit.block_sparse.moba import moba_select
from attnkit.block_sparse.reference import moba_gate

BACKENDS = ["reference", "triton"]


def offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def packed_inputs(lengths_q, lengths_k, hq=2, hkv=1, d=16, dv=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, sum(lengths_q), d, generator=g)
    k = torch.randn(1, hkv, sum(lengths_k), d, generator=g)
    v = torch.randn(1, hkv, sum(lengths_k), dv, generator=g)
    return tuple(t.to(DEVICE).requires_grad_() for t in (q, k, v))


def run_with_grads(fn, q, k, v, dout_seed=7):
    """out, lse and (dq, dk, dv) of ``fn(q, k, v) -> (out, lse)`` for a fixed random dout."""
    out, lse = fn(q, k, v)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    return out.detach(), lse.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip((q, k, v), grads)]


def one_by_one(q, k, v, lengths_q, lengths_k, **options):
    """The sequences run as separate calls, concatenated along N."""
    bounds_q, bounds_k = offsets(lengths_q).tolist(), offsets(lengths_k).tolist()
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k)):
        out, lse = attnkit.moba_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], return_lse=True, **options)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def check_packed_equals_one_by_one(lengths_q, lengths_k, block_size, top_k, backend):
    q, k, v = packed_inputs(lengths_q, lengths_k)
    options = {"block_size": block_size, "top_k": top_k, "backend": backend}
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    packed = run_with_grads(lambda q, k, v: attnkit.moba_attention(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **options), q, k, v)
    separate = run_with_grads(lambda q, k, v: one_by_one(q, k, v, lengths_q, lengths_k, **options), q, k, v)
    torch.testing.assert_close(packed[0], separate[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], separate[1], rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", packed[2], separate[2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_packed_equals_sequences_one_by_one(backend, block_size, top_k):
    # lengths 1, 17, 0 (in the middle) and 113: blocks restart at 1 and at 18, 113 ends in a short block
    lengths = [1, 17, 0, 113]
    check_packed_equals_one_by_one(lengths, lengths, block_size, top_k, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 20])
def test_packed_with_other_key_lengths(backend, block_size):
    # per sequence Nq != Nk: 3 queries on 1 key (two rows see nothing), decode-like 17 on 30 and
    # 40 on 113, an empty last sequence; bottom-right positions are per sequence. block_size 20
    # is no multiple of the kernel's key blocks: a key block can straddle two MoBA blocks
    check_packed_equals_one_by_one([3, 17, 40, 0], [1, 30, 113, 0], block_size, 3, backend)


@pytest.mark.parametrize("block_size,top_k", [(16, 3), (32, 2), (16, 9)])
def test_triton_gate_selects_per_sequence(block_size, top_k):
    lengths_q, lengths_k = [1, 17, 0, 40], [1, 30, 5, 113]
    q, k, _ = (t.detach() for t in packed_inputs(lengths_q, lengths_k, hq=4, hkv=2, seed=3))
    sel = moba_select(q, k, block_size, top_k, offsets(lengths_q), offsets(lengths_k))
    assert sel.shape[:3] == (len(lengths_q), 4, max(lengths_q))
    bounds_q, bounds_k = offsets(lengths_q).tolist(), offsets(lengths_k).tolist()
    for seq, ((q0, q1), (k0, k1)) in enumerate(zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k))):
        n_blocks = (k1 - k0) // block_size
        chosen = torch.zeros(1, 4, q1 - q0, n_blocks + 1, dtype=torch.bool, device=q.device)
        rows = sel[seq:seq + 1, :, :q1 - q0].long()
        chosen.scatter_(-1, torch.where(rows < 0, n_blocks, rows), True)
        expected = moba_gate(q[:, :, q0:q1], k[:, :, k0:k1].repeat_interleave(2, 1), block_size=block_size,
                             top_k=top_k)
        assert torch.equal(chosen[..., :n_blocks], expected), f"sequence {seq}"
        assert torch.all(sel[seq, :, q1 - q0:] == -1), f"rows past sequence {seq}"


def test_example_has_a_varlen_case():
    cases = attnkit.get_variant("moba").examples()
    assert any("cu_seqlens_q" in case.tensors for case in cases)


def _qkv(b=1, n=8):
    return torch.randn(b, 2, n, 16), torch.randn(b, 2, n, 16), torch.randn(b, 2, n, 16)


@pytest.mark.parametrize("cu_q,cu_k,match", [
    ([0, 4, 8], None, "given together"),
    (None, [0, 4, 8], "given together"),
    (torch.tensor([0, 4, 8]), torch.tensor([0, 4, 8]), "cu_seqlens_q must have dtype torch.int32"),
    ([0, 4, 8], torch.tensor([0, 4, 8], dtype=torch.int64), "cu_seqlens_k must have dtype torch.int32"),
    ([0, 6, 4, 8], [0, 2, 4, 8], "cu_seqlens_q must be non-decreasing"),
    ([0, 4, 7], [0, 4, 8], "cu_seqlens_q must end at the packed length 8"),
    ([1, 4, 8], [0, 4, 8], "cu_seqlens_q must start at 0"),
    ([0, 4, 8], [0, 2, 4, 8], "same number of sequences"),
    ([[0, 4, 8]], [0, 4, 8], "cu_seqlens_q must be 1-D"),
    ([0, 4, 8], [0.0, 4.0, 8.0], "cu_seqlens_k must have dtype torch.int32"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_cu_seqlens(cu_q, cu_k, match, backend):
    def as_tensor(c):
        if c is None or isinstance(c, torch.Tensor):
            return c
        return torch.tensor(c, dtype=torch.float32 if isinstance(c[0], float) else torch.int32)

    with pytest.raises((ValueError, TypeError), match=match):
        attnkit.moba_attention(*_qkv(), block_size=4, top_k=2, cu_seqlens_q=as_tensor(cu_q),
                               cu_seqlens_k=as_tensor(cu_k), backend=backend)


def test_cu_seqlens_need_batch_one():
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        attnkit.moba_attention(*_qkv(b=2), block_size=4, top_k=2, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_cu_seqlens_must_be_a_tensor():
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32 tensor"):
        attnkit.moba_attention(*_qkv(), block_size=4, top_k=2, cu_seqlens_q=[0, 8],
                               cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32))
