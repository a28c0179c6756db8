"""moba: reference vs a naive per-token implementation, special cases (top_k = 1,
top_k >= number of blocks, GQA, Nq != Nk, block sizes not multiples of 16), the
Triton gate vs the reference gate, kernel vs reference, and bad input."""

import math

import pytest
import torch

import attnkit
from attnkit.block_sparse.moba import moba_select
from attnkit.block_sparse.reference import moba_gate
from attnkit.kernels.engine import force_config
from attnkit.registry import Case
from attnkit.testing import check_case

from conftest import DEVICE


def naive_moba(q, k, v, block_size, top_k, scale=None):
    """One query token at a time, straight from the definition (float64 attention, fp32 gate)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for i in range(Nq):
                p = i + Nk - Nq
                if p < 0:
                    continue
                own = p // block_size
                gate = {c: float(q[b, h, i].float() @ k[b, hk, c * block_size:(c + 1) * block_size].float().mean(0))
                        for c in range(own)}
                chosen = sorted(gate, key=lambda c: (-gate[c], c))[:top_k - 1]
                keys = [j for j in range(p + 1) if j // block_size == own or j // block_size in chosen]
                s = (k[b, hk, keys].double() @ q[b, h, i].double()) * scale
                w = torch.softmax(s, 0)
                out[b, h, i] = w @ v[b, hk, keys].double()
                lse[b, h, i] = torch.logsumexp(s, 0)
    return out, lse


def inputs(b, hq, hkv, nq, nk, d, dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=g, dtype=dtype), torch.randn(b, hkv, nk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, nk, dv or d, generator=g, dtype=dtype))


@pytest.mark.parametrize("b,hq,hkv,nq,nk,bs,top_k", [
    (1, 2, 2, 50, 50, 8, 3),    # N not a multiple of the block
    (2, 4, 2, 37, 37, 10, 2),   # GQA
    (1, 2, 1, 20, 45, 7, 4),    # Nq < Nk (decode-like), MQA
    (1, 1, 1, 30, 18, 4, 3),    # Nq > Nk: early rows see nothing
    (1, 2, 2, 33, 33, 8, 1),    # own block only
    (1, 2, 2, 33, 33, 8, 9),    # top_k >= number of blocks
])
def test_reference_matches_naive_per_token(b, hq, hkv, nq, nk, bs, top_k):
    q, k, v = inputs(b, hq, hkv, nq, nk, 16, 12)
    out, lse = attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, return_lse=True, backend="reference")
    ref_out, ref_lse = naive_moba(q, k, v, bs, top_k)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_top_k_one_is_causal_attention_within_blocks():
    q, k, v = inputs(1, 2, 2, 96, 96, 16)
    bm = attnkit.BlockMask.from_dense(torch.eye(3, dtype=torch.bool), 32, (96, 96))
    torch.testing.assert_close(attnkit.moba_attention(q, k, v, block_size=32, top_k=1, backend="reference"),
                               attnkit.block_sparse_attention(q, k, v, bm, causal=True, backend="reference"))


def test_top_k_at_least_blocks_is_full_causal_attention():
    q, k, v = inputs(1, 2, 1, 40, 90, 16)
    for top_k in (90 // 16 + 1, 100):
        torch.testing.assert_close(attnkit.moba_attention(q, k, v, block_size=16, top_k=top_k, backend="reference"),
                                   attnkit.flash_attention(q, k, v, causal=True, backend="reference"))


@pytest.mark.parametrize("bs,top_k", [(16, 3), (24, 4), (40, 2)])
def test_triton_gate_matches_reference_gate(bs, top_k):
    q, k, _ = inputs(2, 4, 2, 70, 130, 40, seed=3, dtype=torch.float32)
    sel = moba_select(q, k, bs, top_k)
    n_blocks = 130 // bs
    chosen = torch.zeros(2, 4, 70, n_blocks + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(sel < 0, n_blocks, sel).long(), True)
    expected = moba_gate(q, k.repeat_interleave(2, 1), block_size=bs, top_k=top_k)
    assert torch.equal(chosen[..., :n_blocks], expected)
    assert sel.shape[-1] == min(top_k - 1, n_blocks)


@pytest.mark.parametrize("name,shapes,opts,dtype,tile", [
    ("top1", ((1, 2, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32)), {"block_size": 16, "top_k": 1}, torch.float32, None),
    ("top_all", ((1, 2, 70, 32), (1, 2, 70, 32), (1, 2, 70, 32)), {"block_size": 16, "top_k": 8}, torch.float16, None),
    ("gqa_bs48", ((1, 2, 100, 40), (1, 1, 100, 40), (1, 1, 100, 24)), {"block_size": 48, "top_k": 2}, torch.float32,
     (16, 16)),
    ("bs20_tile32", ((1, 2, 90, 16), (1, 2, 90, 16), (1, 2, 90, 16)), {"block_size": 20, "top_k": 3}, torch.float16,
     (32, 32)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_matches_reference(name, shapes, opts, dtype, tile):
    case = Case(*shapes, opts, name=name)
    if tile is None:
        report = check_case("moba", case, dtype=dtype, device=DEVICE)
    else:
        with force_config(*tile):
            report = check_case("moba", case, dtype=dtype, device=DEVICE)
    assert report.ok, str(report)


def test_kernel_empty_rows_and_gradients():
    q, k, v = (t.float().requires_grad_() for t in inputs(1, 2, 1, 60, 40, 16, seed=5))
    out, lse = attnkit.moba_attention(q, k, v, block_size=16, top_k=2, return_lse=True, backend="triton")
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(out[:, :, :20] == 0) and torch.all(lse[:, :, :20] == -math.inf)
    assert torch.isfinite(lse[:, :, 20:]).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert torch.all(q.grad[:, :, :20] == 0)


def test_bad_input():
    q = k = v = torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        attnkit.moba_attention(q, k, v, block_size=16, top_k=0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        attnkit.moba_attention(q, k, v, block_size=0, top_k=2)
    with pytest.raises(TypeError, match="top_k must be an int"):
        attnkit.moba_attention(q, k, v, block_size=16, top_k=2.0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        attnkit.moba_attention(q, k, v, block_size=True, top_k=2)
    with pytest.raises(TypeError, match="block_size is required"):
        attnkit.attention(q, k, v, "moba", top_k=2)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attnkit.moba_attention(q, torch.randn(1, 3, 32, 16), torch.randn(1, 3, 32, 16), block_size=16, top_k=2)
