"""Block-sparse attention and MoBA: attnkit's kernels against the dense flash kernel
and FlexAttention (compiled) with the same block mask.

GPU: N in {8k, 32k, 128k}, random block masks of density 50 / 10 / 5 % (block 128),
bf16, d = 128, forward. TFLOP/s count only the computed tiles. The issue's target:
at 10 % density and N = 32k, at least 8x faster than dense flash (compare the ``ms``
of ``provider=attnkit`` with ``provider=flash_dense`` in the same run).
MoBA at N = 32k, block 512, top-k 3: the gate (key pooling + top-k + list building)
and the whole call are timed separately; ``gate_share`` is their ratio.
MoBA packed varlen (``test_moba_varlen``): 16 sequences of mixed lengths (64k tokens on a
GPU) with cu_seqlens against 16 equal sequences of the same tokens (what varlen should
cost), and dense causal baselines on the same sequences: SDPA padded to the longest and
flash-attn's varlen when installed (neither has MoBA's selection).
CPU: the references at small sizes, so ``--benchmark-only`` always runs.

    python -m pytest benchmarks/test_block_sparse.py --benchmark-only
"""

import pytest
import torch
from conftest import (
    CUDA,
    DEVICE,
    attention_flops,
    causal_pairs,
    has_module,
    mixed_lengths,
    run,
    with_backward,
)

import attnkit

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
        fn = lambda: attnkit.block_sparse_attention(q, k, v, bm, backend="triton")
    elif provider == "attnkit_reference":
        fn = lambda: attnkit.block_sparse_attention(q, k, v, bm, backend="reference")
    elif provider == "flash_dense":
        pairs = heads * seqlen * seqlen
        fn = lambda: attnkit.flash_attention(q, k, v, backend="triton")
    elif provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        fbm = bm.to_torch()
        fn = lambda: flex(q, k, v, block_mask=fbm)
    else:
        raise ValueError(provider)
    with torch.no_grad():
        run(benchmark, fn, attention_flops(pairs, HEAD_DIM, HEAD_DIM, "fwd"), provider=provider, seqlen=seqlen,
            density=density, heads=heads, tiles=tiles, sparsity=bm.sparsity(), mode="fwd")


MOBA = {"seqlen": 32768, "block_size": 512, "top_k": 3, "heads": 16} if CUDA else \
    {"seqlen": 512, "block_size": 64, "top_k": 3, "heads": 2}


def moba_pairs(seqlen: int, block_size: int, top_k: int) -> int:
    """(query, key) pairs MoBA computes in one sequence: the own block causally plus
    (top_k - 1) complete past blocks where available."""
    pos = torch.arange(seqlen)
    return int((pos % block_size + 1 + torch.clamp(pos // block_size, max=top_k - 1) * block_size).sum())


@pytest.mark.parametrize("part", ["gate", "total"] if CUDA else ["reference"])
def test_moba(benchmark, part):
    from attnkit.block_sparse.moba import list_block_sizes, moba_select, moba_tiles

    n, bs, top_k, heads = MOBA["seqlen"], MOBA["block_size"], MOBA["top_k"], MOBA["heads"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    pairs = heads * moba_pairs(n, bs, top_k)
    if part == "gate":
        def fn():
            sel = moba_select(q, k, bs, top_k)
            return moba_tiles(sel, n, n, bs, *list_block_sizes(bs))
    elif part == "total":
        fn = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="triton")
    else:
        fn = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="reference")
    with torch.no_grad():
        run(benchmark, fn, attention_flops(pairs, HEAD_DIM, HEAD_DIM, "fwd"), part=part, seqlen=n, block_size=bs,
            top_k=top_k, heads=heads, mode="fwd")


MOBA_VARLEN = {"tokens": 65536, "seqs": 16, "block_size": 512, "top_k": 3, "heads": 16} if CUDA else \
    {"tokens": 2048, "seqs": 16, "block_size": 64, "top_k": 3, "heads": 2}
MOBA_VARLEN_PROVIDERS = (["attnkit_varlen", "attnkit_equal_batch", "sdpa_padded_causal"]
                         + (["flash_attn_varlen_causal"] if has_module("flash_attn") else [])) if CUDA else \
    ["attnkit_varlen_reference", "attnkit_equal_batch_reference", "sdpa_padded_causal"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", MOBA_VARLEN_PROVIDERS)
def test_moba_varlen(benchmark, provider, mode):
    tokens, seqs, bs, top_k, heads = (MOBA_VARLEN[key] for key in ("tokens", "seqs", "block_size", "top_k", "heads"))
    lengths = mixed_lengths(tokens, seqs)
    grad = mode != "fwd"
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=grad)

    backend = "reference" if provider.endswith("_reference") else "triton"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    if provider.startswith("attnkit_varlen"):
        q, k, v = (rand(1, heads, tokens, HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k,
                                              cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
        pairs = sum(moba_pairs(n, bs, top_k) for n in lengths)
    elif provider.startswith("attnkit_equal_batch"):
        n = tokens // seqs
        q, k, v = (rand(seqs, heads, n, HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.moba_attention(q, k, v, block_size=bs, top_k=top_k, backend=backend)
        pairs = seqs * moba_pairs(n, bs, top_k)
    elif provider == "sdpa_padded_causal":  # dense causal on the padded batch (no MoBA selection)
        longest = max(lengths)
        q, k, v = (rand(seqs, heads, longest, HEAD_DIM) for _ in range(3))
        i = torch.arange(longest, device=DEVICE)
        n = torch.tensor(lengths, device=DEVICE).view(-1, 1, 1, 1)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] < n) & (i[:, None] < n)   # (S, 1, L, L)
        call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        pairs = sum(causal_pairs(n, n) for n in lengths)
    elif provider == "flash_attn_varlen_causal":  # dense causal (no MoBA selection)
        from flash_attn import flash_attn_varlen_func

        q, k, v = (rand(tokens, heads, HEAD_DIM) for _ in range(3))
        call = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
        pairs = sum(causal_pairs(n, n) for n in lengths)
    else:
        raise ValueError(provider)
    flops = heads * attention_flops(pairs, HEAD_DIM, HEAD_DIM, mode)
    info = {"provider": provider, "tokens": tokens, "sequences": seqs, "longest": max(lengths), "block_size": bs,
            "top_k": top_k, "heads": heads, "head_dim": HEAD_DIM, "mode": mode, "visited_pairs": pairs}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(call())), flops, **info)
