"""Neighborhood attention: attnkit's fused kernel (FNA on the shared engine) against the
dense flash kernel on the same tokens, FlexAttention with the NA block mask (compiled),
and NATTEN when installed.

GPU: 2-D maps 64x64 and 128x128 with kernels 7, 13, 31; 3-D 16x32x32 with kernel
(5, 7, 7); bf16, d in {64, 128}, H = 8, forward and forward+backward. TFLOP/s count
only the visited (query, key) pairs (``visited_pairs``), so "attnkit neighborhood
TFLOP/s / attnkit flash TFLOP/s" is the issue's efficiency target (>= 0.7), and the
ms ratio against ``flex`` is the speed-up over FlexAttention (target > 1).
CPU: the reference at small sizes (timings only show that the suite runs).
Run: ``python -m pytest benchmarks/test_neighborhood.py --benchmark-only``.
"""

import math

import pytest
import torch

import attnkit
from attnkit.neighborhood.geometry import normalize, visited_pairs

from conftest import CUDA, DEVICE, attention_flops, has_module, run, with_backward

if CUDA:
    SHAPES = [((64, 64), 7), ((64, 64), 13), ((64, 64), 31), ((128, 128), 7), ((128, 128), 13),
              ((128, 128), 31), ((16, 32, 32), (5, 7, 7))]
    HEAD_DIMS, HEADS, DTYPE = [64, 128], 8, torch.bfloat16
    PROVIDERS = ["attnkit", "attnkit_flash", "flex"] + (["natten"] if has_module("natten") else [])
else:
    SHAPES = [((32, 32), 7), ((8, 16, 16), (3, 5, 5))]
    HEAD_DIMS, HEADS, DTYPE = [32], 2, torch.float32
    PROVIDERS = ["attnkit_reference"]


def na_mask_mod(spatial, kernel_size):
    """FlexAttention mask_mod of non-causal NA (dilation 1, stride 1) on row-major tokens."""
    nd = len(spatial)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * nd
    strides = [math.prod(spatial[a + 1:]) for a in range(nd)]

    def mask_mod(b, h, i, j):
        keep = None
        for a in range(nd):
            L, k = spatial[a], ks[a]
            qi, kj = (i // strides[a]) % L, (j // strides[a]) % L
            left, right = k // 2, k // 2 + k % 2 - 1
            centre = torch.clamp(qi, left, L - 1 - right)
            ok = (kj >= centre - left) & (kj <= centre + right)
            keep = ok if keep is None else keep & ok
        return keep

    return mask_mod


def make_call(provider, q, k, v, spatial, kernel_size):
    if provider in ("attnkit", "attnkit_reference"):
        backend = "triton" if provider == "attnkit" else "reference"
        return lambda: attnkit.neighborhood_attention(q, k, v, kernel_size=kernel_size, backend=backend)
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    N = math.prod(spatial)
    qf, kf, vf = (x.reshape(B, H, N, D) for x in (q, k, v))
    if provider == "attnkit_flash":
        return lambda: attnkit.flash_attention(qf, kf, vf, backend="triton")
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        mask = create_block_mask(na_mask_mod(spatial, kernel_size), None, None, N, N, device=DEVICE)
        return lambda: flex(qf, kf, vf, block_mask=mask)
    if provider == "natten":  # NATTEN >= 0.20: heads-last layout (B, *spatial, H, D)
        import natten

        qt, kt, vt = (x.movedim(1, -2) for x in (q, k, v))
        fn = {2: getattr(natten, "na2d", None), 3: getattr(natten, "na3d", None)}[len(spatial)]
        if fn is None:
            pytest.skip("this NATTEN has no na2d/na3d functional API")
        return lambda: fn(qt, kt, vt, kernel_size=kernel_size)
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("spatial,kernel_size", SHAPES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_neighborhood(benchmark, provider, spatial, kernel_size, head_dim, mode):
    N = math.prod(spatial)
    batch = max(1, 16384 // N) if CUDA else 1
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, *spatial, head_dim, device=DEVICE, dtype=DTYPE, generator=g,
                           requires_grad=mode != "fwd") for _ in range(3))
    call = make_call(provider, q, k, v, spatial, kernel_size)
    dense = provider == "attnkit_flash"
    pairs = N * N if dense else visited_pairs(normalize(spatial, kernel_size, 1, False, 1))
    flops = batch * HEADS * attention_flops(pairs, head_dim, head_dim, mode)
    info = dict(provider=provider, spatial="x".join(map(str, spatial)), kernel_size=str(kernel_size),
                head_dim=head_dim, mode=mode, visited_pairs=pairs, batch=batch, heads=HEADS)
    if mode == "fwd":
        with torch.no_grad():
            run(benchmark, call, flops, **info)
    else:
        grad = torch.randn_like(q)
        if provider == "flex" or provider == "attnkit_flash":
            grad = grad.reshape(batch, HEADS, N, head_dim)
        elif provider == "natten":
            grad = grad.movedim(1, -2)
        run(benchmark, with_backward(call, grad), flops, **info)
