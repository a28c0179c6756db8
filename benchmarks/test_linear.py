"""Linear-attention variants: attnkit's chunked Triton engines against the flash kernel
(causal) and flash-linear-attention's ops when installed.

``test_linear_constant_speed``: every linear variant — linear, lightning, gla with a scalar
gate per token (Mamba-2/SSD, simple GLA), gla with per-channel gates, the gated delta rule —
at a fixed budget of 128k tokens per call (B = 128k / N), N from 1k to 128k, bf16, H = 16,
D = Dv = 128, forward and forward+backward; ``tokens_per_s`` goes into
``benchmark.extra_info``. Each variant's anchor is flash-linear-attention's op of the same
math on the same tensors (layout (B, T, H, D), copied outside the timed call):
``chunk_simple_gla`` (linear: no gate; lightning: ``g_gamma``; gla scalar: ``g``),
``chunk_gla`` and ``chunk_gated_delta_rule``; and the flash kernel, causal, on the same
q, k, v. Targets: tokens/s flat within +-15% across N for every variant (the flash kernel's
falls as N grows), >= 1.0x flash-linear-attention, faster than flash causal from N = 4k.
CPU: the torch backend at small sizes, so ``--benchmark-only`` always runs.
Packed varlen (``test_lightning_varlen``): 16 sequences of mixed lengths (64k tokens on a
GPU) with ``cu_seqlens``, against the padded-free batch of the same tokens (16 equal
sequences: the cost varlen should match), the batch padded to the longest sequence, and
flash-linear-attention's ``chunk_simple_gla`` with its ``cu_seqlens`` when installed.

Run: ``python -m pytest benchmarks/test_linear.py --benchmark-only``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, DEVICE, has_module, mixed_lengths, run, with_backward

import attnkit

if CUDA:
    TOTAL_TOKENS, HEADS, HEAD_DIM, DTYPE = 128 * 1024, 16, 128, torch.bfloat16
    SEQLENS = [1024, 4096, 16384, 65536, 131072]
    PROVIDERS = ["attnkit"] + (["fla"] if has_module("fla") else [])
else:
    TOTAL_TOKENS, HEADS, HEAD_DIM, DTYPE = 2048, 2, 32, torch.float32
    SEQLENS = [256, 1024]
    PROVIDERS = ["attnkit"]
BACKEND = "triton" if CUDA else "torch"
#: variant -> flash-linear-attention's op of the same math
FLA_OPS = {"linear": "chunk_simple_gla", "lightning": "chunk_simple_gla", "gla_scalar": "chunk_simple_gla",
           "gla": "chunk_gla", "delta_rule": "chunk_gated_delta_rule"}
CASES = [(variant, provider) for variant in FLA_OPS for provider in PROVIDERS] + [("flash", "flash_causal")]


def linear_inputs(variant: str, batch: int, seqlen: int, requires_grad: bool) -> dict:
    """The variant's tensors (B, H, N, ...): modest magnitudes so that undecayed sums stay in
    range at 128k tokens; gates as the layers make them (logsigmoid / 16); the delta rule with
    L2-normalised q, k and a sigmoid beta."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape, scale=0.1):
        return scale * torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g)

    shape = (batch, HEADS, seqlen, HEAD_DIM)
    x = {"q": rand(*shape), "k": rand(*shape), "v": rand(*shape)}
    if variant == "lightning":
        x["slopes"] = attnkit.lightning_slopes(HEADS).to(DEVICE)
    elif variant == "gla_scalar":
        x["g"] = F.logsigmoid(rand(*shape[:3], scale=1.0)) / 16
    elif variant == "gla":
        x["g"] = F.logsigmoid(rand(*shape, scale=1.0)) / 16
    elif variant == "delta_rule":
        x["q"], x["k"] = (F.normalize(x[n].float(), dim=-1).to(DTYPE) for n in ("q", "k"))
        x["beta"] = torch.sigmoid(rand(*shape[:3], scale=1.0))
        x["g"] = F.logsigmoid(rand(*shape[:3], scale=1.0)) / 16
    for name, t in x.items():
        if name != "slopes":
            x[name] = t.detach().requires_grad_(requires_grad and t.is_floating_point())
    return x


def make_call(variant: str, provider: str, x: dict):
    q, k, v = x["q"], x["k"], x["v"]
    if provider == "flash_causal":
        return lambda: attnkit.flash_attention(q, k, v, causal=True, backend=BACKEND)
    if provider == "attnkit":
        if variant == "linear":
            return lambda: attnkit.linear_attention(q, k, v, scale=1.0, backend=BACKEND)
        if variant == "lightning":
            return lambda: attnkit.lightning_attention(q, k, v, x["slopes"], backend=BACKEND)
        if variant in ("gla", "gla_scalar"):
            return lambda: attnkit.gated_linear_attention(q, k, v, x["g"], scale=1.0, backend=BACKEND)
        return lambda: attnkit.delta_rule_attention(q, k, v, x["beta"], g=x["g"], scale=1.0, backend=BACKEND)
    if provider == "fla":
        import importlib

        module = {"chunk_simple_gla": "fla.ops.simple_gla", "chunk_gla": "fla.ops.gla",
                  "chunk_gated_delta_rule": "fla.ops.gated_delta_rule"}[FLA_OPS[variant]]
        op = getattr(importlib.import_module(module), FLA_OPS[variant])
        # fla's layout (B, T, H, D), copied once outside the timed call; the same math: scale 1
        t = {n: (y.transpose(1, 2).contiguous().detach().requires_grad_(y.requires_grad) if y.dim() >= 3 else y)
             for n, y in x.items()}
        if variant == "linear":
            return lambda: op(t["q"], t["k"], t["v"], scale=1.0)[0]
        if variant == "lightning":
            return lambda: op(t["q"], t["k"], t["v"], g_gamma=-x["slopes"].float(), scale=1.0)[0]
        if variant in ("gla", "gla_scalar"):
            return lambda: op(t["q"], t["k"], t["v"], t["g"], scale=1.0)[0]
        return lambda: op(t["q"], t["k"], t["v"], t["g"], t["beta"], scale=1.0)[0]
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("variant,provider", CASES, ids=[f"{v}-{p}" for v, p in CASES])
def test_linear_constant_speed(benchmark, variant, provider, seqlen, mode):
    batch = max(1, TOTAL_TOKENS // seqlen)
    x = linear_inputs("linear" if variant == "flash" else variant, batch, seqlen, mode != "fwd")
    call = make_call(variant, provider, x)
    info = {"variant": variant, "provider": provider, "seqlen": seqlen, "batch": batch, "heads": HEADS,
            "head_dim": HEAD_DIM, "mode": mode}
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
