"""The torch backend (issue 16) of block_sparse, moba, linear and lightning: the awkward
sizes of each variant's own tests, against the float64 reference (the contract test in
tests/test_torch_backend.py runs every variant's examples)."""

import pytest
import torch

import attnkit
from attnkit.registry import Case, packed_offsets
from attnkit.testing import check_case

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "bf16"]


def assert_matches(name, case, dtype):
    report = check_case(name, case, dtype=dtype, device="cpu", backend="torch")
    assert report.ok, str(report)
    assert any(c.name == "dq" for c in report.comparisons) or not case.grad, str(report)


# ---------------------------------------------------------------- linear / lightning


def _rates(heads, big=False):
    # big: decay rates whose lambda^(-chunk) overflows (padded rows must weigh 0, not inf * 0)
    return lambda g: torch.rand(heads, generator=g, dtype=torch.float64) * (8.0 if big else 0.5) + 0.02


def _state(*shape):
    return lambda g: torch.randn(shape, generator=g, dtype=torch.float64) * 0.5


LINEAR_CASES = [
    # several chunks, the last one short; GQA; decay and an initial state
    Case((2, 4, 200, 16), (2, 2, 200, 16), (2, 2, 200, 24), {},
         {"decay": _rates(4), "initial_state": _state(2, 4, 16, 24)}, name="chunks_gqa_decay_state"),
    # large decay rates over a short last chunk
    Case((1, 2, 150, 16), (1, 2, 150, 16), (1, 2, 150, 16), {}, {"decay": _rates(2, big=True)},
         name="big_decay"),
    # packed: lengths crossing chunk boundaries, empty and one-token sequences, sorted neither way
    Case((1, 2, 260, 16), (1, 1, 260, 16), (1, 1, 260, 8), {"feature_map": "elu+1", "normalize": True},
         {"decay": _rates(2), "initial_state": _state(6, 2, 16, 9),
          "cu_seqlens": packed_offsets(1, 64, 130, 0, 65, 0)}, name="varlen_chunk_edges_normalize"),
    Case((1, 2, 128, 16), (1, 2, 128, 16), (1, 2, 128, 16), {}, {"cu_seqlens": packed_offsets(0, 128)},
         name="varlen_no_decay_whole_chunks"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: c.id)
def test_linear_torch_awkward_sizes(case, dtype):
    assert_matches("linear", case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_lightning_torch_long_packed(dtype):
    case = Case((1, 4, 300, 16), (1, 4, 300, 16), (1, 4, 300, 16), {},
                {"slopes": lambda g: attnkit.lightning_slopes(4).double(), "initial_state": _state(3, 4, 16, 16),
                 "cu_seqlens": packed_offsets(70, 200, 30)}, name="lightning_packed")
    assert_matches("lightning", case, dtype)


def test_linear_torch_hedgehog_gradients_reach_the_feature_map():
    fmap = attnkit.feature_maps.Hedgehog(16)
    q, k, v = (torch.randn(1, 2, 90, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    grads = []
    for backend in ("reference", "torch"):
        fmap.zero_grad()
        out = attnkit.linear_attention(q, k, v, feature_map=fmap, backend=backend)
        out.square().sum().backward()
        grads.append((out.detach(), fmap.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-5)


def test_linear_torch_pieces_equal_one_call():
    # a sequence in pieces, each given the previous state, equals one call (chunk edges inside pieces)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 170, 16, generator=g, dtype=torch.float64) for _ in range(3))
    decay = torch.tensor([0.1, 0.3], dtype=torch.float64)
    whole, s_whole = attnkit.linear_attention(q, k, v, decay=decay, return_state=True, backend="torch")
    state, outs = None, []
    for lo, hi in ((0, 1), (1, 100), (100, 170)):
        out, state = attnkit.linear_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], decay=decay,
                                              initial_state=state, return_state=True, backend="torch")
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole)
    torch.testing.assert_close(state, s_whole)


def test_auto_on_cpu_takes_the_torch_backend_for_linear_and_lightning():
    q = torch.randn(1, 2, 8, 16)
    assert attnkit.explain(q, q, q, "linear").backend == "torch"
    assert attnkit.explain(q, q, q, "lightning", slopes=attnkit.lightning_slopes(2)).backend == "torch"


# ---------------------------------------------------------------- block_sparse

mods = attnkit.mods


def _random_mask(batch, heads, nq, nk, block, density, seed, empty_row=None):
    bq, bk = (block, block) if isinstance(block, int) else block
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, heads, -(-nq // bq), -(-nk // bk), generator=g) < density
    if empty_row is not None:
        dense[..., empty_row, :] = False
    return attnkit.BlockMask.from_dense(dense, (bq, bk), (nq, nk))


def _docs(n, *lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return lambda g: torch.cat([ids, torch.full((max(0, n - len(ids)),), len(lengths))])[:n]


BLOCK_SPARSE_CASES = [
    # per batch entry and head lists, GQA, ragged last query and key blocks, bq != bk, Dv != D, causal Nq < Nk
    Case((2, 4, 70, 32), (2, 2, 90, 32), (2, 2, 90, 24),
         {"block_mask": _random_mask(2, 4, 70, 90, (32, 16), 0.5, seed=7, empty_row=1), "causal": True},
         name="per_batch_head_gqa_ragged_causal"),
    # shared lists, causal Nq > Nk (rows before key 0), MQA
    Case((1, 4, 100, 16), (1, 1, 60, 16), (1, 1, 60, 16),
         {"block_mask": _random_mask(1, 1, 100, 60, 16, 0.7, seed=8), "causal": True}, name="nq>nk_mqa"),
    # a BlockMask carrying a mask_mod (full tiles whole, partial tiles cut), with an explicit mask_mod on top
    Case((1, 2, 113, 32), (1, 2, 113, 32), (1, 2, 113, 32), {}, {"docs": _docs(113, 20, 45, 9)},
         build=lambda t: {"block_mask": attnkit.create_block_mask(
             mods.and_masks(mods.causal(), mods.document(t["docs"])), None, None, 113, 113, block_size=32,
             device=t["docs"].device), "mask_mod": mods.sliding_window(40, 0)},
         name="create_block_mask_document_and_window"),
    # a learnable ALiBi score mod, softcap and dropout on per-head lists (explicit scores)
    Case((2, 2, 64, 32), (2, 1, 80, 32), (2, 1, 80, 32),
         {"block_mask": _random_mask(1, 2, 64, 80, 16, 0.6, seed=9), "causal": True, "softcap": 3.0,
          "dropout_p": 0.2},
         {"slopes": lambda g: torch.rand(2, 2, generator=g, dtype=torch.float64) + 0.1},
         build=lambda t: {"score_mod": mods.alibi(t["slopes"])}, name="alibi_softcap_dropout_per_head"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", BLOCK_SPARSE_CASES, ids=lambda c: c.id)
def test_block_sparse_torch_awkward_sizes(case, dtype):
    assert_matches("block_sparse", case, dtype)


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_block_sparse_torch_split_calls_match(monkeypatch, explicit):
    # tiny budgets: every group of rows is cut into many calls (checkpointed when explicit)
    import attnkit.block_sparse.torch_backend as tb

    monkeypatch.setattr(tb, "GATHER_BUDGET", 1)
    monkeypatch.setattr(tb, "SCORE_BUDGET", 1)
    case = Case((1, 2, 96, 16), (1, 2, 96, 16), (1, 2, 96, 16),
                {"block_mask": _random_mask(1, 1, 96, 96, 16, 0.5, seed=3), "causal": True,
                 "softcap": 2.0 if explicit else None}, name="split")
    assert_matches("block_sparse", case, torch.float64)


def test_block_sparse_torch_computes_only_the_listed_tiles(monkeypatch):
    # every fused call sees whole listed key blocks and nothing else: the work is the listed tiles
    import attnkit.block_sparse.torch_backend as tb

    seen = []

    def spy(q, k, v, **kw):
        seen.append((q.shape[0] * q.shape[1] * q.shape[2], k.shape[2]))
        return tb.__dict__["_sdpa"](q, k, v, **kw)

    monkeypatch.setitem(tb.__dict__, "_sdpa", tb.sdpa_with_lse)
    monkeypatch.setattr(tb, "sdpa_with_lse", spy)
    n, block, heads = 256, 32, 2
    mask = _random_mask(1, 1, n, n, block, 0.3, seed=11)
    q = torch.randn(1, heads, n, 16)
    attnkit.block_sparse_attention(q, q, q, mask, backend="torch")
    rows = mask.to_dense()[0, 0]
    assert sum(m * keys for m, keys in seen) == heads * block * block * int(rows.sum())
    assert len(seen) == len(set(rows.sum(-1).tolist()) - {0})   # one call per distinct list length


# ---------------------------------------------------------------- moba

MOBA_CASES = [
    # a block selected by more rows than one group holds; GQA; Dv != D; block not dividing N
    Case((1, 4, 300, 16), (1, 2, 300, 16), (1, 2, 300, 24), {"block_size": 24, "top_k": 4}, name="groups_gqa_bs24"),
    # top_k = 1: causal inside each block only; Nq < Nk
    Case((1, 2, 50, 16), (1, 2, 90, 16), (1, 2, 90, 16), {"block_size": 16, "top_k": 1}, name="top1_nq<nk"),
    # top_k past the number of blocks (full causal), Nq > Nk (rows that see nothing)
    Case((1, 2, 90, 16), (1, 1, 70, 16), (1, 1, 70, 16), {"block_size": 16, "top_k": 10}, name="topk_all_nq>nk"),
    # fewer keys than a block: no complete block to select
    Case((2, 2, 20, 16), (2, 2, 20, 16), (2, 2, 20, 16), {"block_size": 32, "top_k": 3}, name="nk<block"),
    # packed: an empty sequence, one with keys and no query, blocks restarting at each; dropout
    Case((1, 2, 78, 16), (1, 1, 116, 16), (1, 1, 116, 16), {"block_size": 8, "top_k": 3, "dropout_p": 0.2},
         {"cu_seqlens_q": packed_offsets(5, 40, 0, 33), "cu_seqlens_k": packed_offsets(5, 64, 7, 40)},
         name="varlen_dropout_bs8"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", MOBA_CASES, ids=lambda c: c.id)
def test_moba_torch_awkward_sizes(case, dtype):
    assert_matches("moba", case, dtype)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_moba_torch_small_groups_and_gate_chunks(monkeypatch, dropout_p):
    # sequences padded to 4 rows and a gate of a few rows per step: many calls, padded rows
    import attnkit.block_sparse.torch_backend as tb

    monkeypatch.setattr(tb, "MOBA_ROW_PAD", 4)
    monkeypatch.setattr(tb, "GATE_BUDGET", 64)
    monkeypatch.setattr(tb, "SCORE_BUDGET", 256)
    case = Case((1, 2, 70, 16), (1, 2, 80, 16), (1, 2, 80, 16),
                {"block_size": 8, "top_k": 3, "dropout_p": dropout_p}, name="small_groups")
    assert_matches("moba", case, torch.float64)


def test_moba_torch_uses_the_reference_gate(monkeypatch):
    # the selection is the reference's moba_gate (not a re-implementation that could pick other blocks)
    import attnkit.block_sparse.torch_backend as tb

    calls = []
    monkeypatch.setattr(tb, "moba_gate", lambda *a, **kw: calls.append(kw) or tb.__dict__["_gate"](*a, **kw))
    monkeypatch.setitem(tb.__dict__, "_gate", attnkit.block_sparse.reference.moba_gate)
    q = torch.randn(1, 2, 64, 16)
    attnkit.moba_attention(q, q, q, block_size=16, top_k=2, backend="torch")
    assert calls and all(kw["block_size"] == 16 and kw["top_k"] == 2 for kw in calls)


# ---------------------------------------------------------------- strided inputs


@pytest.mark.parametrize("name", ["block_sparse", "moba", "linear", "lightning"])
def test_torch_backend_reads_bshd_views(name):
    # layout="bshd" hands the torch backend strided (B, H, N, D) views, not contiguous tensors
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    options = {
        "block_sparse": {"block_mask": _random_mask(1, 1, 96, 96, 16, 0.6, seed=1), "causal": True},
        "moba": {"block_size": 16, "top_k": 3},
        "linear": {"decay": torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)},
        "lightning": {"slopes": attnkit.lightning_slopes(4).double()},
    }[name]
    out = attnkit.attention(q, k, v, name, "torch", layout="bshd", **options)
    expected = attnkit.attention(q, k, v, name, "reference", layout="bshd", **options)
    torch.testing.assert_close(out, expected)
