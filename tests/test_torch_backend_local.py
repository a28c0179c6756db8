"""The torch backend of the local variants (sliding_window, neighborhood, decode) against the
float64 reference, with FlashAttention's error rule (forward, LSE, gradients). The variants'
examples run in tests/test_torch_backend.py (the contract test, float32, float64 and
bfloat16); here the awkward sizes of the variants' own tests and sizes long enough that the
batched paths (the banded chunks of sliding_window, the query tiles of neighborhood) have
interior and edge pieces, and checks that the work is batched into few calls."""

import pytest
import torch

import attnkit
from attnkit import Case
from attnkit.registry import packed_offsets
from attnkit.testing import check_case

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = lambda d: str(d).replace("torch.", "")


def _check(variant, case, dtype):
    report = check_case(variant, case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)


def _per_head(rows):
    return lambda g: torch.tensor(rows, dtype=torch.int64)


def _logits(heads):
    return lambda g: torch.randn(heads, generator=g, dtype=torch.float64)


def _slopes(heads):
    return lambda g: 0.05 + 0.2 * torch.rand(heads, generator=g, dtype=torch.float64)


def _alibi(t):
    return {"score_mod": attnkit.mods.alibi(t["slopes"])}


# ------------------------------------------------------------------------------ sliding_window

SW_CASES = [
    # the awkward sizes of tests/test_sliding_window.py
    Case((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), {"window": (50, 70), "sinks": 3}, name="pair_larger_than_n"),
    Case((1, 2, 45, 32), (1, 2, 45, 32), (1, 2, 45, 32), {"window": (0, 0), "sinks": 5}, name="window_0_0_sinks"),
    Case((1, 2, 61, 40), (1, 2, 61, 40), (1, 2, 61, 40), {"window": (9, 17)}, name="noncausal_right17_d40"),
    Case((1, 2, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32), {"window": (-1, 4), "sinks": 2}, name="left_unbounded"),
    Case((1, 2, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32), {"window": (6, -1)}, name="right_unbounded"),
    Case((1, 4, 1, 64), (1, 2, 203, 64), (1, 2, 203, 64), {"window": 40, "sinks": 4}, name="decode_nq1_nk203"),
    Case((1, 2, 57, 32), (1, 2, 57, 32), (1, 2, 57, 32), {"window": 3, "sinks": 100}, name="sinks_ge_n"),
    Case((2, 6, 47, 32), (2, 2, 47, 32), (2, 2, 47, 24), {"sinks": 3},
         {"window": _per_head([[-1, 0], [4, 0], [0, 0], [20, 2], [-1, -1], [8, 0]])}, name="per_head_mixed_gqa"),
    Case((1, 2, 70, 32), (1, 2, 30, 32), (1, 2, 30, 32), {"window": (5, 2), "sinks": 2}, name="nq>nk_empty_rows"),
    # long enough for many chunks: interior chunks (one shared band) between edge chunks
    Case((2, 4, 150, 16), (2, 2, 150, 16), (2, 2, 150, 24), {"window": (24, 5), "sinks": 3},
         name="long_gqa_sinks_dv24"),
    Case((1, 2, 131, 16), (1, 2, 229, 16), (1, 2, 229, 16), {"window": 33, "sinks": 70}, name="long_nq<nk_wide_sinks"),
    Case((1, 2, 229, 16), (1, 2, 131, 16), (1, 2, 131, 16), {"window": (20, 7), "sinks": 2}, name="long_nq>nk"),
    Case((1, 3, 120, 16), (1, 3, 120, 16), (1, 3, 120, 16), {"sinks": 4},
         {"window": _per_head([[-1, 0], [35, 0], [10, 10]]), "sink_logits": _logits(3)},
         name="long_per_head_sink_logits"),
    Case((1, 2, 150, 16), (1, 2, 150, 16), (1, 2, 150, 16), {"window": 40, "sinks": 3, "softcap": 3.0},
         {"slopes": _slopes(2), "sink_logits": _logits(2)}, build=lambda t: dict(_alibi(t), sink_logits=t["sink_logits"]),
         name="long_softcap_alibi_sink_logits"),
    Case((1, 2, 150, 16), (1, 1, 150, 16), (1, 1, 150, 16), {"window": (30, 4), "sinks": 2, "dropout_p": 0.2},
         name="long_dropout_mqa"),
    Case((1, 4, 250, 16), (1, 2, 330, 16), (1, 2, 330, 16), {"window": 37, "sinks": 2},
         {"sink_logits": _logits(4), "cu_seqlens_q": packed_offsets(150, 0, 99, 1),
          "cu_seqlens_k": packed_offsets(170, 3, 156, 1)}, name="long_varlen"),
    # every packed sequence's chunks in one call: mods and dropout see each sequence's index and
    # positions; a sequence without keys, one shorter than the sinks
    Case((1, 2, 120, 16), (1, 1, 127, 16), (1, 1, 127, 16), {"window": (20, 3), "sinks": 5, "softcap": 4.0,
                                                              "dropout_p": 0.2},
         {"slopes": _slopes(2), "cu_seqlens_q": packed_offsets(70, 3, 2, 45),
          "cu_seqlens_k": packed_offsets(80, 0, 2, 45)},
         build=lambda t: dict(_alibi(t), cu_seqlens_q=t["cu_seqlens_q"], cu_seqlens_k=t["cu_seqlens_k"]),
         name="varlen_softcap_alibi_dropout"),
]


@pytest.mark.parametrize("case", SW_CASES, ids=lambda c: c.id)
def test_sliding_window_awkward_and_long(case):
    _check("sliding_window", case, torch.float32)


@pytest.mark.parametrize("name,dtype", [("long_gqa_sinks_dv24", torch.float64), ("long_gqa_sinks_dv24", torch.bfloat16),
                                        ("long_softcap_alibi_sink_logits", torch.bfloat16)])
def test_sliding_window_long_other_dtypes(name, dtype):
    _check("sliding_window", next(c for c in SW_CASES if c.name == name), dtype)


def test_sliding_window_auto_on_cpu_is_torch_and_chunks_are_batched(monkeypatch):
    """auto picks the torch backend on CPU; a long banded problem is a few flash calls (one for
    the interior chunks, one per run of edge chunks, one for the sinks), not one per chunk, and
    they score O(N * W) pairs, not N x N."""
    q = torch.randn(1, 2, 2000, 16)
    assert attnkit.explain(q, q, q, "sliding_window", "auto", window=64, sinks=4).backend == "torch"
    import attnkit.torch_backend as tb

    calls = []
    real = tb._FlashCpu.apply
    monkeypatch.setattr(tb._FlashCpu, "apply", lambda *a: calls.append((a[0].shape, a[1].shape)) or real(*a))
    out = attnkit.sliding_window_attention(q, q, q, window=64, sinks=4)
    ref = attnkit.sliding_window_attention(q, q, q, window=64, sinks=4, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) <= 4, calls
    pairs = sum(qs[0] * qs[2] * ks[2] for qs, ks in calls)  # per head: query rows x keys scored
    assert pairs <= 2.2 * 2000 * (64 + 4), (pairs, calls)  # ~2x the visible pairs; dense: 2000 x 2000


# -------------------------------------------------------------------------------- neighborhood

def _nb(spatial, heads=(2, 2), d=16, dv=None, batch=1, name="", **options):
    hq, hkv = heads
    return Case((batch, hq, *spatial, d), (batch, hkv, *spatial, d), (batch, hkv, *spatial, dv or d), options,
                name=name)


NB_CASES = [
    # the awkward sizes of tests/test_neighborhood.py: odd and even kernels, dilation, causal axes,
    # strides, GQA, Dv != D; maps that are not tile multiples
    _nb((13, 17), kernel_size=(4, 6), name="2d_13x17_k4x6_even"),
    _nb((150,), d=40, dv=24, kernel_size=13, name="1d_150_k13_d40_dv24"),
    _nb((50,), kernel_size=5, dilation=3, name="1d_dil3_L50"),
    _nb((7, 5, 10), heads=(1, 1), kernel_size=(3, 2, 3), dilation=(2, 1, 3), name="3d_dil"),
    _nb((13, 17), kernel_size=(4, 5), causal=(False, True), dilation=(1, 2), name="2d_causal_w_dil"),
    _nb((70,), kernel_size=9, causal=True, name="1d_causal"),
    _nb((12, 14), kernel_size=(4, 7), stride=(4, 7), name="2d_stride_eq_kernel"),
    _nb((13, 17), kernel_size=(5, 3), stride=(3, 2), causal=(True, False), name="2d_stride_causal"),
    _nb((40,), heads=(3, 1), kernel_size=7, scale=0.3, batch=2, name="1d_mqa_scale_b2"),
    # several tiles per axis with a score mod (NATTEN's relative position bias) and a full-size kernel
    Case((1, 2, 19, 21, 16), (1, 1, 19, 21, 16), (1, 1, 19, 21, 16), {"kernel_size": (5, 3)},
         {"rpb": lambda g: torch.randn(2, 9, 5, generator=g, dtype=torch.float64)},
         build=lambda t: {"score_mod": attnkit.mods.relative_position_bias_2d(t["rpb"], (5, 3))},
         name="2d_rpb_gqa"),
    _nb((9, 10), kernel_size=(9, 10), causal=(True, False), name="2d_kernel_is_map"),
]


@pytest.mark.parametrize("case", NB_CASES, ids=lambda c: c.id)
def test_neighborhood_awkward(case):
    _check("neighborhood", case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [c for c in NB_CASES if c.name in ("2d_causal_w_dil", "2d_rpb_gqa")],
                         ids=lambda c: c.id)
def test_neighborhood_other_dtypes(case, dtype):
    _check("neighborhood", case, dtype)


def test_neighborhood_is_one_batched_call(monkeypatch):
    """A 2-D map of many tiles is one flash call over all its tiles, not one per tile."""
    import attnkit.torch_backend as tb

    q = torch.randn(1, 2, 40, 44, 16)
    calls = []
    real = tb._FlashCpu.apply
    monkeypatch.setattr(tb._FlashCpu, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    out = attnkit.neighborhood_attention(q, q, q, kernel_size=7, dilation=(1, 2))
    ref = attnkit.neighborhood_attention(q, q, q, kernel_size=7, dilation=(1, 2), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and calls[0][0] > 10, calls


# -------------------------------------------------------------------------------------- decode

def _ints(*values):
    return lambda g: torch.tensor(values, dtype=torch.int32)


def _table(batch, pages, seed):
    return lambda g: torch.randperm(batch * pages, generator=torch.Generator().manual_seed(seed)).view(
        batch, pages).to(torch.int32)


DECODE_CASES = [
    # a page size the Triton kernel refuses (not a power of two), Nq = 3, per-head windows with
    # sinks, sink logits, softcap and ALiBi; gradients too (the torch backend is differentiable)
    Case((2, 4, 3, 16), (11, 2, 5, 16), (11, 2, 5, 24), {"sinks": 2, "softcap": 3.0},
         {"cache_seqlens": _ints(23, 9), "block_table": _table(2, 5, seed=3),
          "window": lambda g: torch.tensor([[-1, 0], [6, 0], [0, 0], [12, 0]]), "sink_logits": _logits(4),
          "alibi_slopes": _slopes(4)}, name="paged5_nq3_per_head_windows_softcap_alibi_grad"),
    # page selection with GQA and a score mod: keys only from the kept pages of each kv head
    Case((3, 4, 2, 16), (12, 2, 8, 16), (12, 2, 8, 16), {"page_top_k": 3},
         {"cache_seqlens": _ints(30, 2, 17), "block_table": _table(3, 4, seed=4), "slopes": _slopes(4)},
         build=lambda t: {"cache_seqlens": t["cache_seqlens"], "block_table": t["block_table"],
                          "score_mod": attnkit.mods.alibi(t["slopes"])},
         grad=False, name="paged8_top3_gqa_score_mod"),
    # a contiguous cache with full-length and one-token sequences, MQA
    Case((3, 4, 1, 16), (3, 1, 40, 16), (3, 1, 40, 16), {"window": 7, "sinks": 1},
         {"cache_seqlens": _ints(40, 1, 13)}, name="contiguous_mqa_window_grad"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_decode_awkward(case, dtype):
    _check("decode", case, dtype)


def test_decode_is_one_batched_product(monkeypatch):
    """All sequences and kv heads are scored by one matmul (no loop over sequences or heads)."""
    import attnkit.decode.torch_backend as dt

    calls = []
    real = dt.grouped_scores
    monkeypatch.setattr(dt, "grouped_scores", lambda q, k: calls.append(k.shape) or real(q, k))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, 8, 1, 16, generator=g), torch.randn(20, 2, 16, 16, generator=g), \
        torch.randn(20, 2, 16, 16, generator=g)
    table = torch.randperm(20, generator=g).view(5, 4).to(torch.int32)
    lengths = torch.tensor([64, 1, 33, 17, 50], dtype=torch.int32)
    out, scores = attnkit.decode_attention(q, k, v, lengths, block_table=table, page_top_k=2, return_key_scores=True)
    ref, ref_scores = attnkit.decode_attention(q, k, v, lengths, block_table=table, page_top_k=2,
                                               return_key_scores=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=1e-5)
    assert len(calls) == 1 and calls[0][:2] == (5, 2), calls


def test_sliding_window_packed_sequences_are_one_call(monkeypatch):
    """A packed batch of many sequences with a bounded window is one flash call, not one per sequence."""
    import attnkit.torch_backend as tb

    lengths = [7, 0, 30, 1, 12] * 10
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, int(cu[-1]), 16, generator=g) for _ in range(3))
    calls = []
    real = tb._FlashCpu.apply
    monkeypatch.setattr(tb._FlashCpu, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    options = {"window": 5, "sinks": 2, "cu_seqlens_q": cu, "cu_seqlens_k": cu}
    out = attnkit.sliding_window_attention(q, k, v, **options)
    ref = attnkit.sliding_window_attention(q, k, v, backend="reference", **options)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1, calls


def test_explicit_scores_run_in_pieces(monkeypatch):
    """Softcap, mods and dropout take explicit scores; a large call runs them in pieces of the
    blocks (checkpointed under autograd) with the same forward and gradients."""
    import attnkit.torch_backend as tb

    monkeypatch.setattr(tb, "_EXPLICIT_SCORES", 2 * 40 * 80)  # two heads of one 40 x 80 block
    case = Case((1, 2, 150, 16), (1, 1, 150, 16), (1, 1, 150, 16),
                {"window": (30, 4), "sinks": 2, "softcap": 3.0, "dropout_p": 0.2}, name="pieces")
    _check("sliding_window", case, torch.float32)
    _check("neighborhood", _nb((11, 13), kernel_size=5, dropout_p=0.2, name="pieces"), torch.float32)
