"""Flash attention: attnkit's Triton kernel against torch SDPA (flash backend),
FlexAttention (compiled) and flash-attn when installed.

GPU: N in {1k, 4k, 16k} with 16k tokens per batch, d in {64, 128}, H = 2048 / d,
causal on/off, bf16, forward and forward+backward. Packed varlen (``test_flash_varlen``): 16
causal sequences of mixed lengths (64k tokens, d = 128 on a GPU) with cu_seqlens, against 16
equal sequences of the same tokens, SDPA padded to the longest, and flash-attn's varlen.
CPU: attnkit's reference against SDPA at small sizes.
Run: ``python -m pytest benchmarks/test_flash.py --benchmark-only``.
"""

import pytest
import torch
import torch.nn.functional as F

import attnkit

from conftest import CUDA, DEVICE, attention_flops, causal_pairs, has_module, mixed_lengths, run, with_backward

if CUDA:
    SEQLENS, HEAD_DIMS, DTYPE = [1024, 4096, 16384], [64, 128], torch.bfloat16
    PROVIDERS = ["attnkit", "sdpa", "flex"] + (["flash_attn"] if has_module("flash_attn") else [])
else:
    SEQLENS, HEAD_DIMS, DTYPE = [256, 512], [64], torch.float32
    PROVIDERS = ["attnkit_reference", "sdpa"]


def make_call(provider, q, k, v, causal):
    if provider == "attnkit":
        return lambda: attnkit.flash_attention(q, k, v, causal=causal, backend="triton")
    if provider == "attnkit_reference":
        return lambda: attnkit.flash_attention(q, k, v, causal=causal, backend="reference")
    if provider == "sdpa":
        if CUDA:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def call():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            return call
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, q.shape[2], k.shape[2], device=DEVICE)
        return lambda: flex(q, k, v, block_mask=mask)
    if provider == "flash_attn":
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return lambda: flash_attn_func(qt, kt, vt, causal=causal)
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_flash(benchmark, provider, seqlen, head_dim, causal, mode):
    batch = max(1, 16384 // seqlen) if CUDA else 1
    heads = 2048 // head_dim if CUDA else 4
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=DEVICE, dtype=DTYPE, generator=g,
                           requires_grad=mode != "fwd") for _ in range(3))
    call = make_call(provider, q, k, v, causal)
    pairs = causal_pairs(seqlen, seqlen) if causal else seqlen * seqlen
    flops = batch * heads * attention_flops(pairs, head_dim, head_dim, mode)
    if mode == "fwd":
        with torch.no_grad():
            fn = call
            run(benchmark, fn, flops, provider=provider, seqlen=seqlen, head_dim=head_dim, causal=causal, mode=mode)
    else:
        grad = torch.randn_like(q)
        run(benchmark, with_backward(call, grad), flops, provider=provider, seqlen=seqlen, head_dim=head_dim,
            causal=causal, mode=mode)


def make_dropout_call(provider, q, k, v, dropout_p):
    """Causal attention with attention dropout (training): attnkit's kernel (reference on CPU),
    SDPA's flash backend and flash-attn draw their masks from their own generators."""
    if provider in ("attnkit", "attnkit_reference"):
        backend = "triton" if provider == "attnkit" else "reference"
        return lambda: attnkit.flash_attention(q, k, v, causal=True, dropout_p=dropout_p, backend=backend)
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if provider == "flash_attn":
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return lambda: flash_attn_func(qt, kt, vt, dropout_p=dropout_p, causal=True)
    raise ValueError(provider)


DROPOUT_PROVIDERS = [p for p in PROVIDERS if p != "flex"]  # FlexAttention has no attention dropout


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("provider", DROPOUT_PROVIDERS)
def test_flash_dropout(benchmark, provider, dropout_p):
    """The cost of attention dropout (forward + backward, causal, d = 128 on a GPU): the
    kernel regenerates its keep bits from a hash in both passes instead of storing a mask."""
    seqlen, head_dim = (4096, 128) if CUDA else (256, 64)
    batch, heads = (4, 16) if CUDA else (1, 4)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=DEVICE, dtype=DTYPE, generator=g,
                           requires_grad=True) for _ in range(3))
    call = make_dropout_call(provider, q, k, v, dropout_p)
    flops = batch * heads * attention_flops(causal_pairs(seqlen, seqlen), head_dim, head_dim, "fwd+bwd")
    run(benchmark, with_backward(call, torch.randn_like(q)), flops, provider=provider, seqlen=seqlen,
        head_dim=head_dim, dropout_p=dropout_p, mode="fwd+bwd")


# ---------------------------------------------------------------------------------------------
# Packed variable-length batches: 16 sequences of mixed lengths (64k tokens on a GPU, d = 128)
# run packed with cu_seqlens, against the padded-free batch of the same tokens (16 equal
# sequences: the cost varlen should match), torch SDPA on the batch padded to the longest
# sequence (causal plus a key-padding mask), and flash-attn's varlen when installed.
# ---------------------------------------------------------------------------------------------
VARLEN_TOKENS, VARLEN_SEQS, VARLEN_HEADS, VARLEN_HEAD_DIM = (65536, 16, 16, 128) if CUDA else (2048, 16, 4, 64)
VARLEN_PROVIDERS = (["attnkit_varlen", "attnkit_equal_batch", "sdpa_padded"]
                    + (["flash_attn_varlen"] if has_module("flash_attn") else [])) if CUDA else \
    ["attnkit_varlen_reference", "attnkit_equal_batch_reference", "sdpa_padded"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
def test_flash_varlen(benchmark, provider, mode):
    lengths = mixed_lengths(VARLEN_TOKENS, VARLEN_SEQS)
    heads, head_dim = VARLEN_HEADS, VARLEN_HEAD_DIM
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=mode != "fwd")

    backend = "reference" if provider.endswith("_reference") else "triton"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    pairs = sum(causal_pairs(n, n) for n in lengths)
    if provider.startswith("attnkit_varlen"):
        q, k, v = (rand(1, heads, VARLEN_TOKENS, head_dim) for _ in range(3))
        call = lambda: attnkit.flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                               backend=backend)
    elif provider.startswith("attnkit_equal_batch"):
        n = VARLEN_TOKENS // VARLEN_SEQS
        q, k, v = (rand(VARLEN_SEQS, heads, n, head_dim) for _ in range(3))
        call = lambda: attnkit.flash_attention(q, k, v, causal=True, backend=backend)
        pairs = VARLEN_SEQS * causal_pairs(n, n)
    elif provider == "sdpa_padded":
        longest = max(lengths)
        q, k, v = (rand(VARLEN_SEQS, heads, longest, head_dim) for _ in range(3))
        i = torch.arange(longest, device=DEVICE)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] < torch.tensor(lengths, device=DEVICE).view(-1, 1, 1, 1))
        call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    elif provider == "flash_attn_varlen":
        from flash_attn import flash_attn_varlen_func

        q, k, v = (rand(VARLEN_TOKENS, heads, head_dim) for _ in range(3))
        call = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    else:
        raise ValueError(provider)
    flops = heads * attention_flops(pairs, head_dim, head_dim, mode)
    info = {"provider": provider, "tokens": VARLEN_TOKENS, "sequences": VARLEN_SEQS, "longest": max(lengths),
            "head_dim": head_dim, "mode": mode, "visited_pairs": pairs}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(call())), flops, **info)
