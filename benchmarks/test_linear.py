"""Linear / lightning attention: attnkit's chunked Triton engine against the flash kernel
(causal) and flash-linear-attention's ``chunk_simple_gla`` when installed.

GPU: a fixed budget of 128k tokens per call (B = 128k / N), N from 1k to 128k, bf16,
H = 16, D = Dv = 128, forward and forward+backward; ``tokens_per_s`` goes into
``benchmark.extra_info``. Lightning Attention's claim is constant speed: tokens/s should
stay within +-15% across N (the flash kernel's falls as N grows). Targets: >= 1.0x fla,
faster than flash causal from N = 4k. CPU: the reference (chunked form) and the
interpreter-free parts at small sizes, so ``--benchmark-only`` always runs.

Run: ``python -m pytest benchmarks/test_linear.py --benchmark-only``.
"""

import pytest
import torch

import attnkit

from conftest import CUDA, DEVICE, has_module, run, with_backward

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
    info = dict(provider=provider, seqlen=seqlen, batch=batch, heads=HEADS, head_dim=HEAD_DIM, mode=mode)
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
