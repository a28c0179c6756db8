"""The fused engine's list mode (FlexAttention-style block lists) against the flash reference:
causal tiles listed as full or partial, lists of different widths, broadcast and per-head lists,
and list block sizes that are multiples of the kernel tile."""

import pytest
import torch

import attnkit
from attnkit.engine import BlockLists, Const, Schedule, fused_attention
from attnkit.extension import force_config
from attnkit.kernels import flash as flash_kernels

from conftest import DEVICE


def causal_tiles(Nq, Nk, BQ, BK):
    """(full, partial) boolean tile maps of a bottom-right causal mask."""
    offset = Nk - Nq
    nq, nk = -(-Nq // BQ), -(-Nk // BK)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    part = torch.zeros_like(full)
    for i in range(nq):
        first_row, last_row = i * BQ, min(Nq, (i + 1) * BQ) - 1
        for j in range(nk):
            first_key, last_key = j * BK, min(Nk, (j + 1) * BK) - 1
            if last_key <= first_row + offset:
                full[i, j] = True
            elif first_key <= last_row + offset:
                part[i, j] = True
    return full, part


def to_lists(tiles, width=None):
    """Counts (1, 1, R) and indices (1, 1, R, width) of a boolean tile map, each row's entries first."""
    counts = tiles.sum(1).to(torch.int32)
    width = width or max(1, int(counts.max()))
    index = torch.zeros(tiles.shape[0], width, dtype=torch.int32)
    for r in range(tiles.shape[0]):
        cols = tiles[r].nonzero().flatten()
        index[r, :len(cols)] = cols.to(torch.int32)
    return counts[None, None].to(DEVICE), index[None, None].to(DEVICE)


def causal_lists(Nq, Nk, BQ, BK, per_head=1):
    full, part = causal_tiles(Nq, Nk, BQ, BK)
    lists = []
    for m, extra in ((full, 0), (part, 3), (full.T.contiguous(), 0), (part.T.contiguous(), 3)):
        c, x = to_lists(m, width=max(1, int(m.sum(1).max())) + extra)  # partial lists wider on purpose
        lists += [c.expand(1, per_head, -1).contiguous(), x.expand(1, per_head, -1, -1).contiguous()]
    return BlockLists(BQ, BK, *lists)


@pytest.mark.parametrize("tile,blocks", [((32, 16), (32, 32)), ((16, 32), (32, 64)), ((32, 32), (64, 32))])
@pytest.mark.parametrize("per_head", [False, True])
def test_list_mode_equals_the_causal_reference(tile, blocks, per_head):
    torch.manual_seed(0)
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 70, 90, 32
    q = torch.randn(B, Hq, Nq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, device=DEVICE, requires_grad=True)
    lists = causal_lists(Nq, Nk, *blocks, per_head=Hq if per_head else 1)
    assert lists.kv_full_index.shape[-1] != lists.kv_part_index.shape[-1]  # different widths on purpose
    schedule = Schedule(mask=flash_kernels.flash_mask, lists=lists, args=(Const(1),))
    with force_config(*tile):
        out, lse = fused_attention(q, k, v, schedule, sm_scale=0.2)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref, ref_lse = attnkit.flash_attention(q, k, v, causal=True, scale=0.2, return_lse=True, backend="reference")
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unlisted_rows_give_zero_and_neg_inf():
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    tiles = torch.zeros(2, 2, dtype=torch.bool)
    tiles[1, 0] = True  # only the second query block sees anything
    empty = torch.zeros_like(tiles)
    lists = BlockLists(32, 32, *to_lists(tiles), *to_lists(empty), *to_lists(tiles.T.contiguous()),
                       *to_lists(empty))
    schedule = Schedule(mask=flash_kernels.flash_mask, lists=lists, args=(Const(0),))
    with force_config(32, 16):
        out, lse = fused_attention(q, k, v, schedule, sm_scale=0.25)
    assert torch.all(out[:, :, :32] == 0) and torch.isneginf(lse[:, :, :32]).all()
    ref = attnkit.flash_attention(q[:, :, 32:], k[:, :, :32], v[:, :, :32], scale=0.25, backend="reference")
    torch.testing.assert_close(out[:, :, 32:], ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.all(q.grad[:, :, :32] == 0)
    assert torch.all(k.grad[:, :, 32:] == 0)


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("head_dim,precision,lists", [(64, "tf32", None), (128, "tf32", None), (256, "tf32", None),
                                                      (128, "ieee", None), (128, "tf32", (64, 32)),
                                                      (64, "tf32", (16, 16))])
def test_autotune_prune_keeps_valid_configs(kind, head_dim, precision, lists):
    """The GPU autotune tables always keep something, and only tiles that fit the problem."""
    from attnkit.kernels.engine import configs

    named = dict(BLOCK_D=head_dim, BLOCK_DV=head_dim, DOT_PRECISION=precision, LISTS=() if lists else None,
                 LIST_BQ=lists[0] if lists else 1, LIST_BK=lists[1] if lists else 1)
    kept = configs.prune(configs.autotune_configs(kind), {}, **named)
    assert kept
    for cfg in kept:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if lists:
            assert lists[0] % bm == 0 and lists[1] % bn == 0
        elem = 4 if precision == "ieee" else 2
        assert elem * (bm * head_dim + cfg.num_stages * bn * 2 * head_dim) <= configs.smem_limit() or (bm, bn) == (16, 16)


# ---------------------------------------------------------------------------------------------
# The schedule checker catches wrong schedules; a mask_mod applies in full blocks by default.
# ---------------------------------------------------------------------------------------------
def causal_mask(Nq, Nk):
    return torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)


def test_check_schedule_accepts_right_and_rejects_wrong_schedules():
    from attnkit.flash import flash_schedule
    from attnkit.testing import check_schedule

    check_schedule(flash_schedule(True), causal_mask(45, 70), tilings=[(16, 16), (32, 16)], tight=True)
    check_schedule(flash_schedule(False), torch.ones(45, 70, dtype=torch.bool), tilings=[(16, 32)], tight=True)
    first_keys = torch.arange(70)[None, :].expand(45, 70) < 48   # keys 48.. never visible: dense visits too much
    with pytest.raises(AssertionError, match="is visited without a visible pair"):
        check_schedule(flash_schedule(False), first_keys, tilings=[(16, 16)])
    with pytest.raises(AssertionError, match="holds a visible pair but is not visited"):
        check_schedule(flash_schedule(True), torch.ones(40, 40, dtype=torch.bool), tilings=[(16, 16)])
    with pytest.raises(AssertionError, match="full segment but some of its pairs are masked"):
        check_schedule(flash_schedule(False), torch.ones(40, 40, dtype=torch.bool).tril(10), tilings=[(16, 16)])
    with pytest.raises(AssertionError, match="not in the full segment"):  # causal diagonal visited masked: fine ...
        check_schedule(Schedule(kv_range=flash_kernels.masked_kv_range, q_range=flash_kernels.masked_q_range,
                                args=(Const(0),)), torch.ones(32, 32, dtype=torch.bool), tilings=[(16, 16)],
                       tight=True)  # ... but not tight


def test_check_schedule_on_block_lists():
    from attnkit.testing import check_schedule

    lists = causal_lists(70, 90, 32, 16)
    check_schedule(Schedule(mask=flash_kernels.flash_mask, lists=lists, args=(Const(1),)), causal_mask(70, 90))
    with pytest.raises(AssertionError, match="listed"):
        check_schedule(Schedule(mask=flash_kernels.flash_mask, lists=lists, args=(Const(1),)),
                       torch.ones(70, 90, dtype=torch.bool))


def test_mask_mod_applies_in_full_blocks_unless_told_otherwise():
    """A dense schedule (every block full) with a causal mask_mod gives causal attention."""
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE) for _ in range(3))
    dense = Schedule(mask=flash_kernels.flash_mask, kv_range=flash_kernels.flash_kv_range,
                     q_range=flash_kernels.flash_q_range, args=(Const(0),))
    out, _ = fused_attention(q, k, v, dense, sm_scale=0.25, mask_mod=attnkit.mods.causal())
    ref = attnkit.flash_attention(q, k, v, causal=True, scale=0.25, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    skipped, _ = fused_attention(q, k, v, dense, sm_scale=0.25, mask_mod=attnkit.mods.causal(),
                                 mask_mod_in_full_blocks=False)
    assert (skipped - ref).abs().max() > 0.1  # the caller promised full blocks need no mask: it is not applied


def test_tiling_sweep_raises_when_the_kernel_cannot_run_at_all(monkeypatch):
    """A sweep never passes on nothing: a kernel blocker independent of the tiling is an error."""
    from attnkit.testing import check_variant

    case = attnkit.get_variant("flash").examples()[0]
    big = attnkit.Case((1, 1, 16, 300), (1, 1, 16, 300), (1, 1, 16, 300), name="head_dim_300")
    with pytest.raises(ValueError, match="cannot run case 'head_dim_300' at any tiling"):
        check_variant("flash", [big], dtype=torch.float32, device=DEVICE, tilings=[(16, 16)])
    reports = check_variant("flash", [case], dtype=torch.float32, device=DEVICE, tilings=[(16, 16)])
    assert reports[0].ok and reports[0].comparisons


@pytest.mark.parametrize("scale", [-1.0, 0.0, None])
@pytest.mark.parametrize("sinks", [False, True])
def test_scale_sign_empty_rows_and_sinks_in_the_folded_softmax(scale, sinks):
    """The forward folds the scale into the exp2 argument only for scale > 0 (the row max is
    taken on q.k) and skips the empty-row guard where no row can be empty; a negative or zero
    scale, rows that see no key (causal, Nq > Nk) and sink logits must still match the reference.
    Scores of a few hundred log2 units make a wrong running max overflow exp2."""
    torch.manual_seed(1)
    B, H, Nq, Nk, D = 1, 2, 40, 24, 16
    q = (6 * torch.randn(B, H, Nq, D, device=DEVICE)).requires_grad_()
    k = (6 * torch.randn(B, H, Nk, D, device=DEVICE)).requires_grad_()
    v = torch.randn(B, H, Nk, D, device=DEVICE, requires_grad=True)
    extra = {"sink_logits": torch.randn(H, device=DEVICE)} if sinks else {}
    outs = []
    for backend in ("triton", "reference"):
        for causal in (False, True):
            o, lse = attnkit.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True,
                                             backend=backend, **extra)
            grads = torch.autograd.grad((o * o).sum(), (q, k, v))
            outs.append((o, lse, *grads))
    half = len(outs) // 2
    for got, want in zip(outs[:half], outs[half:]):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)


TMA_VARIANTS = ("flash", "sliding_window", "block_sparse", "moba", "neighborhood", "flex")


@pytest.mark.parametrize("name", TMA_VARIANTS)
def test_tma_loads_match_the_reference(name):
    """The TMA configs read Q, K, V, dO and write O through tensor descriptors (the copy engine
    zero-fills past the ends instead of masks): each engine variant's first example and its first
    packed (varlen) one through them, forward, LSE and gradients."""
    from attnkit.testing import check_case

    cases = attnkit.get_variant(name).examples()
    varlen = [c for c in cases if "cu_seqlens_q" in c.tensors]
    with force_config(16, 16, tma=True):
        for case in [cases[0]] + varlen[:1]:  # (every example of every variant: minutes in the interpreter)
            report = check_case(name, case, dtype=torch.float32, device=DEVICE, backend="triton")
            assert report.ok, f"{name} {case.id}:\n{report}"


def test_tma_configs_are_pruned_where_descriptors_cannot_run():
    from attnkit.kernels.engine import configs

    table = configs.autotune_configs("fwd")
    twins = [c for c in table if c.kwargs["TMA"]]
    assert twins and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= configs.TMA_MIN_TILE for c in twins)
    aligned = torch.zeros(1, 2, 64, 64, dtype=torch.float16)
    odd = torch.zeros(1, 2, 64, 12, dtype=torch.float16)[..., :9]  # rows of 24 bytes: not 16-byte multiples
    args = {"BLOCK_D": 64, "BLOCK_DV": 64, "DOT_PRECISION": "tf32", "Q": aligned, "K": aligned, "V": aligned}
    kept = configs.prune(table, args, arch=90)
    assert any(c.kwargs["TMA"] for c in kept)
    assert not any(c.kwargs["TMA"] for c in configs.prune(table, args, arch=80))
    assert not any(c.kwargs["TMA"] for c in configs.prune(table, dict(args, K=odd), arch=90))
    assert not any(c.kwargs["TMA"] for c in configs.prune(table, dict(args, V=aligned[1:].transpose(2, 3)), arch=90))
