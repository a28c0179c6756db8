"""Neighborhood attention: semantics of the reference, the fused kernel (FNA) against it,
block lists, bad input and the modules. Kernel tests run through Triton's interpreter
on CPU (see conftest.py); most use engine blocks of 64 x 64 (one block per 64-token
tile) to keep the interpreter fast, and a few cover other tilings."""

import itertools
import math

import pytest
import torch

import attnkit
from attnkit.kernels.engine import force_config
from attnkit.neighborhood.fused import force_tile_shape, get_plan, tile_lists
from attnkit.neighborhood.geometry import normalize
from attnkit.neighborhood.reference import neighborhood_reference
from attnkit.registry import Case
from attnkit.testing import check_case, relative_error

from conftest import DEVICE, DTYPES

DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


# ----------------------------------------------------------------------------- an independent oracle

def dense_mask(spatial, kernel_size, dilation=1, causal=False, stride=1):
    """(N, N) boolean mask written straight from NATTEN's definition, pair by pair
    (tiny sizes only): it shares no code with attnkit's geometry module."""
    nd = len(spatial)
    per = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd  # noqa: E731
    ks, ds, cs, ss = per(kernel_size), per(dilation), per(causal), per(stride)
    coords = list(itertools.product(*(range(L) for L in spatial)))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            ok = True
            for a in range(nd):
                L, k, d, c, s = spatial[a], ks[a], ds[a], cs[a], ss[a]
                if qc[a] % d != kc[a] % d:
                    ok = False
                    break
                g, p, pk = qc[a] % d, qc[a] // d, kc[a] // d
                Lg = len(range(g, L, d))
                if c:
                    leader = min((p // s) * s + s - 1, Lg - 1)
                    ok = pk <= p and leader - pk < k
                else:
                    leader = min((p // s) * s + s // 2, Lg - 1)
                    left, right = k // 2, k // 2 + k % 2 - 1
                    centre = min(max(leader, left), Lg - 1 - right)
                    ok = centre - left <= pk <= centre + right
                if not ok:
                    break
            mask[i, j] = ok
    return mask


def dense_attention(q, k, v, mask, scale=None):
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    spatial = q.shape[2:-1]
    N = mask.shape[0]
    qf = q.reshape(B, H, N, D)
    kf = k.reshape(B, k.shape[1], N, D).repeat_interleave(H // k.shape[1], 1)
    vf = v.reshape(B, v.shape[1], N, -1).repeat_interleave(H // v.shape[1], 1)
    s = (qf @ kf.transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vf).reshape(B, H, *spatial, -1)


GEOMETRIES = [  # spatial, kernel_size, dilation, causal, stride
    ((11,), 4, 1, False, 1),
    ((13,), 3, 3, True, 2),
    ((7, 9), (3, 4), 1, False, 1),
    ((7, 9), 3, (2, 2), (True, False), (1, 3)),
    ((8, 10), (4, 5), 1, False, (2, 5)),
    ((5, 6, 7), (3, 2, 3), (1, 2, 2), (True, False, False), (1, 2, 3)),
    ((4, 5, 6), (4, 5, 6), 1, False, 1),
]


@pytest.mark.parametrize("spatial,ks,dil,causal,stride", GEOMETRIES)
def test_reference_matches_definition(spatial, ks, dil, causal, stride):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, *spatial, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, *spatial, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, *spatial, 5, generator=g, dtype=torch.float64)
    mask = dense_mask(spatial, ks, dil, causal, stride)
    out, lse = neighborhood_reference(q, k, v, kernel_size=ks, dilation=dil, causal=causal, stride=stride,
                                      return_lse=True)
    torch.testing.assert_close(out, dense_attention(q, k, v, mask), rtol=1e-12, atol=1e-12)
    assert lse.shape == (2, 3, *spatial) and lse.dtype == torch.float64


def test_definition_shifts_windows_at_borders():
    # non-causal: every query sees exactly prod(kernel_size) keys, also in the corners
    mask = dense_mask((6, 7), (3, 4))
    assert (mask.sum(1) == 12).all()
    # corner query (0, 0) sees rows 0..2 and columns 0..3 (the window shifted inwards)
    seen = {divmod(j, 7) for j in mask[0].nonzero().flatten().tolist()}
    assert seen == {(r, c) for r in range(3) for c in range(4)}
    # a causal axis truncates instead: query 0 sees only itself
    assert dense_mask((6,), 3, causal=True)[0].sum() == 1


def test_reference_memory_is_linear_in_tokens():
    # 60k tokens: an N x N score matrix would need 14 GB in float32
    N = 60_000
    q = torch.randn(1, 1, N, 4)
    out = neighborhood_reference(q, q, q, kernel_size=5)
    assert out.shape == (1, 1, N, 4) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- block lists

@pytest.mark.parametrize("spatial,ks,dil,causal,stride,tile", [
    ((13, 17), 5, 1, False, 1, (8, 8)),
    ((13, 17), (4, 6), 1, (False, True), (2, 3), (4, 16)),
    ((5, 9, 11), 3, 1, (True, False, False), (1, 2, 3), (4, 4, 4)),
    ((40,), 7, 1, True, 1, (16,)),
])
def test_block_lists_are_exact(spatial, ks, dil, causal, stride, tile):
    """Per query tile the lists hold exactly the key tiles with a visible pair, full
    exactly when every pair is visible and no token is padding; the transposed lists
    are the transpose."""
    axes = normalize(spatial, ks, dil, causal, stride)
    with force_tile_shape(tile):
        cls = get_plan(spatial, axes, torch.device("cpu")).classes[0]
    V, T = math.prod(tile), cls.tokens
    table = cls.table.long()
    nd = len(spatial)
    keep = torch.ones(T, T, dtype=torch.bool)
    for a in range(nd):
        c = table[2 * nd + a][None, :]
        keep &= (c >= table[2 * a][:, None]) & (c < table[2 * a + 1][:, None])
    # the permuted table agrees with the definition
    real = cls.gather[0].clone()
    valid = (table[0] < table[1])
    assert torch.equal(keep[valid][:, valid], dense_mask(spatial, ks, dil, causal, stride)[real[valid]][:, real[valid]])
    R = T // V
    blocks = keep.view(R, V, R, V)
    any_seen, all_seen = blocks.any(3).any(1), blocks.all(3).all(1)
    lists = cls.lists

    def as_sets(count, index):
        return [set(index[0, 0, r, :count[0, 0, r]].tolist()) for r in range(count.shape[-1])]

    full = as_sets(lists.kv_full_count, lists.kv_full_index)
    part = as_sets(lists.kv_part_count, lists.kv_part_index)
    for r in range(R):
        assert full[r] == set(all_seen[r].nonzero().flatten().tolist())
        assert full[r] | part[r] == set(any_seen[r].nonzero().flatten().tolist())
        assert not full[r] & part[r]
    t_full = as_sets(lists.q_full_count, lists.q_full_index)
    t_part = as_sets(lists.q_part_count, lists.q_part_index)
    for c in range(R):
        assert t_full[c] == {r for r in range(R) if c in full[r]}
        assert t_part[c] == {r for r in range(R) if c in part[r]}


def test_tile_lists_product_structure():
    # two axes, 2 tiles each: (r0, r1) visits (c0, c1) iff both axes visit
    m0 = torch.tensor([[2, 1], [0, 2]], dtype=torch.int8)
    m1 = torch.tensor([[2, 0], [1, 1]], dtype=torch.int8)
    fc, fi, pc, pi = tile_lists([m0, m1])
    assert fc.tolist() == [1, 0, 1, 0] and fi[0, 0] == 0 and fi[2, 0] == 2
    assert sorted(pi[0, :pc[0]].tolist()) == [2]          # (0,0) -> (1,0): partial along axis 0
    assert sorted(pi[1, :pc[1]].tolist()) == [0, 1, 2, 3]
    assert pc[2].item() == 0 and sorted(pi[3, :pc[3]].tolist()) == [2, 3]


def test_plan_is_cached():
    axes = normalize((13, 17), 5, 1, False, 1)
    assert get_plan((13, 17), axes, torch.device("cpu")) is get_plan((13, 17), axes, torch.device("cpu"))


# ----------------------------------------------------------------------------- kernel vs reference

def _case(spatial, heads=(2, 2), d=16, dv=None, name="", **options):
    B, (hq, hkv) = 1, heads
    dv = dv or d
    return Case((B, hq, *spatial, d), (B, hkv, *spatial, d), (B, hkv, *spatial, dv), options, name=name)


KERNEL_CASES = [
    # maps that are not tile multiples, odd and even kernels
    _case((13, 17), kernel_size=5, name="2d_13x17_k5"),
    _case((13, 17), kernel_size=(4, 6), name="2d_13x17_k4x6_even"),
    _case((5, 6, 7), heads=(1, 1), kernel_size=(2, 4, 5), name="3d_5x6x7_k2x4x5_even"),
    _case((150,), d=40, dv=24, kernel_size=13, name="1d_150_k13_d40_dv24"),
    # dilation with L mod d != 0 (groups of unequal lengths)
    _case((50,), kernel_size=5, dilation=3, name="1d_dil3_L50"),
    _case((13, 17), kernel_size=(3, 4), dilation=(2, 3), name="2d_dil2x3"),
    _case((7, 5, 10), heads=(1, 1), kernel_size=(3, 2, 3), dilation=(2, 1, 3), name="3d_dil"),
    # causal on some axes only (video: causal in time, not in space)
    _case((6, 7, 9), heads=(1, 1), kernel_size=3, causal=(True, False, False), name="3d_video_causal_t"),
    _case((13, 17), kernel_size=(4, 5), causal=(False, True), dilation=(1, 2), name="2d_causal_w_dil"),
    _case((70,), kernel_size=9, causal=True, name="1d_causal"),
    # GNA stride: 2, = kernel (blocked), mixed with causal
    _case((12, 14), kernel_size=4, stride=2, name="2d_stride2"),
    _case((12, 14), kernel_size=(4, 7), stride=(4, 7), name="2d_stride_eq_kernel"),
    _case((13, 17), kernel_size=(5, 3), stride=(3, 2), causal=(True, False), name="2d_stride_causal"),
    _case((4, 9, 7), heads=(1, 1), kernel_size=(3, 3, 5), stride=(1, 2, 5), dilation=(1, 2, 1), name="3d_stride"),
    # GQA and MQA, scale
    _case((9, 13), heads=(4, 2), kernel_size=5, name="2d_gqa"),
    _case((40,), heads=(3, 1), kernel_size=7, scale=0.3, name="1d_mqa_scale"),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_fp32(case):
    with force_config(64, 64):
        report = check_case("neighborhood", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    assert [c.name for c in report.comparisons] == ["out", "lse", "dq", "dk", "dv"]


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [KERNEL_CASES[i] for i in (1, 6, 8, 13)], ids=lambda c: c.name)
def test_kernel_matches_reference_half(case, dtype):
    with force_config(64, 64):
        report = check_case("neighborhood", case, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)


@pytest.mark.parametrize("block_m,block_n,tile", [(16, 16, (4, 4)), (32, 16, (8, 8)), (64, 32, (4, 16)),
                                                  (64, 64, (16, 4))])
def test_kernel_tilings(block_m, block_n, tile):
    case = _case((11, 9), heads=(2, 1), kernel_size=(5, 4), causal=(False, True), dilation=(2, 1),
                 name="tilings")
    with force_config(block_m, block_n), force_tile_shape(tile):
        report = check_case("neighborhood", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)


def test_kernel_3d_5x9x11_tiles_4x4x4():
    case = _case((5, 9, 11), heads=(1, 1), kernel_size=3, causal=(True, False, False), name="3d_5x9x11_k3")
    with force_config(64, 64), force_tile_shape((4, 4, 4)):
        report = check_case("neighborhood", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("spatial,causal", [((8, 12), False), ((6, 5, 4), False), ((37,), True)])
def test_kernel_equal_to_axis_length_is_flash(spatial, causal):
    """kernel_size = axis length: full attention (causal: causal flash) on the flattened map."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, *spatial, 16, generator=g) for _ in range(3))
    do = torch.randn(1, 2, *spatial, 16, generator=g)
    N = math.prod(spatial)

    def na(q, k, v):
        return attnkit.neighborhood_attention(q, k, v, kernel_size=spatial, causal=causal, backend="triton")

    def flash(q, k, v):
        flat = [t.reshape(1, 2, N, 16) for t in (q, k, v)]
        return attnkit.flash_attention(*flat, causal=causal, backend="triton").reshape(1, 2, *spatial, 16)

    with force_config(64, 64):
        got = _grads(na, q, k, v, do)
    want = _grads(flash, q, k, v, do)
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-5


def test_return_lse_and_empty_free():
    q = torch.randn(1, 2, 9, 11, 16)
    with force_config(64, 64):
        out, lse = attnkit.neighborhood_attention(q, q, q, kernel_size=3, return_lse=True, backend="triton")
    assert out.shape == q.shape and lse.shape == (1, 2, 9, 11) and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_auto_backend_on_cpu_uses_torch_backend():
    q = torch.randn(1, 1, 6, 6, 8)
    assert attnkit.explain(q, q, q, "neighborhood", kernel_size=3).backend == "torch"
    torch.testing.assert_close(attnkit.neighborhood_attention(q, q, q, kernel_size=3),
                               neighborhood_reference(q, q, q, kernel_size=3), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

def _qkv(*spatial, h=2, d=8):
    t = torch.randn(1, h, *spatial, d)
    return t, t, t


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=(3, -1)), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=5, dilation=2), ValueError, "kernel_size * dilation"),
    (dict(kernel_size=(3, 10)), ValueError, "axis 1 has length 9"),
    (dict(kernel_size=3, stride=4), ValueError, "stride must be <= kernel_size"),
    (dict(kernel_size=(3, 3, 3)), ValueError, "kernel_size must be one value or a tuple of 2"),
    (dict(kernel_size=3, dilation=(1, 1, 1)), ValueError, "dilation must be one value or a tuple of 2"),
    (dict(kernel_size=3, causal=(True,)), ValueError, "causal must be one value or a tuple of 2"),
    (dict(kernel_size=3, stride=(1, 1, 1)), ValueError, "stride must be one value or a tuple of 2"),
    (dict(kernel_size=3, stride=0), ValueError, "stride must be >= 1"),
    (dict(kernel_size=3, dilation=0), ValueError, "dilation must be >= 1"),
    (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (dict(kernel_size=3, causal=1), TypeError, "causal must be a bool"),
    (dict(kernel_size=3, scale=float("nan")), ValueError, "scale must be finite"),
])
def test_bad_options(kwargs, error, words):
    q, k, v = _qkv(8, 9)
    with pytest.raises(error, match=words.replace("*", r"\*").replace("(", r"\(")):
        attnkit.neighborhood_attention(q, k, v, **kwargs)


def test_kernel_size_is_required():
    q, k, v = _qkv(8, 9)
    with pytest.raises(TypeError, match="needs kernel_size"):
        attnkit.attention(q, k, v, "neighborhood")


@pytest.mark.parametrize("shape", [(1, 2, 8), (1, 2, 3, 4, 5, 6, 8)], ids=["rank0", "rank4"])
def test_bad_spatial_rank(shape):
    q = torch.randn(*shape)
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        attnkit.neighborhood_attention(q, q, q, kernel_size=1)


def test_bad_tensors():
    q = torch.randn(1, 2, 8, 9, 8)
    with pytest.raises(ValueError, match="same spatial sizes"):
        attnkit.neighborhood_attention(q, torch.randn(1, 2, 9, 8, 8), torch.randn(1, 2, 9, 8, 8), kernel_size=3)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attnkit.neighborhood_attention(q, torch.randn(1, 3, 8, 9, 8), torch.randn(1, 3, 8, 9, 8), kernel_size=3)
    with pytest.raises(ValueError, match="rank 5"):
        attnkit.neighborhood_attention(q, torch.randn(1, 2, 72, 8), torch.randn(1, 2, 72, 8), kernel_size=3)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attnkit.neighborhood_attention(q.tolist(), q, q, kernel_size=3)


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("cls,spatial,opts", [
    (attnkit.nn.NeighborhoodAttention1D, (20,), dict(kernel_size=5, causal=True)),
    (attnkit.nn.NeighborhoodAttention2D, (9, 11), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2))),
    (attnkit.nn.NeighborhoodAttention3D, (4, 5, 6), dict(kernel_size=3, causal=(True, False, False))),
])
def test_modules(cls, spatial, opts):
    torch.manual_seed(0)
    m = cls(32, 2, **opts)
    x = torch.randn(2, *spatial, 32)
    y = m(x)
    assert y.shape == x.shape
    # the same block written out by hand
    B = x.shape[0]
    qkv = m.qkv(x).view(B, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = (t.reshape(B, 2, *spatial, 16) for t in qkv)
    o = neighborhood_reference(q, k, v, **opts)
    want = m.proj(o.permute(0, *range(2, 2 + len(spatial)), 1, 2 + len(spatial)).reshape(x.shape))
    torch.testing.assert_close(y, want)
    # the kernel path agrees and trains
    m.backend = "triton"
    with force_config(64, 64):
        y2 = m(x)
        y2.sum().backward()
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    assert m.qkv.weight.grad is not None and torch.isfinite(m.qkv.weight.grad).all()


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        attnkit.nn.NeighborhoodAttention2D(30, 4, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size must be one value or a tuple of 2"):
        attnkit.nn.NeighborhoodAttention2D(32, 4, kernel_size=(3, 3, 3))
    m = attnkit.nn.NeighborhoodAttention2D(32, 4, kernel_size=3)
    with pytest.raises(ValueError, match=r"shape \(B, X0, X1, 32\)"):
        m(torch.randn(2, 8, 32))
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        m(torch.randn(1, 2, 8, 32))
