"""Linear / lightning attention: attnkit's chunked Triton engine against the flash kernel
(causal) and flash-linear-attention's ``chunk_simple_gla`` when installed.

GPU: a fixed budget of 128k tokens per call (B = 128k / N), N from 1k to 128k, bf16,
H = 16, D = Dv = 128, forward and forward+backward; ``tokens_per_s`` goes into
``benchmark.extra_info``. Lightning Attention's claim is constant speed: tokens/s should
stay within +-15% across N (the flash kernel's falls as N grows). Targets: >= 1.0x fla,
faster than flash causal from N = 4k. CPU: the reference (chunked form) and the
interpreter-free parts at small sizes, so ``--benchmark-only`` always runs.
Packed varlen (``test_lightning_varlen``): 16 sequences of mixed lengths (64k tokens on a
GPU) with ``cu_seqlens``, against the padded-free batch of the same tokens (16 equal
sequences: the cost varlen should match), the batch padded to the longest sequence, and
flash-linear-attention's ``chunk_simple_gla`` with its ``cu_seqlens`` when installed.

Run: ``python -m pytest benchmarks/test_linear.py --benchmark-only``.
"""

import pytest
import torch
from conftest import CUDA, DEVICE, has_module, mixed_lengths, run, with_backward

import attnkit

if CUDA:
    TOTAL_TOKENS, HEADS, HEAD_DIM, DTYPE = 128 * 1024, 16, 128, torch.bfloat16
    SEQLENS = [1024, 4096, 16384, 65536, 131072]
    PROVIDERS = ["attnkit_lightning", "flash_causal"] + (["fla_simple_gla"] if has_module("fla") else [])
else:
    TOTAL_TOKENS, HEADS, HEAD_DIM, DTYPE = 2048, 2, 32, torch.float32
    SEQLENS = [256, 1024]
    PROVIDERS = ["attnkit_reference"]


def make_call(provider, q, k, v, slopes):
    if provider == "attnkit_lightning":
        return lambda: attnkit.lightning_attention(q, k, v, slopes, backend="triton")
    if provider == "attnkit_reference":
        return lambda: attnkit.lightning_attention(q, k, v, slopes, backend="reference")
    if provider == "flash_causal":
        return lambda: attnkit.flash_attention(q, k, v, causal=True, backend="triton")
    if provider == "fla_simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla

        qt, kt, vt = (x.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad) for x in (q, k, v))
        g_gamma = -slopes.float()

        def call():  # fla layout (B, T, H, D); same math: scale 1, log-decay g_gamma = -slopes
            out, _ = chunk_simple_gla(qt, kt, vt, g_gamma=g_gamma, scale=1.0)
            return out

        return call
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lightning_constant_speed(benchmark, provider, seqlen, mode):
    batch = max(1, TOTAL_TOKENS // seqlen)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    # modest magnitudes so that undecayed sums stay in range at 128k tokens
    q, k, v = (0.1 * torch.randn(batch, HEADS, seqlen, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g)
               for _ in range(3))
    q, k, v = (x.requires_grad_(mode != "fwd") for x in (q, k, v))
    slopes = attnkit.lightning_slopes(HEADS).to(DEVICE)
    call = make_call(provider, q, k, v, slopes)
    info = {"provider": provider, "seqlen": seqlen, "batch": batch, "heads": HEADS, "head_dim": HEAD_DIM, "mode": mode}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, **info)
    else:
        out = call()
        grad = torch.randn_like(out[0] if isinstance(out, tuple) else out)
        run(benchmark, with_backward(call, grad), **info)
    benchmark.extra_info["tokens_per_s"] = batch * seqlen / (benchmark.extra_info["ms"] * 1e-3)


@pytest.mark.parametrize("seqlen", [1024] if not CUDA else [4096])
def test_decoding_step(benchmark, seqlen):
    """One decoding step (N = 1) with a state: the recurrent fast path (reference on CPU)."""
    batch = 8 if CUDA else 2
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, 1, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(3))
    state = torch.randn(batch, HEADS, HEAD_DIM, HEAD_DIM, device=DEVICE, generator=g)
    slopes = attnkit.lightning_slopes(HEADS).to(DEVICE)
    backend = "triton" if CUDA else "reference"
    with torch.no_grad():
        run(benchmark, lambda: attnkit.lightning_attention(q, k, v, slopes, initial_state=state, return_state=True,
                                                           backend=backend),
            provider=f"attnkit_{backend}", batch=batch, heads=HEADS, head_dim=HEAD_DIM)
    benchmark.extra_info["tokens_per_s"] = batch / (benchmark.extra_info["ms"] * 1e-3)


VARLEN_TOKENS, VARLEN_SEQS = (65536, 16) if CUDA else (2048, 16)
VARLEN_PROVIDERS = (["attnkit_varlen", "attnkit_equal_batch", "attnkit_padded"]
                    + (["fla_simple_gla_varlen"] if has_module("fla") else [])) if CUDA else \
    ["attnkit_varlen_reference", "attnkit_equal_batch_reference", "attnkit_padded_reference"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
def test_lightning_varlen(benchmark, provider, mode):
    """Packed sequences (B = 1, cu_seqlens, one state per sequence) against the same tokens as
    16 equal sequences, as 16 sequences padded to the longest, and fla's varlen."""
    lengths = mixed_lengths(VARLEN_TOKENS, VARLEN_SEQS)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return (0.1 * torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g)).requires_grad_(mode != "fwd")

    slopes = attnkit.lightning_slopes(HEADS).to(DEVICE)
    backend = "reference" if provider.endswith("_reference") else "triton"
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    if provider.startswith("attnkit_varlen"):
        q, k, v = (rand(1, HEADS, VARLEN_TOKENS, HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend=backend)
    elif provider.startswith("attnkit_equal_batch"):
        q, k, v = (rand(VARLEN_SEQS, HEADS, VARLEN_TOKENS // VARLEN_SEQS, HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.lightning_attention(q, k, v, slopes, backend=backend)
    elif provider.startswith("attnkit_padded"):   # right padding: causal, so the real tokens are exact
        q, k, v = (rand(VARLEN_SEQS, HEADS, max(lengths), HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.lightning_attention(q, k, v, slopes, backend=backend)
    elif provider == "fla_simple_gla_varlen":     # fla layout (1, T, H, D), int64 offsets
        from fla.ops.simple_gla import chunk_simple_gla

        q, k, v = (rand(1, VARLEN_TOKENS, HEADS, HEAD_DIM) for _ in range(3))
        call = lambda: chunk_simple_gla(q, k, v, g_gamma=-slopes.float(), scale=1.0,
                                        cu_seqlens=cu.long())[0]
    else:
        raise ValueError(provider)
    info = {"provider": provider, "tokens": VARLEN_TOKENS, "sequences": VARLEN_SEQS, "longest": max(lengths),
                "heads": HEADS, "head_dim": HEAD_DIM, "mode": mode}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(call())), **info)
    benchmark.extra_info["tokens_per_s"] = VARLEN_TOKENS / (benchmark.extra_info["ms"] * 1e-3)
