"""Score and mask mods: every library mod kernel vs reference (forward, LSE, gradients of q, k,
v and of learnable tensors) at awkward sizes; user-defined additive and non-additive mods
defined in this module; the mods' own semantics against independent definitions (T5's
bucketing from transformers, ALiBi, NATTEN's rpb, document masks cut inside blocks);
create_block_mask against FlexAttention's; built-in options equal to their mods; hooks keyed
by identity; bad input."""

import importlib
import math
import sys

import pytest
import torch
import triton
import triton.language as tl

import attnkit
from attnkit import Case, mods
from attnkit.block_sparse.block_mask import lists_to_dense
from attnkit.testing import check_case, check_variant

from conftest import DEVICE, DTYPES

DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


def randn(*shape, scale=1.0):
    return lambda g: scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def positive(*shape):
    return lambda g: 0.2 + torch.rand(*shape, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# User-defined mods, written as a third party would (this test module is their module).
# ---------------------------------------------------------------------------------------------
@triton.jit
def scaled_key_bias(score, b, h, q_idx, kv_idx, BIAS):
    """Additive: score + 0.5 * bias[kv_idx] (a per-key tensor of the user's)."""
    return score + 0.5 * tl.load(BIAS + kv_idx).to(tl.float32)


def scaled_key_bias_reference(score, b, h, q_idx, kv_idx, bias):
    return score + 0.5 * bias[kv_idx].to(score.dtype)


@triton.jit
def learned_temperature(score, b, h, q_idx, kv_idx, TEMP):
    """Non-additive and learnable: score * temp[h]."""
    return score * tl.load(TEMP + h).to(tl.float32)


@triton.jit
def learned_temperature_derivative(score, b, h, q_idx, kv_idx, TEMP):
    return score * 0.0 + tl.load(TEMP + h).to(tl.float32)


@triton.jit
def learned_temperature_grads(dscore, score, b, h, q_idx, kv_idx, TEMP, D_TEMP):
    # d out / d temp[h] = score: one reduction per tile, one atomic per (tile, head)
    tl.atomic_add(D_TEMP + h, tl.sum(tl.sum(dscore * score, 1), 0))


def learned_temperature_reference(score, b, h, q_idx, kv_idx, temp):
    return score * temp[h].to(score.dtype)


def temperature_mod(temp):
    return attnkit.ScoreMod(learned_temperature, learned_temperature_reference, tensors=(temp,),
                            derivative=learned_temperature_derivative, tensor_grads=learned_temperature_grads)


@triton.jit
def even_keys(b, h, q_idx, kv_idx):
    return (kv_idx % 2 == 0) | (kv_idx == q_idx)


def even_keys_reference(b, h, q_idx, kv_idx):
    return (kv_idx % 2 == 0) | (kv_idx == q_idx)


# ---------------------------------------------------------------------------------------------
# Kernel vs reference: every library mod, awkward sizes, both dtypes.
# ---------------------------------------------------------------------------------------------
def docs_of(n, *lengths):
    """Document ids of n key positions: consecutive documents of the given lengths, the last one
    running to the end (boundaries deliberately not at multiples of a block)."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return lambda g: torch.cat([ids, torch.full((max(0, n - len(ids)),), len(lengths))])[:n]


def doc_block_mask(t, n, block=32, global_tokens=0):
    mask = mods.and_masks(mods.causal(), mods.document(t["docs"], global_tokens=global_tokens))
    return {"block_mask": attnkit.create_block_mask(mask, None, None, n, n, block_size=block,
                                                    device=t["docs"].device)}


# (variant, case); shapes cover N = 1, 17, 113, 203, Nq != Nk both ways, GQA/MQA, D = 40 and 96
MOD_CASES = [
    ("flash", Case((1, 2, 17, 96), (1, 2, 17, 96), (1, 2, 17, 96), {"causal": True},
                   tensors={"slopes": positive(2)}, build=lambda t: {"alibi_slopes": t["slopes"]},
                   name="alibi_slopes_n17_d96")),
    ("flash", Case((2, 4, 1, 40), (2, 2, 113, 40), (2, 2, 113, 40), {"causal": True},
                   tensors={"slopes": positive(2, 4)}, build=lambda t: {"score_mod": mods.alibi(t["slopes"])},
                   name="alibi_per_batch_decode_n1_gqa")),
    ("flash", Case((1, 2, 17, 40), (1, 1, 113, 40), (1, 1, 113, 24), {"causal": False},
                   tensors={"table": randn(2, 32, scale=0.5)},
                   build=lambda t: {"score_mod": mods.relative_position_bias(t["table"])},
                   name="t5_bidirectional_nq<nk_mqa")),
    ("sliding_window", Case((1, 2, 113, 40), (1, 2, 60, 40), (1, 2, 60, 40), {"window": 30, "sinks": 2},
                            tensors={"table": randn(2, 16, scale=0.5)},
                            build=lambda t: {"score_mod": mods.relative_position_bias(
                                t["table"], num_buckets=16, max_distance=40, bidirectional=False)},
                            name="t5_decoder_nq>nk")),
    ("flash", Case((1, 2, 113, 40), (1, 1, 113, 40), (1, 1, 113, 40), {"causal": True},
                   tensors={"bias": randn(1, 2, 113)}, build=lambda t: {"score_mod": mods.key_bias(t["bias"])},
                   name="key_bias_n113_mqa")),
    ("block_sparse", Case((2, 2, 64, 32), (2, 2, 96, 32), (2, 2, 96, 32), {"causal": True},
                          tensors={"bias": randn(2, 2, 96)},
                          build=lambda t: {"score_mod": mods.key_bias(t["bias"]),
                                           "block_mask": attnkit.BlockMask.from_dense(
                                               torch.tensor([[True, False, True], [True, True, True]],
                                                            device=t["bias"].device), 32, (64, 96))},
                          name="key_bias_per_batch_block_sparse")),
    ("flash", Case((1, 2, 17, 40), (1, 2, 17, 40), (1, 2, 17, 40), {"causal": True},
                   build=lambda t: {"score_mod": mods.softcap(1.5)}, name="softcap_mod_n17")),
    ("neighborhood", Case((1, 2, 6, 9, 40), (1, 1, 6, 9, 40), (1, 1, 6, 9, 40),
                          {"kernel_size": 3, "dilation": (1, 2)}, tensors={"rpb": randn(2, 5, 5, scale=0.5)},
                          build=lambda t: {"score_mod": mods.relative_position_bias_2d(t["rpb"], 3)},
                          name="rpb_2d_dilated_mqa")),
    ("flex", Case((1, 2, 113, 40), (1, 2, 113, 40), (1, 2, 113, 40), tensors={"docs": docs_of(113, 20, 45, 9)},
                  build=lambda t: doc_block_mask(t, 113, global_tokens=3), name="document_global_tokens_n113")),
    ("flex", Case((1, 1, 203, 16), (1, 1, 203, 16), (1, 1, 203, 16),
                  build=lambda t: {"mask_mod": mods.sliding_window(20, 5)}, name="sliding_window_mask_n203")),
    ("flex", Case((2, 2, 45, 16), (2, 2, 70, 16), (2, 2, 70, 16), tensors={"prefix": lambda g: torch.tensor([9, 40])},
                  build=lambda t: {"block_mask": attnkit.create_block_mask(
                      mods.prefix_lm(t["prefix"]), 2, None, 45, 70, block_size=32, device=t["prefix"].device)},
                  name="prefix_lm_per_batch_nq<nk")),
    ("flex", Case((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32),
                  build=lambda t: {"mask_mod": mods.or_masks(mods.sliding_window(3, 0), mods.prefix_lm(5))},
                  name="or_masks")),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant,case", MOD_CASES, ids=[c.id for _, c in MOD_CASES])
def test_library_mod_kernel_matches_reference(variant, case, dtype):
    report = check_case(variant, case, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    names = {c.name for c in report.comparisons}
    assert {"out", "lse", "dq", "dk", "dv"} <= names
    for learnable in case.tensors:  # the learnable tensor's gradient was compared too
        if learnable not in ("docs", "prefix"):
            assert f"d{learnable}" in names


USER_CASES = [
    Case((1, 2, 33, 40), (1, 2, 50, 40), (1, 2, 50, 40), {"causal": True}, tensors={"bias": randn(50)},
         build=lambda t: {"score_mod": attnkit.ScoreMod(scaled_key_bias, scaled_key_bias_reference,
                                                        tensors=(t["bias"].detach(),))},
         name="user_additive"),
    Case((1, 4, 45, 16), (1, 2, 45, 16), (1, 2, 45, 16), {"causal": True}, tensors={"temp": positive(4)},
         build=lambda t: {"score_mod": temperature_mod(t["temp"])}, name="user_non_additive_learnable"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", USER_CASES, ids=[c.id for c in USER_CASES])
def test_user_defined_mods(case, dtype):
    report = check_case("flash", case, dtype=dtype, device=DEVICE, backend="triton")
    assert report.ok, str(report)


def test_user_mask_mod_and_chained_user_mods():
    case = Case((1, 2, 37, 32), (1, 2, 37, 32), (1, 2, 37, 32), tensors={"temp": positive(2)},
                build=lambda t: {"mask_mod": attnkit.MaskMod(even_keys, even_keys_reference),
                                 "score_mod": mods.chain_score_mods(temperature_mod(t["temp"]),
                                                                    mods.softcap(3.0))},
                name="user_mask_chain")
    report = check_case("flex", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)


def test_tiling_sweep_over_flex():
    cases = attnkit.get_variant("flex").examples()[:2]  # a dense mod and a block mask of 32-blocks
    reports = check_variant("flex", cases, dtype=torch.float32, device=DEVICE, tilings=[(16, 32), (64, 32)])
    assert all(r.ok for r in reports)
    assert [(r.tiling, bool(r.refused)) for r in reports] == [((16, 32), False), ((16, 32), False),
                                                              ((64, 32), False), ((64, 32), True)]
    assert all(r.comparisons for r in reports if not r.refused)
    assert "not a multiple of the fixed kernel tile" in reports[-1].refused  # refused, not failed


# ---------------------------------------------------------------------------------------------
# The mods' semantics, against independent definitions (references only).
# ---------------------------------------------------------------------------------------------
def dense(q, k, v, bias=None, mask=None, scale=None):
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def qkv(*shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g, dtype=dtype) for _ in range(3)]


def test_alibi_is_flash_attentions_convention():
    q, k, v = qkv(2, 3, 5, 16)
    k, v = (torch.randn(2, 3, 9, 16, dtype=torch.float64) for _ in range(2))
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    i = torch.arange(5)[:, None] + 4  # bottom-right: query i at key position i + Nk - Nq
    j = torch.arange(9)[None, :]
    bias = -slopes.view(1, 3, 1, 1) * (i - j).abs()
    expected = dense(q, k, v, bias=bias, mask=j <= i)
    out = attnkit.flash_attention(q, k, v, causal=True, alibi_slopes=slopes, backend="reference")
    torch.testing.assert_close(out, expected)
    assert torch.allclose(mods.alibi_slopes(8), 2.0 ** (-torch.arange(1, 9, dtype=torch.float32)))


def test_t5_bucket_matches_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 301)
    for bidirectional, nb, md in ((True, 32, 128), (False, 32, 128), (True, 16, 40), (False, 8, 20)):
        ours = mods.t5_bucket(rel, num_buckets=nb, max_distance=md, bidirectional=bidirectional)
        theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                                           max_distance=md)
        assert torch.equal(ours, theirs), (bidirectional, nb, md)


def test_rpb_2d_is_natten_semantics():
    """score + rpb[h, (kx - qx) / dx + K - 1, (ky - qy) / dy + K - 1] over each query's neighborhood."""
    X, Y, K, dil = 7, 8, 3, (2, 1)
    q, k, v = qkv(1, 2, X, Y, 16)
    rpb = torch.randn(2, 2 * K - 1, 2 * K - 1, dtype=torch.float64)
    out = attnkit.neighborhood_attention(q, k, v, kernel_size=K, dilation=dil, backend="reference",
                                         score_mod=mods.relative_position_bias_2d(rpb, K))
    # the neighborhood itself, read off the reference (v = identity shows what each query sees)
    eye = torch.eye(X * Y, dtype=torch.float64).view(1, 1, X, Y, X * Y).expand(1, 2, X, Y, X * Y)
    seen = attnkit.neighborhood_attention(torch.zeros_like(q), torch.zeros_like(k), eye, kernel_size=K,
                                          dilation=dil, backend="reference").reshape(1, 2, X * Y, X * Y) > 0
    qx, qy = torch.arange(X * Y) // Y, torch.arange(X * Y) % Y
    ix = (qx[None, :] - qx[:, None]) // dil[0] + K - 1
    iy = (qy[None, :] - qy[:, None]) // dil[1] + K - 1
    bias = rpb[:, ix.clamp(0, 2 * K - 2), iy.clamp(0, 2 * K - 2)][None]
    expected = dense(q.reshape(1, 2, -1, 16), k.reshape(1, 2, -1, 16), v.reshape(1, 2, -1, 16), bias=bias, mask=seen)
    torch.testing.assert_close(out.reshape(1, 2, -1, 16), expected)


def test_document_mask_is_exact_when_boundaries_cut_blocks():
    """The issue's case: a document boundary inside a 16-token block. Block-granular masks
    (BlockMask.from_mask_fn) differ from the token mask; create_block_mask does not."""
    n, block = 64, 16
    docs = torch.tensor([0] * 5 + [1] * 22 + [2] * 37)
    mask = mods.and_masks(mods.causal(), mods.document(docs))
    q, k, v = qkv(1, 2, n, 16)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    expected = dense(q, k, v, mask=(j <= i) & (docs[i] == docs[j]))
    exact = attnkit.create_block_mask(mask, None, None, n, n, block_size=block, device="cpu")
    assert exact.full_kv_num_blocks is not None and int(exact.kv_num_blocks.sum()) > 0  # partial tiles exist
    for backend in ("reference", "triton"):
        with attnkit.extension.force_config(16, 16):  # the 16-token blocks need 16-row tiles
            out = attnkit.flex_attention(*(x.float().to(DEVICE) for x in (q, k, v)), block_mask=exact,
                                         backend=backend)
        torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    rounded = attnkit.BlockMask.from_mask_fn(lambda b, h, qi, ki: (ki <= qi) & (docs[qi] == docs[ki]), None, None,
                                             n, n, block)
    coarse = attnkit.block_sparse_attention(q, k, v, rounded, causal=True, backend="reference")
    assert (coarse - expected).abs().max() > 0.1  # what the exact mask fixes


def test_document_global_tokens_and_queries_before_the_first_key():
    docs = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    mm = mods.document(docs, global_tokens=2).specialize(mods.Problem("flex", 1, 1, 10, 8, torch.device("cpu")))
    q_idx = (torch.arange(10) - 2).view(1, 1, -1, 1)   # Nq = 10 > Nk = 8: rows 0, 1 sit before the first key
    keep = mm.apply(torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long), q_idx,
                    torch.arange(8).view(1, 1, 1, -1))[0, 0]
    assert keep[:2].tolist() == [[True, True] + [False] * 6] * 2      # no document: only the global tokens
    assert keep[2 + 4].tolist() == [True, True, False, True, True, False, False, False]


def test_prefix_lm_and_sliding_window_definitions():
    problem = mods.Problem("flex", 2, 1, 6, 6, torch.device("cpu"))
    b = torch.arange(2).view(-1, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    i, j = torch.arange(6).view(1, 1, -1, 1), torch.arange(6).view(1, 1, 1, -1)
    keep = mods.prefix_lm(torch.tensor([3, 0])).specialize(problem).apply(b, h, i, j)
    assert torch.equal(keep[0, 0], (j < 3)[0, 0] | (j <= i)[0, 0])
    assert torch.equal(keep[1, 0], (j <= i)[0, 0])
    window = mods.sliding_window(2, 1).specialize(problem).apply(b, h, i, j)[0, 0]
    assert torch.equal(window, ((j >= i - 2) & (j <= i + 1))[0, 0])
    unbounded = mods.sliding_window(-1, 0).specialize(problem).apply(b, h, i, j)[0, 0]
    assert torch.equal(unbounded, (j <= i)[0, 0])


# ---------------------------------------------------------------------------------------------
# Built-in options and their mods give the same results.
# ---------------------------------------------------------------------------------------------
def kernel_inputs(B=1, Hq=2, Hkv=2, Nq=45, Nk=45, D=32):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(DEVICE)
    return q, k, v


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_builtin_options_equal_their_mods(backend):
    q, k, v = kernel_inputs(Nq=40, Nk=57)
    close = dict(rtol=2e-5, atol=2e-5)
    # softcap option vs softcap mod
    torch.testing.assert_close(attnkit.flash_attention(q, k, v, causal=True, softcap=2.0, backend=backend),
                               attnkit.flash_attention(q, k, v, causal=True, score_mod=mods.softcap(2.0),
                                                       backend=backend), **close)
    # causal option vs causal mask (as a mask_mod, and through a block mask)
    causal = attnkit.flash_attention(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, mask_mod=mods.causal(), backend=backend), causal,
                               **close)
    bm = attnkit.create_block_mask(mods.causal(), None, None, 40, 57, block_size=32, device=DEVICE)
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=bm, backend=backend), causal, **close)
    torch.testing.assert_close(attnkit.block_sparse_attention(
        q, k, v, attnkit.BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool, device=DEVICE), 32, (40, 57)),
        mask_mod=mods.causal(), backend=backend), causal, **close)
    # a window option vs the sliding_window mask
    torch.testing.assert_close(
        attnkit.sliding_window_attention(q, k, v, window=(7, 2), backend=backend),
        attnkit.flex_attention(q, k, v, mask_mod=mods.sliding_window(7, 2), backend=backend), **close)
    # alibi_slopes vs the alibi mod, and the softcap-then-ALiBi order of FlashAttention
    slopes = torch.tensor([0.3, 0.1], device=DEVICE)
    with_option = attnkit.flash_attention(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes, backend=backend)
    torch.testing.assert_close(with_option, attnkit.flash_attention(
        q, k, v, causal=True, score_mod=mods.chain_score_mods(mods.softcap(3.0), mods.alibi(slopes)),
        backend=backend), **close)


# ---------------------------------------------------------------------------------------------
# create_block_mask: the same tiles as FlexAttention's create_block_mask.
# ---------------------------------------------------------------------------------------------
def torch_tiles(block_mask):
    cols = block_mask.kv_indices.shape[-1]
    part = lists_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, cols)
    full = lists_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, cols)
    rows = part.shape[-2]
    return part[..., :rows, :cols], full[..., :rows, :cols]


@pytest.mark.parametrize("name", ["causal", "document", "sliding_window", "prefix_lm_per_batch"])
def test_create_block_mask_matches_flex_attention(name):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    n, block = 256, 64
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 100, 6, 120]))
    mask, B = {
        "causal": (mods.causal(), None),
        "document": (mods.and_masks(mods.causal(), mods.document(docs)), None),
        "sliding_window": (mods.sliding_window(70, 0), None),
        "prefix_lm_per_batch": (mods.prefix_lm(torch.tensor([0, 100])), 2),
    }[name]
    ours = attnkit.create_block_mask(mask, B, None, n, n, block_size=block, device="cpu")
    specialized = mask.specialize(mods.Problem("flex", B or 1, 1, n, n, torch.device("cpu")))
    theirs = flex.create_block_mask(lambda b, h, q_idx, kv_idx: specialized.reference(b, h, q_idx, kv_idx,
                                                                                       *specialized.tensors),
                                    B, None, n, n, device="cpu", BLOCK_SIZE=block)
    part, full = torch_tiles(theirs)
    assert torch.equal(lists_to_dense(ours.kv_num_blocks, ours.kv_indices, n // block), part)
    assert torch.equal(lists_to_dense(ours.full_kv_num_blocks, ours.full_kv_indices, n // block), full)


def test_create_block_mask_memory_is_bounded_by_the_chunk():
    calls = []

    def reference(b, h, q_idx, kv_idx):
        calls.append(q_idx.numel() * kv_idx.numel())
        return q_idx >= kv_idx

    mask = attnkit.MaskMod(mods.causal().kernel, reference, name="counting_causal")
    bm = attnkit.create_block_mask(mask, None, None, 1024, 1024, block_size=64, device="cpu",
                                   chunk_elements=1 << 14)
    assert max(calls) <= 1 << 14 and len(calls) > 16
    assert bm.sparsity() > 40


# ---------------------------------------------------------------------------------------------
# Hooks are keyed by identity: a redefined mod runs its new code.
# ---------------------------------------------------------------------------------------------
STALE_SOURCE = '''
import triton
import triton.language as tl


@triton.jit
def bias_kernel(score, b, h, q_idx, kv_idx):
    return score + {value}


def bias_reference(score, b, h, q_idx, kv_idx):
    return score + {value}
'''


def test_redefined_mod_runs_its_new_code(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    q, k, v = kernel_inputs(Nq=20, Nk=20, D=16)
    outs = []
    for value in ("0.0", "-3.0 * (kv_idx == 0)"):   # the second one pushes key 0 away
        (tmp_path / "notebook_cell.py").write_text(STALE_SOURCE.format(value=value))
        sys.modules.pop("notebook_cell", None)
        importlib.invalidate_caches()
        cell = importlib.import_module("notebook_cell")  # same module, same qualified name
        mod = attnkit.ScoreMod(cell.bias_kernel, cell.bias_reference)
        outs.append(attnkit.flex_attention(q, k, v, score_mod=mod, backend="triton"))
        ref = attnkit.flex_attention(q, k, v, score_mod=mod, backend="reference")
        torch.testing.assert_close(outs[-1], ref, rtol=1e-5, atol=1e-5)
        by_path = attnkit.ScoreMod("notebook_cell:bias_kernel", cell.bias_reference)  # the same key both times
        torch.testing.assert_close(attnkit.flex_attention(q, k, v, score_mod=by_path, backend="triton"), ref,
                                   rtol=1e-5, atol=1e-5)
    assert (outs[0] - outs[1]).abs().max() > 1e-2


def test_hook_keys_are_per_function_object():
    from attnkit.engine import hook_key

    a = mods.core.generate_jit("def same(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx\n", "same", {})
    b = mods.core.generate_jit("def same(b, h, q_idx, kv_idx):\n    return q_idx >= kv_idx\n", "same", {})
    assert hook_key(a) != hook_key(b) and hook_key(a) == hook_key(a)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# ---------------------------------------------------------------------------------------------
def test_bad_mods_raise_clear_errors():
    def plain(score, b, h, q_idx, kv_idx):
        return score

    with pytest.raises(TypeError, match="kernel must be a @triton.jit function"):
        attnkit.ScoreMod(plain, plain)
    with pytest.raises(TypeError, match="reference must be a callable"):
        attnkit.ScoreMod(scaled_key_bias, "not callable")
    with pytest.raises(TypeError, match="derivative must be a @triton.jit"):
        attnkit.ScoreMod(learned_temperature, learned_temperature_reference, derivative=plain)
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a torch.Tensor"):
        attnkit.ScoreMod(scaled_key_bias, scaled_key_bias_reference, tensors=([1.0],))
    with pytest.raises(TypeError, match="kernel must be a @triton.jit"):
        attnkit.MaskMod(even_keys_reference, even_keys_reference)
    with pytest.raises(ValueError, match="import path"):
        attnkit.MaskMod("no_colon", even_keys_reference)


def test_mods_in_the_wrong_slot_or_on_the_wrong_device():
    q, k, v = kernel_inputs(Nq=16, Nk=16, D=16)
    with pytest.raises(TypeError, match="score_mod got a MaskMod"):
        attnkit.flash_attention(q, k, v, score_mod=mods.causal())
    with pytest.raises(TypeError, match="mask_mod got a ScoreMod"):
        attnkit.flex_attention(q, k, v, mask_mod=mods.softcap(2.0))
    with pytest.raises(TypeError, match="score_mod must be an attnkit.ScoreMod"):
        attnkit.flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s)
    with pytest.raises(TypeError, match="mask_mod must be an attnkit.MaskMod"):
        attnkit.create_block_mask(mods.softcap(2.0), None, None, 16, 16)
    elsewhere = torch.zeros(16, device="meta")
    with pytest.raises(ValueError, match=r"score_mod \(scaled_key_bias\): tensors\[0\] is on meta"):
        attnkit.flash_attention(q, k, v, score_mod=attnkit.ScoreMod(scaled_key_bias, scaled_key_bias_reference,
                                                                    tensors=(elsewhere,)))
    with pytest.raises(ValueError, match="doc_ids is on meta"):
        attnkit.flex_attention(q, k, v, mask_mod=mods.document(torch.zeros(16, dtype=torch.long, device="meta")))
    with pytest.raises(ValueError, match="alibi_slopes is on meta"):
        attnkit.flash_attention(q, k, v, alibi_slopes=torch.ones(2, device="meta"))


def test_library_mods_check_their_tensors():
    q, k, v = kernel_inputs(Nq=16, Nk=16, D=16)
    with pytest.raises(ValueError, match=r"table must have shape \(H, num_buckets\) = \(H, 32\)"):
        mods.relative_position_bias(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="table has 3 heads but q has 2"):
        attnkit.flash_attention(q, k, v, score_mod=mods.relative_position_bias(torch.zeros(3, 32, device=DEVICE)))
    with pytest.raises(ValueError, match=r"table must have shape \(H, 2 \* 3 - 1"):
        mods.relative_position_bias_2d(torch.zeros(2, 5, 4), 3)
    with pytest.raises(ValueError, match="2-D neighborhood attention"):
        attnkit.flash_attention(q, k, v, score_mod=mods.relative_position_bias_2d(torch.zeros(2, 5, 5, device=DEVICE),
                                                                                3))
    with pytest.raises(ValueError, match=r"bias must have shape \(B or 1, Hq, Nk\)"):
        attnkit.flash_attention(q, k, v, score_mod=mods.key_bias(torch.zeros(1, 2, 15, device=DEVICE)))
    with pytest.raises(ValueError, match="slopes has 3 heads"):
        attnkit.flash_attention(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="alibi_slopes must be a floating tensor"):
        attnkit.flash_attention(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="cap must be a finite number > 0"):
        mods.softcap(0.0)
    with pytest.raises(ValueError, match="left must be an int >= -1"):
        mods.sliding_window(-2, 0)
    with pytest.raises(TypeError, match="doc_ids must be an integer tensor"):
        mods.document(torch.zeros(4))
    with pytest.raises(ValueError, match="doc_ids covers 15 key positions but the call has Nk = 16"):
        attnkit.flex_attention(q, k, v, mask_mod=mods.document(torch.zeros(15, dtype=torch.long, device=DEVICE)))


def test_learnable_tensor_without_a_gradient_kernel_is_refused():
    q, k, v = kernel_inputs(Nq=16, Nk=16, D=16)
    bias = torch.zeros(16, device=DEVICE, requires_grad=True)
    mod = attnkit.ScoreMod(scaled_key_bias, scaled_key_bias_reference, tensors=(bias,))
    with pytest.raises(TypeError, match="require grad but the mod has no tensor_grads kernel"):
        attnkit.flash_attention(q, k, v, score_mod=mod, backend="triton")
    with torch.no_grad():  # nothing to differentiate: fine
        attnkit.flash_attention(q, k, v, score_mod=mod, backend="triton")
    out = attnkit.flash_attention(q, k, v, score_mod=mod, backend="reference")  # autograd handles the reference
    out.sum().backward()
    assert bias.grad is not None
