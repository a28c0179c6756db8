"""Block-sparse attention and MoBA: attnkit's kernels against the dense flash kernel
and FlexAttention (compiled) with the same block mask.

GPU: N in {8k, 32k, 128k}, random block masks of density 50 / 10 / 5 % (block 128),
bf16, d = 128, forward. TFLOP/s count only the computed tiles. The issue's target:
at 10 % density and N = 32k, at least 8x faster than dense flash (compare the ``ms``
of ``provider=attnkit`` with ``provider=flash_dense`` in the same run).
MoBA at N = 32k, block 512, top-k 3: the gate (key pooling + top-k + list building)
and the whole call are timed separately; ``gate_share`` is their ratio.
CPU: the references at small sizes, so ``--benchmark-only`` always runs.

    python -m pytest benchmarks/test_block_sparse.py --benchmark-only
"""

import pytest
import torch

import attnkit

from conftest import CUDA, DEVICE, attention_flops, run

BLOCK = 128
if CUDA:
    SEQLENS, DENSITIES, DTYPE, HEAD_DIM = [8192, 32768, 131072], [0.5, 0.1, 0.05], torch.bfloat16, 128
    PROVIDERS = ["attnkit", "flash_dense", "flex"]
else:
    SEQLENS, DENSITIES, DTYPE, HEAD_DIM = [512], [0.5, 0.1], torch.float32, 64
    PROVIDERS = ["attnkit_reference"]


def heads_for(seqlen: int) -> int:
    return max(1, 16 * 8192 // seqlen) if CUDA else 2


def random_block_mask(seqlen: int, heads: int, density: float) -> attnkit.BlockMask:
    """Random per-head block mask; the diagonal tile is always listed (no empty rows)."""
    blocks = seqlen // BLOCK
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(1, heads, blocks, blocks, generator=g) < density
    dense |= torch.eye(blocks, dtype=torch.bool)
    return attnkit.BlockMask.from_dense(dense, BLOCK, (seqlen, seqlen)).to(DEVICE)


@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density{int(d * 100)}")
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_block_sparse(benchmark, provider, seqlen, density):
    heads = heads_for(seqlen)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seqlen, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    bm = random_block_mask(seqlen, heads, density)
    tiles = int(bm.kv_num_blocks.sum())
    pairs = tiles * BLOCK * BLOCK
    if provider == "attnkit":
        bm.engine_lists(False)  # built once, like a model reusing its mask
        fn = lambda: attnkit.block_sparse_attention(q, k, v, bm, backend="triton")  # noqa: E731
    elif provider == "attnkit_reference":
        fn = lambda: attnkit.block_sparse_attention(q, k, v, bm, backend="reference")  # noqa: E731
    elif provider == "flash_dense":
        pairs = heads * seqlen * seqlen
        fn = lambda: attnkit.flash_attention(q, k, v, backend="triton")  # noqa: E731
    elif provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        fbm = bm.to_torch()
        fn = lambda: flex(q, k, v, block_mask=fbm)  # noqa: E731
    else:
        raise ValueError(provider)
    with torch.no_grad():
        run(benchmark, fn, attention_flops(pairs, HEAD_DIM, HEAD_DIM, "fwd"), provider=provider, seqlen=seqlen,
            density=density, heads=heads, tiles=tiles, sparsity=bm.sparsity(), mode="fwd")


MOBA = dict(seqlen=32768, block_size=512, top_k=3, heads=16) if CUDA else dict(seqlen=512, block_size=64, top_k=3,
                                                                                  heads=2)


@pytest.mark.parametrize("part", ["gate", "total"] if CUDA else ["reference"])
def test_moba(benchmark, part):
    from attnkit.block_sparse.moba import list_block_sizes, moba_select, moba_tiles

    n, bs, top_k, heads = MOBA["seqlen"], MOBA["block_size"], MOBA["top_k"], MOBA["heads"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    # pairs MoBA must compute: own block causally + (top_k - 1) full past blocks where available
    pos = torch.arange(n)
    pairs = heads * int((pos % bs + 1 + torch.clamp(pos // bs, max=top_k - 1) * bs).sum())
    if part == "gate":
        def fn():
            sel = moba_select(q, k, bs, top_k)
            return moba_tiles(sel, n, n, bs, *list_block_sizes(bs))
    elif part == "total":
        fn = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="triton")  # noqa: E731
    else:
        fn = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="reference")  # noqa: E731
    with torch.no_grad():
        run(benchmark, fn, attention_flops(pairs, HEAD_DIM, HEAD_DIM, "fwd"), part=part, seqlen=n, block_size=bs,
            top_k=top_k, heads=heads, mode="fwd")
