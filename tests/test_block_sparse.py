"""block_sparse: BlockMask construction and conversion, patterns, kernel vs reference
(densities 0 / 0.3 / 0.6 / 1, non-square blocks, Nq != Nk, ragged N, empty rows,
several kernel tilings) and bad input."""

import math
import warnings

import pytest
import torch

import attnkit
from attnkit import BlockMask, patterns
from attnkit.kernels.engine import force_config
from attnkit.registry import Case
from attnkit.testing import check_case

from conftest import DEVICE


def random_mask(shape, block_size, seq_lens, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return BlockMask.from_dense(torch.rand(shape, generator=g) < density, block_size, seq_lens)


def token_mask(bm: BlockMask, causal: bool) -> torch.Tensor:
    """Dense (Bm, Hm, Nq, Nk) token mask of a block mask (tests only, small sizes)."""
    (bq, bk), (nq, nk) = bm.block_size, bm.seq_lens
    t = bm.to_dense().repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
    if causal:
        t = t & (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + nk - nq)
    return t


def dense_attention(q, k, v, mask, scale=None):
    """Plain masked softmax attention on an explicit token mask (empty rows -> 0)."""
    hq = q.shape[1]
    k, v = k.repeat_interleave(hq // k.shape[1], 1), v.repeat_interleave(hq // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


# ----------------------------------------------------------------------------- BlockMask

def test_from_dense_lists_and_transposed_lists():
    dense = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    bm = BlockMask.from_dense(dense, (32, 16), (70, 40))
    assert bm.kv_num_blocks.dtype == torch.int32 and bm.kv_indices.dtype == torch.int32
    assert bm.kv_num_blocks.tolist() == [[[2, 0, 3]]]
    assert [bm.kv_indices[0, 0, r, :n].tolist() for r, n in enumerate([2, 0, 3])] == [[0, 2], [], [0, 1, 2]]
    assert bm.q_num_blocks.tolist() == [[[2, 1, 2]]]
    assert [bm.q_indices[0, 0, c, :n].tolist() for c, n in enumerate([2, 1, 2])] == [[0, 2], [2], [0, 2]]
    assert bm.q_indices is bm.q_indices  # cached
    assert torch.equal(bm.to_dense()[0, 0], dense)
    assert bm.shape == (1, 1, 3, 3) and bm.block_size == (32, 16) and bm.seq_lens == (70, 40)
    assert bm.sparsity() == pytest.approx(100 * 4 / 9)


def test_constructor_keeps_list_order():
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    index = torch.tensor([[[[1, 0], [0, 7]]]], dtype=torch.int32)  # 7 is padding past the count
    bm = BlockMask(counts, index, 16, (32, 32))
    assert bm.kv_indices[0, 0, 0].tolist() == [1, 0]
    assert bm.to_dense()[0, 0].tolist() == [[True, True], [True, False]]


@pytest.mark.parametrize("nq,nk,block", [(100, 70, (32, 16)), (64, 64, 16), (33, 129, (16, 48))])
def test_from_mask_fn_matches_from_dense(nq, nk, block):
    def fn(b, h, q, kv):  # causal + per-head band
        return (kv <= q) & ((q - kv) < 24 * (h + 1))

    bm = BlockMask.from_mask_fn(fn, None, 2, nq, nk, block, chunk_elements=512)  # many small chunks
    bq, bk = (block, block) if isinstance(block, int) else block
    tok = fn(0, torch.arange(2).view(2, 1, 1), torch.arange(nq).view(1, -1, 1), torch.arange(nk).view(1, 1, -1))
    pad = torch.zeros(2, -(-nq // bq) * bq, -(-nk // bk) * bk, dtype=torch.bool)
    pad[:, :nq, :nk] = tok
    expected = pad.view(2, -(-nq // bq), bq, -(-nk // bk), bk).any(4).any(2)
    ref = BlockMask.from_dense(expected[None], block, (nq, nk))
    assert torch.equal(bm.to_dense(), ref.to_dense())
    assert torch.equal(bm.kv_indices, ref.kv_indices) and torch.equal(bm.kv_num_blocks, ref.kv_num_blocks)


def test_from_mask_fn_evaluates_in_chunks():
    n, block, budget = 2048, 32, 1 << 14
    sizes = []

    def causal(b, h, q, kv):
        sizes.append(torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape).numel())
        return q >= kv

    bm = BlockMask.from_mask_fn(causal, None, None, n, n, block, chunk_elements=budget)
    assert max(sizes) <= budget < n * n
    r = torch.arange(n // block)
    assert torch.equal(bm.to_dense()[0, 0], r[:, None] >= r[None, :])


def test_torch_flex_round_trip_and_equivalence():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = random_mask((2, 2, 4, 5), (32, 16), (100, 70), 0.5, seed=3)
    for causal in (False, True):
        back = BlockMask.from_torch(bm.to_torch(causal))
        full, part = bm.causal_split(causal)
        assert torch.equal(back.to_dense(), full | part)
        assert back.block_size == bm.block_size and back.seq_lens == bm.seq_lens
    # torch's own mask for a causal mask_mod becomes the same block structure as from_mask_fn
    tbm = flex.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 128, 128, device="cpu", BLOCK_SIZE=32)
    ours = BlockMask.from_mask_fn(lambda b, h, q, kv: q >= kv, None, None, 128, 128, 32)
    assert torch.equal(BlockMask.from_torch(tbm).to_dense(), ours.to_dense())
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (100, 70, 70))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for causal in (False, True):
            out = flex.flex_attention(q, k, v, block_mask=bm.to_torch(causal))
            ref = attnkit.block_sparse_attention(q, k, v, bm, causal=causal, backend="reference")
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_dense_token_mask(causal):
    bm = random_mask((2, 1, 4, 7), (32, 16), (100, 110), 0.4, seed=5)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 100, 24, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 110, 24, generator=g, dtype=torch.float64) for _ in range(2))
    out = attnkit.block_sparse_attention(q, k, v, bm, causal=causal, backend="reference")
    torch.testing.assert_close(out, dense_attention(q, k, v, token_mask(bm, causal)))


def test_full_mask_equals_flash():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for n in (50, 80, 80))
    bm = BlockMask.from_dense(torch.ones(2, 3, dtype=torch.bool), (32, 32), (50, 80))
    for causal in (False, True):
        torch.testing.assert_close(
            attnkit.block_sparse_attention(q, k, v, bm, causal=causal, backend="reference"),
            attnkit.flash_attention(q, k, v, causal=causal, backend="reference"))


# ----------------------------------------------------------------------------- kernel vs reference

def _case(q, k, v, mask, name, **opts):
    return Case(q, k, v, {"block_mask": mask, **opts}, name=name)


@pytest.mark.parametrize("density,causal,dtype", [
    (0.0, False, torch.float32), (0.3, True, torch.float16), (0.6, False, torch.float16), (1.0, True, torch.float32),
], ids=["d0", "d0.3-causal", "d0.6", "d1-causal"])
def test_kernel_random_masks(density, causal, dtype):
    # non-square blocks, Nq != Nk, N not a multiple of the block, per-batch and per-head masks, GQA, D = 40
    bm = random_mask((2, 4, 3, 6), (32, 16), (70, 90), density, seed=int(density * 10))
    case = _case((2, 4, 70, 40), (2, 2, 90, 40), (2, 2, 90, 24), bm, f"d{density}", causal=causal)
    report = check_case("block_sparse", case, dtype=dtype, device=DEVICE)
    assert report.ok, str(report)


@pytest.mark.parametrize("tile", [(16, 16), (32, 32), (64, 16)])
def test_kernel_tilings(tile):
    bm = random_mask((1, 2, 2, 3), (64, 32), (120, 96), 0.6, seed=7)
    case = _case((1, 2, 120, 32), (1, 2, 96, 32), (1, 2, 96, 32), bm, "tiling", causal=True)
    with force_config(*tile):
        report = check_case("block_sparse", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)


def test_kernel_block_48_not_power_of_two():
    bm = random_mask((1, 1, 3, 3), 48, (130, 130), 0.6, seed=9)
    case = _case((1, 1, 130, 16), (1, 1, 130, 16), (1, 1, 130, 16), bm, "b48", causal=True)
    with force_config(16, 16):
        report = check_case("block_sparse", case, dtype=torch.float16, device=DEVICE)
    assert report.ok, str(report)


def test_kernel_empty_rows_output_zero_lse_inf_zero_grads():
    dense = torch.tensor([[[1, 0, 0], [0, 0, 0], [0, 0, 1]], [[0, 0, 0], [1, 0, 0], [1, 1, 1]]], dtype=torch.bool)
    bm = BlockMask.from_dense(dense, (32, 32), (96, 96))  # per-head masks, row block 1 of head 0 empty
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g).requires_grad_() for _ in range(3))
    out, lse = attnkit.block_sparse_attention(q, k, v, bm, return_lse=True, backend="triton")
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(out[0, 0, 32:64] == 0) and torch.all(out[0, 1, :32] == 0)
    assert torch.all(lse[0, 0, 32:64] == -math.inf) and torch.all(lse[0, 1, :32] == -math.inf)
    assert torch.isfinite(lse[0, 0, :32]).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[0, 0, 32:64] == 0) and torch.all(q.grad[0, 1, :32] == 0)
    # key block 1 of head 0 is listed by no query block: no gradient reaches it
    assert torch.all(k.grad[0, 0, 32:64] == 0) and torch.all(v.grad[0, 0, 32:64] == 0)


def test_kernel_every_pattern():
    g = torch.Generator().manual_seed(0)
    masks = [patterns.local_global_random(128, 32, window=1, global_blocks=1, random_blocks=1, heads=2),
             patterns.strided(128, 32, stride=2, local_blocks=1),
             patterns.radial(4, 32, 32)]
    for bm, causal in zip(masks, (False, True, False)):
        q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
        out = attnkit.block_sparse_attention(q, k, v, bm, causal=causal, backend="triton")
        torch.testing.assert_close(out, dense_attention(q, k, v, token_mask(bm, causal)), atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- patterns

def test_local_global_random_structure():
    bm = patterns.local_global_random(512, 64, window=1, global_blocks=1, random_blocks=2, heads=3, seed=1)
    d = bm.to_dense()[0]
    assert d.shape == (3, 8, 8)
    assert d[:, 0, :].all() and d[:, :, 0].all()                      # global block
    r = torch.arange(8)
    assert d[:, (r[:, None] - r[None, :]).abs() <= 1].all()         # band
    assert (d.sum(-1) >= 3).all()
    assert not torch.equal(d[0], d[1])                              # random blocks differ per head
    causal = patterns.local_global_random(512, 64, window=1, global_blocks=1, random_blocks=2, causal=True)
    assert not causal.to_dense()[0, 0].triu(1).any()
    lf = patterns.longformer(512, 64, window=2, global_blocks=1).to_dense()[0, 0]
    expected = ((r[:, None] - r[None, :]).abs() <= 2) | (r[:, None] == 0) | (r[None, :] == 0)
    assert torch.equal(lf, expected)


def test_strided_structure():
    d = patterns.strided(8 * 16, 16, stride=3, local_blocks=2).to_dense()[0, 0]
    for r in range(8):
        expected = {c for c in range(r + 1) if r - c < 2 or (r - c) % 3 == 0}
        assert set(d[r].nonzero().flatten().tolist()) == expected


def test_radial_structure_and_n_log_n_growth():
    frames, t = 16, 64
    bm = patterns.radial(frames, t, 16)
    d = bm.to_dense()[0, 0].view(frames, 4, frames, 4)               # (frame, block, frame, block)
    assert d[torch.arange(frames), :, torch.arange(frames), :].all()  # own frame fully
    assert d[0, :, 1, :].all()                                       # adjacent frames fully
    assert d[0, :, 8, :].diagonal().all() and not d[0, 0, 8, 3]      # far frames: near the spatial diagonal only
    assert d[8, :, 0, :].all()                                       # the first frame is a sink
    assert d[0, :, 4, :].diagonal().all() and not d[0, 0, 4, 2]      # d = 4: band of 2^7/2^3 = 16 tokens
    assert not d[0, :, 9, :].any() and d[0, :, 10, :].any()          # d in [8, 16): every 2nd frame only
    assert torch.equal(bm.to_dense(), BlockMask.from_mask_fn(patterns.radial_mask_fn(frames, t, min_width=16),
                                                             1, 1, frames * t, frames * t, 16).to_dense())
    # token level: keys per query grow by a bounded amount (about 3-5 T) per doubling of the
    # frames, i.e. logarithmically, not like T * frames (linear: the increments would double)
    t = 32
    kept = []
    for f in (8, 16, 32, 64):
        fn = patterns.radial_mask_fn(f, t)
        idx = torch.arange(f * t)
        kept.append(fn(0, 0, idx[:, None], idx[None, :]).sum().item() / (f * t))
    steps = [b - a for a, b in zip(kept, kept[1:])]
    assert all(0 < s <= 5 * t for s in steps) and steps[-1] < 1.5 * steps[0], kept
    assert kept[-1] < 0.3 * 64 * t  # dense would be 64 * t; the sink frame alone is t


# ----------------------------------------------------------------------------- bad input

def test_bad_block_masks():
    ones = torch.ones(1, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indices holds key block 5 out of range"):
        BlockMask(ones, torch.tensor([[[[5], [0]]]], dtype=torch.int32), 16, (32, 32))
    with pytest.raises(ValueError, match="out of range"):
        BlockMask(ones, torch.tensor([[[[-1], [0]]]], dtype=torch.int32), 16, (32, 32))
    with pytest.raises(ValueError, match=f"key block {2 ** 32} out of range"):  # checked before the int32 cast
        BlockMask(ones, torch.tensor([[[[2 ** 32], [0]]]], dtype=torch.int64), 16, (32, 32))
    with pytest.raises(ValueError, match="listed both as partial"):
        BlockMask(ones, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 16, (32, 32),
                  full_kv_num_blocks=ones, full_kv_indices=torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                  mask_mod=attnkit.mods.causal())
    with pytest.raises(TypeError, match="mask_mod must be an attnkit.MaskMod"):
        BlockMask(ones, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 16, (32, 32), mask_mod=attnkit.mods.softcap(2.0))
    with pytest.raises(ValueError, match="counts must be in"):
        BlockMask(ones * 2, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 16, (32, 32))
    with pytest.raises(ValueError, match="same key block twice"):
        BlockMask(ones * 2, torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, (32, 32))
    with pytest.raises(ValueError, match="block sizes do not match"):
        BlockMask(ones, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 32, (100, 32))
    with pytest.raises(TypeError, match="kv_indices must be an integer tensor"):
        BlockMask(ones, torch.zeros(1, 1, 2, 1), 16, (32, 32))
    with pytest.raises(ValueError, match="block_size entries must be >= 1"):
        BlockMask(ones, torch.zeros(1, 1, 2, 1, dtype=torch.int32), 0, (32, 32))
    with pytest.raises(ValueError, match="block_bool has 2 x 2 blocks"):
        BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16, (100, 32))
    with pytest.raises(TypeError, match="block_bool must be a bool tensor"):
        BlockMask.from_dense(torch.ones(2, 2), 16)
    with pytest.raises(TypeError, match="must return a bool tensor"):
        BlockMask.from_mask_fn(lambda b, h, q, kv: q - kv, None, None, 32, 32, 16)


def test_bad_attention_inputs():
    q = torch.randn(2, 4, 64, 16)
    k = v = torch.randn(2, 2, 64, 16)
    bm = BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 32, (64, 64))
    with pytest.raises(ValueError, match="block_mask was built for seq_lens"):
        attnkit.block_sparse_attention(q[:, :, :40], k, v, bm)
    with pytest.raises(ValueError, match="block_mask has head dim 3"):
        attnkit.block_sparse_attention(q, k, v, BlockMask.from_dense(torch.ones(1, 3, 2, 2, dtype=torch.bool), 32))
    with pytest.raises(ValueError, match="block_mask has batch dim 3"):
        attnkit.block_sparse_attention(q, k, v, BlockMask.from_dense(torch.ones(3, 1, 2, 2, dtype=torch.bool), 32))
    with pytest.raises(TypeError, match="block_mask must be an attnkit.BlockMask"):
        attnkit.block_sparse_attention(q, k, v, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="block_mask is required"):
        attnkit.attention(q, k, v, "block_sparse")
    with pytest.raises(TypeError, match="causal must be a bool"):
        attnkit.block_sparse_attention(q, k, v, bm, causal=1)


def test_small_blocks_fall_back_to_the_torch_backend():
    q = k = v = torch.randn(1, 1, 32, 16)
    bm = BlockMask.from_dense(torch.eye(4, dtype=torch.bool), 8, (32, 32))
    explanation = attnkit.explain(q, k, v, "block_sparse", "auto", block_mask=bm)
    assert explanation.backend == "torch"
    assert any("multiples of 16" in r for r in explanation.kernel_blockers)
    with pytest.raises(ValueError, match="multiples of 16"):
        attnkit.block_sparse_attention(q, k, v, bm, backend="triton")
    out = attnkit.block_sparse_attention(q, k, v, bm)  # auto -> torch
    torch.testing.assert_close(out, dense_attention(q, k, v, token_mask(bm, False)))
