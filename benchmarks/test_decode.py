"""Decoding: attnkit's split-KV decode kernel against torch SDPA, FlexAttention (compiled)
and flash-attn's ``flash_attn_with_kvcache`` when installed, one new token per sequence.

The issue's target: "On a GPU, bf16, d = 128, Hq = 32, Hkv = 8: B in {1, 16, 64}, cache
length in {4k, 32k, 128k}, contiguous and paged (page 16): achieved bandwidth (bytes of K/V
read / time) against the device's HBM bandwidth — target >= 70% of it at B = 1, 128k, and
>= 1.5x torch SDPA (and >= FlexAttention) on the same cache. page_top_k at 1/16 of the
pages: time <= 1/8 of full decoding at 128k."

``test_decode``: Nq = 1, every sequence at the full cache length N; a contiguous cache is
(B, Hkv, N, D) (flash-attn: (B, N, Hkv, D)), a paged one holds pages of 16 positions in a
shuffled block table. SDPA and FlexAttention read the contiguous cache only (GQA through
``enable_gqa=True``; SDPA falls back to a cache expanded to Hq heads once, outside the timed
call, on a torch without it); flash-attn also runs paged where its build accepts 16-token
pages (upstream flash-attn 2 wants multiples of 256, so that row is skipped there).
``benchmark.extra_info["gbps"]`` = bytes of K and V read / time = B * Hkv * N * (D + D) *
2 bytes (bf16) / ms; ``hbm_fraction`` = gbps / the HBM bandwidth estimated from the device
properties (2 x bus width x memory clock, as ``torch.cuda._device_limits`` computes it; left
out where torch does not expose them). That estimate can differ from the datasheet bandwidth
(H100 SXM 3.35 TB/s, H200 4.8 TB/s), which is what a report should quote. Caches over 40 GB
(or over 45% of the device memory) are skipped; B = 64 x 128k is 34 GB.

``test_page_top_k``: paged, B = 1, N = 128k: full decoding against ``page_top_k = pages // 16``
with the page bounds computed once outside the timed call; the target is the ratio of the two
rows' ms (``fraction_of_full`` on the page_top_k row when the full row ran first).

CPU: attnkit's reference against SDPA at tiny sizes (B in {1, 4}, N in {256, 1024}, Hq = 8,
Hkv = 2, d = 64, float32), and page_top_k at N = 1024; timings only show the suite runs.
Run: ``python -m pytest benchmarks/test_decode.py --benchmark-only``.
"""

import inspect

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.decode.selection import page_bounds

from conftest import CUDA, DEVICE, has_module, run

PAGE = 16
MAX_CACHE_BYTES = 40e9
LAYOUTS = ["contiguous", "paged"]
CONTIGUOUS_ONLY = ("sdpa", "flex")
if CUDA:
    BATCHES, SEQLENS, TOP_K_SEQLEN = [1, 16, 64], [4096, 32768, 131072], 131072
    HEADS_Q, HEADS_KV, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
    PROVIDERS = ["attnkit", "sdpa", "flex"] + (["flash_attn"] if has_module("flash_attn") else [])
else:
    BATCHES, SEQLENS, TOP_K_SEQLEN = [1, 4], [256, 1024], 1024
    HEADS_Q, HEADS_KV, HEAD_DIM, DTYPE = 8, 2, 64, torch.float32
    PROVIDERS = ["attnkit_reference", "sdpa"]
BACKEND = "triton" if CUDA else "reference"


def sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5). The builtin has no
    signature ``inspect`` can read on some versions; its docstring lists the argument."""
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


SDPA_GQA = sdpa_has_gqa()


def kv_bytes(batch: int, seqlen: int, heads: int = HEADS_KV) -> int:
    """Bytes of K and V for ``batch`` sequences of ``seqlen`` cached positions."""
    return batch * heads * seqlen * (HEAD_DIM + HEAD_DIM) * DTYPE.itemsize


def hbm_bytes_per_s():
    """The device's HBM bandwidth from its properties (double data rate: 2 x bus bytes x memory
    clock), or None when torch does not report them."""
    if not CUDA:
        return None
    props = torch.cuda.get_device_properties(0)
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * bus_bits / 8 * clock_khz * 1e3 if bus_bits and clock_khz else None


def allow_recompiles() -> None:
    """One ``torch.compile(flex_attention, dynamic=False)`` recompiles for every (B, N) here;
    lift dynamo's per-function recompile limit (default 8) so no case silently runs eagerly."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
            return


def randn(*shape, g):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g)


def shuffled_table(batch: int, seqlen: int, g) -> torch.Tensor:
    """(B, N / PAGE) int32: the pages of every sequence, scattered over the pool."""
    pages = seqlen // PAGE
    return torch.randperm(batch * pages, generator=g, device=DEVICE).view(batch, pages).to(torch.int32)


def make_call(provider, layout, batch, seqlen):
    """The timed callable, with its own inputs in the layout the provider reads."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=DEVICE)
    if provider == "flash_attn":
        from flash_attn import flash_attn_with_kvcache

        q = randn(batch, 1, HEADS_Q, HEAD_DIM, g=g)
        if layout == "paged":
            k, v = (randn(batch * seqlen // PAGE, PAGE, HEADS_KV, HEAD_DIM, g=g) for _ in range(2))
            table = shuffled_table(batch, seqlen, g)
        else:
            k, v = (randn(batch, seqlen, HEADS_KV, HEAD_DIM, g=g) for _ in range(2))
            table = None
        return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, causal=True)
    q = randn(batch, HEADS_Q, 1, HEAD_DIM, g=g)
    if provider in ("attnkit", "attnkit_reference"):
        backend = "triton" if provider == "attnkit" else "reference"
        if layout == "paged":
            k, v = (randn(batch * seqlen // PAGE, HEADS_KV, PAGE, HEAD_DIM, g=g) for _ in range(2))
            table = shuffled_table(batch, seqlen, g)
            return lambda: attnkit.decode_attention(q, k, v, seqlens, block_table=table, backend=backend)
        k, v = (randn(batch, HEADS_KV, seqlen, HEAD_DIM, g=g) for _ in range(2))
        return lambda: attnkit.decode_attention(q, k, v, seqlens, backend=backend)
    k, v = (randn(batch, HEADS_KV, seqlen, HEAD_DIM, g=g) for _ in range(2))
    if provider == "sdpa":
        if SDPA_GQA:
            return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        k, v = (x.repeat_interleave(HEADS_Q // HEADS_KV, dim=1) for x in (k, v))
        return lambda: F.scaled_dot_product_attention(q, k, v)
    if provider == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        allow_recompiles()
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(q, k, v, enable_gqa=True)
    raise ValueError(provider)


#: what a third-party anchor is known to refuse: (provider, layout, text of its error) -> why.
#: Any other error of an anchor fails the benchmark (it is a wrong call, or a real failure).
KNOWN_REFUSALS = [
    ("flash_attn", "paged", "block size must be divisible",
     f"this flash-attn build wants larger pages than {PAGE} tokens (flash-attn 2: multiples of 256)"),
]


def known_refusal(provider: str, layout: str, exc: Exception):
    """The documented reason ``provider`` cannot run this case, or None when ``exc`` is not one."""
    for who, where, text, why in KNOWN_REFUSALS:
        if provider == who and layout == where and text in str(exc):
            return f"{why}: {str(exc).splitlines()[0]}"
    return None


def record_bandwidth(benchmark, nbytes: int) -> None:
    gbps = nbytes / benchmark.extra_info["ms"] / 1e6
    benchmark.extra_info["gbps"] = gbps
    hbm = hbm_bytes_per_s()
    if hbm:
        benchmark.extra_info["hbm_gbps"] = hbm / 1e9
        benchmark.extra_info["hbm_fraction"] = gbps * 1e9 / hbm


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen", SEQLENS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_decode(benchmark, provider, batch, seqlen, layout):
    if provider in CONTIGUOUS_ONLY and layout != "contiguous":
        pytest.skip(f"{provider} reads a contiguous cache only")
    nbytes = kv_bytes(batch, seqlen)
    stored = nbytes * (HEADS_Q // HEADS_KV if provider == "sdpa" and not SDPA_GQA else 1)
    limit = min(MAX_CACHE_BYTES, 0.45 * torch.cuda.get_device_properties(0).total_memory) if CUDA else MAX_CACHE_BYTES
    if stored > limit:
        pytest.skip(f"the cache would take {stored / 1e9:.1f} GB (limit {limit / 1e9:.0f} GB)")
    with torch.no_grad():
        fn = make_call(provider, layout, batch, seqlen)
        try:
            fn()  # compiles / autotunes outside the timing, and finds what a third-party op cannot run
        except RuntimeError as exc:
            reason = known_refusal(provider, layout, exc)
            if reason is None:
                raise
            pytest.skip(reason)
        run(benchmark, fn, provider=provider, batch=batch, seqlen=seqlen, layout=layout, mode="decode")
    record_bandwidth(benchmark, nbytes)


_FULL_MS = {}


@pytest.mark.parametrize("selection", ["full", "page_top_k"])
def test_page_top_k(benchmark, selection):
    batch, seqlen = 1, TOP_K_SEQLEN
    pages = seqlen // PAGE
    top_k = pages // 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = randn(batch, HEADS_Q, 1, HEAD_DIM, g=g)
    k, v = (randn(batch * pages, HEADS_KV, PAGE, HEAD_DIM, g=g) for _ in range(2))
    table = shuffled_table(batch, seqlen, g)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=DEVICE)
    options = {}
    if selection == "page_top_k":
        options = dict(page_top_k=top_k, page_bounds=page_bounds(k, table, seqlens))
    provider = "attnkit" if CUDA else "attnkit_reference"
    with torch.no_grad():
        def fn():
            return attnkit.decode_attention(q, k, v, seqlens, block_table=table, backend=BACKEND, **options)

        fn()
        run(benchmark, fn, provider=provider, batch=batch, seqlen=seqlen, layout="paged", mode="decode",
            selection=selection, pages=pages, page_top_k=top_k if selection == "page_top_k" else None)
    ms = benchmark.extra_info["ms"]
    if selection == "full":
        _FULL_MS[seqlen] = ms
        record_bandwidth(benchmark, kv_bytes(batch, seqlen))
    elif seqlen in _FULL_MS:
        benchmark.extra_info["fraction_of_full"] = ms / _FULL_MS[seqlen]
