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
