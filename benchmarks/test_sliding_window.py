"""Sliding-window attention: attnkit's kernel against the dense causal flash kernel,
FlexAttention with a sliding-window block mask (compiled), and flash-attn's
``window_size`` when installed.

GPU: N in {4k, 16k, 64k}, W in {512, 4096}, 4 sinks, bf16, d = 128, H = 16, 64k tokens
per batch, forward and forward+backward. TFLOP/s count only the visited pairs
(``window_pairs``), so "attnkit sliding_window TFLOP/s / attnkit flash causal TFLOP/s"
is the issue's efficiency target (>= 0.85), and the ms ratio is the speedup over dense.
Packed varlen (``test_sliding_window_varlen``): 16 sequences of mixed lengths (64k tokens on a
GPU) with cu_seqlens, against 16 equal sequences of the same tokens, SDPA padded to the
longest sequence, and flash-attn's varlen when installed.
CPU: the reference and the decode cache at small sizes (timings only show the suite runs).
Run: ``python -m pytest benchmarks/test_sliding_window.py --benchmark-only``.
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

SINKS = 4


def window_pairs(seqlen: int, window: int, sinks: int) -> int:
    """Visible (query, key) pairs of window (W - 1, 0) plus ``sinks`` sinks, Nq = Nk = seqlen."""
    i = torch.arange(seqlen)
    in_window = torch.minimum(i + 1, torch.tensor(window))
    extra_sinks = (torch.minimum(torch.tensor(sinks), i - window + 1)).clamp(min=0)
    return int((in_window + extra_sinks).sum())


if CUDA:
    SEQLENS, WINDOWS, HEAD_DIM, HEADS, DTYPE = [4096, 16384, 65536], [512, 4096], 128, 16, torch.bfloat16
    PROVIDERS = ["attnkit", "attnkit_flash_causal", "flex"] + (["flash_attn"] if has_module("flash_attn") else [])
else:
    SEQLENS, WINDOWS, HEAD_DIM, HEADS, DTYPE = [1024, 4096], [128], 64, 4, torch.float32
    PROVIDERS = ["attnkit_reference", "attnkit_flash_causal_reference"]


def make_call(provider, q, k, v, window):
    if provider in ("attnkit", "attnkit_reference"):
        backend = "triton" if provider == "attnkit" else "reference"
        return lambda: attnkit.sliding_window_attention(q, k, v, window=window, sinks=SINKS, backend=backend)
    if provider in ("attnkit_flash_causal", "attnkit_flash_causal_reference"):
        backend = "triton" if provider == "attnkit_flash_causal" else "reference"
        return lambda: attnkit.flash_attention(q, k, v, causal=True, backend=backend)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, i, j):
            return (j <= i) & ((i - j < window) | (j < SINKS))

        flex = torch.compile(flex_attention, dynamic=False)
        mask = create_block_mask(mask_mod, None, None, q.shape[2], k.shape[2], device=DEVICE)
        return lambda: flex(q, k, v, block_mask=mask)
    if provider == "flash_attn":  # no sinks in flash-attn: timed with the window alone
        from flash_attn import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return lambda: flash_attn_func(qt, kt, vt, causal=True, window_size=(window - 1, 0))
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sliding_window(benchmark, provider, seqlen, window, mode):
    batch = max(1, 65536 // seqlen) if CUDA else 1
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, seqlen, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=g,
                           requires_grad=mode != "fwd") for _ in range(3))
    call = make_call(provider, q, k, v, window)
    dense = "flash_causal" in provider
    pairs = causal_pairs(seqlen, seqlen) if dense else window_pairs(seqlen, window, SINKS)
    flops = batch * HEADS * attention_flops(pairs, HEAD_DIM, HEAD_DIM, mode)
    info = {"provider": provider, "seqlen": seqlen, "window": window, "sinks": 0 if dense else SINKS,
            "head_dim": HEAD_DIM, "mode": mode, "visited_pairs": pairs}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(q)), flops, **info)


# ---------------------------------------------------------------------------------------------
# Packed variable-length batches: 16 sequences of mixed lengths (64k tokens on a GPU) run
# packed with cu_seqlens, against the padded-free batch of the same tokens (16 equal
# sequences: the cost varlen should match), torch SDPA on the batch padded to the longest
# sequence with the window as a boolean mask, and flash-attn's varlen when installed.
# ---------------------------------------------------------------------------------------------
VARLEN_TOKENS, VARLEN_SEQS, VARLEN_WINDOW = (65536, 16, 4096) if CUDA else (2048, 16, 128)
VARLEN_PROVIDERS = (["attnkit_varlen", "attnkit_equal_batch", "sdpa_padded"]
                    + (["flash_attn_varlen"] if has_module("flash_attn") else [])) if CUDA else \
    ["attnkit_varlen_reference", "attnkit_equal_batch_reference", "sdpa_padded"]


def _padded_window_mask(lengths: list, window: int) -> torch.Tensor:
    """(S, 1, L, L) bool: the window (W - 1, 0) with sinks inside each sequence, padding keys
    masked (padding rows keep their window, so no row is empty and no NaN appears)."""
    longest = max(lengths)
    i = torch.arange(longest, device=DEVICE)[:, None]
    j = torch.arange(longest, device=DEVICE)[None, :]
    local = (j <= i) & ((j > i - window) | (j < SINKS))
    n = torch.tensor(lengths, device=DEVICE).view(-1, 1, 1, 1)
    return local & (j < n)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", VARLEN_PROVIDERS)
def test_sliding_window_varlen(benchmark, provider, mode):
    lengths = mixed_lengths(VARLEN_TOKENS, VARLEN_SEQS)
    grad = mode != "fwd"
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g, requires_grad=grad)

    backend = "reference" if provider.endswith("_reference") else "triton"
    if provider.startswith("attnkit_varlen"):
        q, k, v = (rand(1, HEADS, VARLEN_TOKENS, HEAD_DIM) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        call = lambda: attnkit.sliding_window_attention(q, k, v, window=VARLEN_WINDOW, sinks=SINKS,
                                                        cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
        pairs = sum(window_pairs(n, VARLEN_WINDOW, SINKS) for n in lengths)
    elif provider.startswith("attnkit_equal_batch"):
        n = VARLEN_TOKENS // VARLEN_SEQS
        q, k, v = (rand(VARLEN_SEQS, HEADS, n, HEAD_DIM) for _ in range(3))
        call = lambda: attnkit.sliding_window_attention(q, k, v, window=VARLEN_WINDOW, sinks=SINKS,
                                                        backend=backend)
        pairs = VARLEN_SEQS * window_pairs(n, VARLEN_WINDOW, SINKS)
    elif provider == "sdpa_padded":
        longest = max(lengths)
        q, k, v = (rand(VARLEN_SEQS, HEADS, longest, HEAD_DIM) for _ in range(3))
        mask = _padded_window_mask(lengths, VARLEN_WINDOW)
        call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        pairs = sum(window_pairs(n, VARLEN_WINDOW, SINKS) for n in lengths)
    elif provider == "flash_attn_varlen":  # no sinks in flash-attn: timed with the window alone
        from flash_attn import flash_attn_varlen_func

        q, k, v = (rand(VARLEN_TOKENS, HEADS, HEAD_DIM) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        call = lambda: flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                              window_size=(VARLEN_WINDOW - 1, 0))
        pairs = sum(window_pairs(n, VARLEN_WINDOW, 0) for n in lengths)
    else:
        raise ValueError(provider)
    flops = HEADS * attention_flops(pairs, HEAD_DIM, HEAD_DIM, mode)
    info = {"provider": provider, "tokens": VARLEN_TOKENS, "sequences": VARLEN_SEQS, "longest": max(lengths),
            "window": VARLEN_WINDOW, "sinks": SINKS, "head_dim": HEAD_DIM, "mode": mode, "visited_pairs": pairs}
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        run(benchmark, with_backward(call, torch.randn_like(call())), flops, **info)


DECODE_WINDOW = 4096 if CUDA else 256


@pytest.mark.parametrize("backend", ["triton"] if CUDA else ["reference"])
def test_sliding_window_decode(benchmark, backend):
    """One decode step through SlidingWindowCache with a full ring; tokens/s in extra_info."""
    batch, heads_q, heads_kv = (16, 32, 8) if CUDA else (1, 8, 2)
    head_dim = HEAD_DIM
    cache = attnkit.SlidingWindowCache(DECODE_WINDOW, sinks=SINKS)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(h, n):
        return torch.randn(batch, h, n, head_dim, device=DEVICE, dtype=DTYPE, generator=g)

    with torch.no_grad():
        fill = DECODE_WINDOW + SINKS + 7
        cache.attend(rand(heads_q, fill), rand(heads_kv, fill), rand(heads_kv, fill), backend=backend)
        q1, k1, v1 = rand(heads_q, 1), rand(heads_kv, 1), rand(heads_kv, 1)
        step = lambda: cache.attend(q1, k1, v1, backend=backend)
        run(benchmark, step, None, backend=backend, window=DECODE_WINDOW, sinks=SINKS, batch=batch,
            cache_bytes=cache.memory_bytes)
    benchmark.extra_info["tokens_per_s"] = batch / (benchmark.extra_info["ms"] / 1e3)


# ---------------------------------------------------------------------------------------------
# Peak memory of the reference on CPU (the N = 32k, W = 512, d = 64 figure):
#   python benchmarks/test_sliding_window.py [--heads 8] [--backward]
# runs the reference in a fresh subprocess and prints the peak RSS above the baseline
# taken after q, k, v were allocated (resource.getrusage max RSS), plus the inputs' size.
# ---------------------------------------------------------------------------------------------
_MEMORY_CHILD = r"""
import resource, sys, time, torch, attnkit
N, W, S, D, H = (int(x) for x in sys.argv[1:6])
backward = sys.argv[6] == "1"
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, H, N, D, generator=g, requires_grad=backward) for _ in range(3))
inputs = 3 * q.numel() * q.element_size()
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
t0 = time.perf_counter()
with torch.set_grad_enabled(backward):
    out = attnkit.sliding_window_attention(q, k, v, window=W, sinks=S, backend="reference")
    if backward:
        out.backward(torch.ones_like(out))
print(f"{N} {W} {S} {D} {H} {int(backward)} {inputs} {base} {rss() - base} {time.perf_counter() - t0:.2f}")
"""


def measure_reference_memory(seqlen=32768, window=512, sinks=4, head_dim=64, heads=8, backward=False):
    """(inputs_bytes, baseline_rss_bytes, peak_rss_delta_bytes, seconds) in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(seqlen), str(window), str(sinks), str(head_dim),
                          str(heads), "1" if backward else "0"], check=True, capture_output=True, text=True)
    fields = out.stdout.split()
    return int(fields[6]), int(fields[7]), int(fields[8]), float(fields[9])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--backward", action="store_true")
    a = parser.parse_args()
    inputs, base, delta, secs = measure_reference_memory(a.seqlen, a.window, a.sinks, a.head_dim, a.heads,
                                                         a.backward)
    mib = 2.0 ** 20
    print(f"reference {'fwd+bwd' if a.backward else 'fwd'}: B=1 H={a.heads} N={a.seqlen} W={a.window} S={a.sinks} "
          f"d={a.head_dim} fp32: inputs {inputs / mib:.0f} MiB, baseline RSS {base / mib:.0f} MiB, "
          f"peak RSS above baseline {delta / mib:.0f} MiB, total peak {(base + delta) / mib:.0f} MiB, {secs:.1f} s")
