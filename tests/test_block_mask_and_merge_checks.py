"""Regression tests (issue 17): BlockMask index ranges checked before any narrowing cast,
``BlockMask.from_mask_fn`` with a mask function of the wrong shape, ``merge_attention``'s
input checks and its rules for -inf / +inf LSEs, and BlockMask block sizes that are
multiples of 16 (but not of the interpreter's default tile) on the Triton kernel."""

import math

import pytest
import torch
from conftest import DEVICE

import attnkit
from attnkit import BlockMask
from attnkit.registry import Case
from attnkit.testing import check_case

# ----------------------------------------------------------------------------- BlockMask ranges

ZERO_COUNTS = torch.zeros(1, 1, 2, dtype=torch.int32)
ONE_COUNTS = torch.ones(1, 1, 2, dtype=torch.int32)


def _lists(value: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """(1, 1, 2, 1) lists whose first row lists ``value`` (two key blocks are valid: 0 and 1)."""
    return torch.tensor([[[[value], [1]]]], dtype=dtype)


def _build(argument: str, value: int, dtype: torch.dtype = torch.int64) -> BlockMask:
    """A 32 x 32 BlockMask with 16-token blocks where ``argument`` holds ``value`` and the rest is valid."""
    if argument == "kv_num_blocks":
        return BlockMask(torch.tensor([[[value, 1]]], dtype=dtype), _lists(0), 16, (32, 32))
    if argument == "kv_indices":
        return BlockMask(ONE_COUNTS, _lists(value, dtype), 16, (32, 32))
    if argument == "full_kv_num_blocks":
        return BlockMask(ZERO_COUNTS, _lists(0), 16, (32, 32), full_kv_num_blocks=torch.tensor(
            [[[value, 1]]], dtype=dtype), full_kv_indices=_lists(0), mask_mod=attnkit.mods.causal())
    return BlockMask(ZERO_COUNTS, _lists(0), 16, (32, 32), full_kv_num_blocks=ONE_COUNTS,
                     full_kv_indices=_lists(value, dtype), mask_mod=attnkit.mods.causal())


ARGUMENTS = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"]


@pytest.mark.parametrize("argument", ARGUMENTS)
@pytest.mark.parametrize("value", [2 ** 32, 2 ** 32 + 1, 2 ** 31, -1, -(2 ** 32), -(2 ** 32) + 1])
def test_block_mask_range_checked_before_the_int32_cast(argument, value):
    # int32(2**32) == 0 and int32(2**32 + 1) == 1 are valid blocks/counts: only a check on the
    # int64 values sees them; each must be refused, naming the argument and the value
    with pytest.raises(ValueError, match=rf"^{argument} holds .*{value}"):
        _build(argument, value)


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_block_mask_valid_int64_lists_are_narrowed_to_int32(argument):
    bm = _build(argument, 1 if argument.endswith("num_blocks") else 0)
    lists = [getattr(bm, name) for name in ARGUMENTS if getattr(bm, name) is not None]
    assert getattr(bm, argument) is not None and all(t.dtype == torch.int32 for t in lists)


@pytest.mark.parametrize("argument", ARGUMENTS)
def test_block_mask_refuses_uint64_lists(argument):
    # int64 cannot hold every uint64 value (2**63 read as int64 is negative), so the range
    # check could report a wrong value: such tensors are refused by type
    with pytest.raises(TypeError, match=rf"^{argument} must be an integer tensor .*uint64"):
        _build(argument, 1 if argument.endswith("num_blocks") else 0, torch.uint64)


@pytest.mark.parametrize("value", [2, -1])
def test_block_mask_from_torch_checks_the_ranges(value):
    # torch's own constructor accepts both (larger indices it refuses itself); index 2 (== the
    # number of key blocks) was silently dropped, -1 failed inside scatter_
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    index = torch.tensor([[[[value, 0], [0, 1]]]], dtype=torch.int64)
    flex = FlexBlockMask.from_kv_blocks(torch.ones(1, 1, 2, dtype=torch.int32), index, BLOCK_SIZE=(16, 16),
                                        seq_lengths=(32, 32))
    with pytest.raises(ValueError, match=rf"^block_mask.kv_indices holds key block {value} out of range"):
        BlockMask.from_torch(flex)


def test_block_mask_from_torch_valid_lists_unchanged():
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    index = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    flex = FlexBlockMask.from_kv_blocks(torch.tensor([[[1, 2]]], dtype=torch.int32), index, BLOCK_SIZE=(16, 16),
                                        seq_lengths=(32, 32))
    assert BlockMask.from_torch(flex).to_dense()[0, 0].tolist() == [[False, True], [True, True]]


# ----------------------------------------------------------------------------- from_mask_fn shape

@pytest.mark.parametrize("fn", [
    lambda b, h, q, kv: (q >= kv).flatten(),                               # 1-D
    lambda b, h, q, kv: (q >= kv).transpose(-1, -2),                       # (Mk, Mq)
    lambda b, h, q, kv: (q >= kv).unsqueeze(0),                            # rank 5
    lambda b, h, q, kv: torch.ones(3, 1, 1, 1, dtype=torch.bool) & (q >= kv),  # batch 3, B = 2
], ids=["flat", "transposed", "rank5", "batch3"])
def test_from_mask_fn_wrong_output_shape_is_a_clear_error(fn):
    with pytest.raises(ValueError, match=r"^fn\(b, h, q_idx, kv_idx\) returned shape .* broadcastable to "
                                         r"\(Bm, Hm, Mq, Mk\) = \(2, 1, 32, 48\)"):
        BlockMask.from_mask_fn(fn, 2, None, 32, 48, 16)


def test_from_mask_fn_broadcastable_shapes_still_work():
    causal = BlockMask.from_mask_fn(lambda b, h, q, kv: q >= kv, 2, 2, 32, 32, 16)
    two_d = BlockMask.from_mask_fn(lambda b, h, q, kv: (q >= kv)[0, 0], 2, 2, 32, 32, 16)
    assert torch.equal(causal.to_dense(), two_d.to_dense())
    assert causal.to_dense()[0, 0].tolist() == [[True, False], [True, True]]


# ----------------------------------------------------------------------------- merge_attention

def _parts(p=2, shape=(1, 2, 3), dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(*shape, dv, generator=g) for _ in range(p)]
    lses = [torch.randn(*shape, generator=g) for _ in range(p)]
    return outs, lses


def test_merge_lse_of_the_wrong_shape():
    outs, lses = _parts()
    with pytest.raises(ValueError, match=r"^lses\[0\] must have shape \(B, H, N\) = \(1, 2, 3\).*got \(3,\)"):
        attnkit.merge_attention(outs, [lses[0][0, 0], lses[1][0, 0]])
    with pytest.raises(ValueError, match=r"^lses\[1\] must have shape \(B, H, N\) = \(1, 2, 3\).*got \(3,\)"):
        attnkit.merge_attention(outs, [lses[0], lses[1][0, 0]])
    with pytest.raises(ValueError, match=r"^outputs\[1\] must have shape \(1, 2, 3, 4\)"):
        attnkit.merge_attention([outs[0], outs[1][:, :, :2]], lses)
    with pytest.raises(ValueError, match=r"^outputs\[0\] must have rank 4 \(B, H, N, Dv\)"):
        attnkit.merge_attention([o[0] for o in outs], [lse[0] for lse in lses])


def test_merge_types_devices_and_lengths():
    outs, lses = _parts()
    with pytest.raises(TypeError, match=r"^outputs must be a list or tuple of tensors, got Tensor"):
        attnkit.merge_attention(torch.stack(outs), torch.stack(lses))
    with pytest.raises(TypeError, match=r"^outputs\[0\] must be a torch.Tensor, got list"):
        attnkit.merge_attention([outs[0].tolist(), outs[1]], lses)
    with pytest.raises(TypeError, match=r"^lses\[0\] must be a torch.Tensor, got float"):
        attnkit.merge_attention(outs, [1.0, lses[1]])
    with pytest.raises(TypeError, match=r"^lses\[0\] must be a floating tensor"):
        attnkit.merge_attention(outs, [lses[0].long(), lses[1]])
    with pytest.raises(TypeError, match=r"^outputs\[1\] has dtype torch.float64 but outputs\[0\] has torch.float32"):
        attnkit.merge_attention([outs[0], outs[1].double()], lses)
    with pytest.raises(TypeError, match=r"^lses\[1\] has dtype torch.float64 but lses\[0\] has torch.float32"):
        attnkit.merge_attention(outs, [lses[0], lses[1].double()])
    with pytest.raises(ValueError, match=r"^lses\[1\] is on meta but outputs\[0\] is on cpu"):
        attnkit.merge_attention(outs, [lses[0], lses[1].to("meta")])
    with pytest.raises(ValueError, match=r"^outputs\[1\] is on meta but outputs\[0\] is on cpu"):
        attnkit.merge_attention([outs[0], outs[1].to("meta")], lses)
    with pytest.raises(ValueError, match=r"^need as many outputs as lses \(at least one\), got 2 and 1"):
        attnkit.merge_attention(outs, lses[:1])
    with pytest.raises(ValueError, match=r"at least one"):
        attnkit.merge_attention([], [])


def test_merge_positive_infinite_lse_is_an_error():
    outs, lses = _parts()
    lses[1][0, 1, 2] = math.inf
    with pytest.raises(ValueError, match=r"^lses\[1\] holds \+inf"):
        attnkit.merge_attention(outs, lses)


def test_merge_rows_no_part_saw_and_parts_that_saw_nothing():
    outs, lses = _parts(p=3)
    lses = [lse.clone() for lse in lses]
    for lse in lses:              # row 0 of head 0: no part saw a key
        lse[0, 0, 0] = -math.inf
    lses[0][0, 1, :] = -math.inf  # head 1: part 0 saw nothing, the others decide
    outs = [o.requires_grad_() for o in outs]
    lses = [lse.requires_grad_() for lse in lses]
    out, lse = attnkit.merge_attention(outs, lses)
    assert torch.all(out[0, 0, 0] == 0) and torch.isneginf(lse[0, 0, 0])
    rest, rest_lse = attnkit.merge_attention(outs[1:], lses[1:])
    torch.testing.assert_close(out[0, 1], rest[0, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(lse[0, 1], rest_lse[0, 1], rtol=0, atol=1e-6)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in outs + lses)
    assert torch.all(outs[0].grad[0, 1] == 0)  # a part that saw nothing gets no gradient


def test_merge_numerics_and_dtypes():
    outs, lses = _parts(p=3, seed=3)
    out, lse = attnkit.merge_attention(outs, lses)
    stack = torch.stack(lses).double()
    expected_lse = torch.logsumexp(stack, 0)
    weights = torch.exp(stack - expected_lse)
    expected = sum(w[..., None] * o.double() for w, o in zip(weights, outs))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)
    # half outputs with float32 LSEs (what the ops return) are fine; out keeps the outputs' dtype
    half, half_lse = attnkit.merge_attention([o.half() for o in outs], lses)
    assert half.dtype == torch.float16 and half_lse.dtype == torch.float32


# ----------------------------------------------------------------------------- kernel block sizes


@pytest.mark.parametrize("block_size,causal", [((16, 16), False), ((16, 16), True), ((48, 48), True),
                                               ((16, 48), False), ((48, 16), True)],
                         ids=["16", "16-causal", "48-causal", "16x48", "48x16-causal"])
def test_block_sparse_kernel_runs_block_sizes_of_multiples_of_16(block_size, causal):
    bq, bk = block_size
    nq, nk = 80, 96
    g = torch.Generator().manual_seed(bq + bk)
    dense = torch.rand(1, 2, -(-nq // bq), -(-nk // bk), generator=g) < 0.6
    dense[..., -1, -1] = True  # the causal diagonal block is listed: no empty tail rows only
    bm = BlockMask.from_dense(dense, block_size, (nq, nk))
    q = torch.zeros(1, 2, nq, 16, device=DEVICE)
    k = torch.zeros(1, 1, nk, 16, device=DEVICE)
    assert attnkit.explain(q, k, k, "block_sparse", "triton", block_mask=bm, causal=causal).kernel_blockers == []
    case = Case((1, 2, nq, 16), (1, 1, nk, 16), (1, 1, nk, 16), {"block_mask": bm, "causal": causal},
                name=f"bs{bq}x{bk}")
    report = check_case("block_sparse", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)
    assert {c.name for c in report.comparisons} >= {"out", "lse", "dq", "dk", "dv"}


def test_flex_with_a_block_mask_of_16_runs_on_the_kernel():
    bm = attnkit.create_block_mask(attnkit.mods.causal(), None, None, 64, 64, block_size=16, device=DEVICE)
    case = Case((1, 1, 64, 16), (1, 1, 64, 16), (1, 1, 64, 16), {"block_mask": bm}, name="flex16")
    report = check_case("flex", case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.ok, str(report)


def test_block_sparse_auto_without_triton_runs_the_reference(monkeypatch):
    # where triton is not installed (it is a Linux-only dependency) the tile check must not
    # import the kernels: auto falls back to the reference, explain lists the reason
    import sys

    from attnkit import dispatch

    monkeypatch.setattr(dispatch, "_TRITON_ERROR", "triton is not importable (test)")  # its cached reason
    monkeypatch.setitem(sys.modules, "attnkit.kernels.engine", None)  # importing it raises ImportError
    q = torch.randn(1, 1, 32, 16)
    bm = BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16, (32, 32))
    assert attnkit.explain(q, q, q, "block_sparse", block_mask=bm).kernel_blockers == [
        "triton is not importable (test)"]
    out = attnkit.block_sparse_attention(q, q, q, bm)
    torch.testing.assert_close(out, attnkit.flash_attention(q, q, q, backend="reference"))
