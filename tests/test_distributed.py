"""attnkit.distributed: ring / Ulysses / tree decoding / LASP-2 on gloo, against the
single-process result, forward and gradients.

Each world size (2 and 4 ranks) is ONE spawned gloo group on 127.0.0.1 that runs every
check in ``CHECKS`` and writes its outcome per check; the pytest tests then report the
checks one by one. Start-up (importing torch in W processes) dominates the time, so
checks are batched. Workers end as docs/distributed.md says (barrier, destroy the group,
``os._exit(0)``); the parent kills any worker still alive at the deadline.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from gloo_group import assert_check, run_group
import attnkit
from attnkit.distributed import (LAYOUTS, lasp2_lightning_attention, lasp2_linear_attention, ring_attention,
                                 shard_sequence, tree_decode, ulysses_attention, unshard_sequence)
from attnkit.distributed import costs
from attnkit.distributed._blocks import block_backward_kernel, block_backward_torch, block_forward
from attnkit.distributed.layout import block_plan, positions

GROUP_TIMEOUT_S = 30      # a collective that waits longer than this fails (gloo timeout)
DEADLINE_S = 150          # the whole spawned group, start-up included
ATOL, RTOL = 3e-5, 1e-4


# --------------------------------------------------------------------------- helpers

def rand(seed: int, *shape: int, low: float = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if low is not None:
        return torch.rand(*shape, generator=g) * 0.5 + low
    return torch.randn(*shape, generator=g)


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.allclose(got.float(), want.float(), atol=ATOL, rtol=RTOL):
        err = (got.float() - want.float()).abs().max().item()
        raise AssertionError(f"{name}: max abs error {err:.3g} (shape {tuple(got.shape)})")


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def grads_of(fn, inputs, weights):
    """Run fn(*inputs) -> tuple of outputs; backward sum(out * weight); return (outs, grads)."""
    inputs = [leaf(t) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs]


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def expect_error(fn, exc_type, *words):
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"message lacks {missing}: {msg}")
        return
    raise AssertionError(f"expected {exc_type.__name__} mentioning {words}")


# --------------------------------------------------------------------------- checks (run on every rank)
# A check runs all of its collectives before its first assertion, so that a failure on
# one rank cannot leave the others waiting in a collective it skipped.

def ring_case(rank, world, *, layout, causal, gqa=True, softcap=None, scale=None, return_lse=True, n=24, group=None):
    hkv = 2 if gqa else 4
    q, k, v = rand(1, 2, 4, n, 16), rand(2, 2, hkv, n, 16), rand(3, 2, hkv, n, 8)
    g, gl = rand(4, 2, 4, n, 8), rand(5, 2, 4, n)
    opts = dict(causal=causal, softcap=softcap, scale=scale)

    def full(q, k, v):
        return attnkit.flash_attention(q, k, v, return_lse=True, backend="reference", **opts)

    weights = (g, gl) if return_lse else (g,)
    (o_ref, l_ref), (dq, dk, dv) = grads_of(full, (q, k, v), (g, gl))
    if not return_lse:
        (o_ref,), (dq, dk, dv) = grads_of(lambda *t: full(*t)[0], (q, k, v), (g,))
    sh = lambda t, d=2: shard_sequence(t, layout=layout, group=group, dim=d)  # noqa: E731

    def dist_fn(q, k, v):
        return ring_attention(q, k, v, group=group, layout=layout, return_lse=return_lse, **opts)

    outs, (dql, dkl, dvl) = grads_of(dist_fn, (sh(q), sh(k), sh(v)), tuple(sh(w) for w in weights))
    whole = unshard_sequence(outs[0], layout=layout, group=group)   # every collective before any assert
    close("out", outs[0], sh(o_ref))
    close("unshard(out)", whole, o_ref)
    if return_lse:
        close("lse", outs[1], sh(l_ref))
    close("dq", dql, sh(dq))
    close("dk", dkl, sh(dk))
    close("dv", dvl, sh(dv))


def ulysses_case(rank, world, *, variant, hkv=2, **options):
    n = 20
    q, k, v = rand(11, 1, 4, n, 16), rand(12, 1, hkv, n, 16), rand(13, 1, hkv, n, 16)
    g, gl = rand(14, 1, 4, n, 16), rand(15, 1, 4, n)
    lse = bool(options.get("return_lse"))
    weights = (g, gl) if lse else (g,)
    (ref_outs, ref_grads) = grads_of(lambda *t: attnkit.attention(*t, variant, "reference", **options), (q, k, v),
                                     weights)
    sh = lambda t: shard_sequence(t, layout="contiguous")  # noqa: E731
    outs, local_grads = grads_of(lambda *t: ulysses_attention(*t, variant=variant, backend="reference", **options),
                                 (sh(q), sh(k), sh(v)), tuple(sh(w) for w in weights))
    for name, got, want in zip(("out", "lse"), outs, ref_outs):
        close(name, got, sh(want))
    for name, got, want in zip(("dq", "dk", "dv"), local_grads, ref_grads):
        close(name, got, sh(want))


def tree_case(rank, world, *, nq):
    lengths = [5 + 3 * r for r in range(world)]          # uneven shards of the cache
    total = sum(lengths)
    q, k, v = rand(21, 2, 4, nq, 16), rand(22, 2, 1, total, 16), rand(23, 2, 1, total, 12)
    g = rand(24, 2, 4, nq, 12)
    (o_ref,), (dq, dk, dv) = grads_of(lambda *t: attnkit.flash_attention(*t, backend="reference"), (q, k, v), (g,))
    lo = sum(lengths[:rank])
    cut = lambda t: t[:, :, lo:lo + lengths[rank]]  # noqa: E731
    (o,), (dql, dkl, dvl) = grads_of(lambda *t: tree_decode(*t), (q, cut(k), cut(v)), (g,))
    dq_sum = sum_over_ranks(dql)                                    # every collective before any assert
    close("out", o, o_ref)
    close("sum of dq over ranks", dq_sum, dq)
    close("dk", dkl, cut(dk))
    close("dv", dvl, cut(dv))


def lasp2_case(rank, world, *, decay, lightning=False):
    n = 4 * 6
    q, k, v = rand(31, 1, 4, n, 8), rand(32, 1, 2, n, 8), rand(33, 1, 2, n, 6)
    g = rand(34, 1, 4, n, 6)
    inputs = [q, k, v] + ([rand(35, 4, low=0.05)] if decay else [])
    if lightning:
        full = lambda q, k, v, s: attnkit.lightning_attention(q, k, v, s, backend="reference")  # noqa: E731
        dist_fn = lambda q, k, v, s: lasp2_lightning_attention(q, k, v, s)  # noqa: E731
    else:
        full = lambda q, k, v, d=None: attnkit.linear_attention(q, k, v, decay=d, backend="reference")  # noqa: E731
        dist_fn = lambda q, k, v, d=None: lasp2_linear_attention(q, k, v, decay=d)  # noqa: E731
    (o_ref,), ref_grads = grads_of(full, inputs, (g,))
    sh = lambda t: shard_sequence(t, layout="contiguous")  # noqa: E731
    (o,), grads = grads_of(dist_fn, [sh(t) for t in inputs[:3]] + inputs[3:], (sh(g),))
    d_decay = sum_over_ranks(grads[3]) if decay else None           # every collective before any assert
    close("out", o, sh(o_ref))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(name, got, sh(want))
    if decay:
        close("sum of d decay over ranks", d_decay, ref_grads[3])


def subgroup_case(rank, world):
    """Ring attention inside sub-groups: group ranks differ from global ranks, and a
    one-rank group must just work."""
    singles = [dist.new_group([r]) for r in range(world)]          # every rank creates every group
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])] if world == 4 else []
    cases = [dict(layout="zigzag", causal=True, group=singles[rank])]
    if pairs:
        cases += [dict(layout="striped", causal=True, group=pairs[rank % 2]),
                  dict(layout="zigzag", causal=True, group=pairs[rank % 2], gqa=False)]
    errors = []
    for case in cases:                                             # run all, then report
        try:
            ring_case(rank, world, **case)
        except AssertionError as exc:
            errors.append(f"{case}: {exc}")
    if errors:
        raise AssertionError("\n".join(errors))


def bad_input_case(rank, world):
    x = rand(41, 1, 4, 8 * world + 2 * rank, 16)                  # a different length on every rank
    expect_error(lambda: ring_attention(x, x, x, layout="contiguous"), ValueError, "same on every rank",
                 f"rank 1: (1, 4, 4, {8 * world + 2}, 16, 16)")
    expect_error(lambda: ulysses_attention(x, x, x), ValueError, "same on every rank")
    expect_error(lambda: lasp2_linear_attention(x, x, x), ValueError, "same on every rank")
    expect_error(lambda: unshard_sequence(x, layout="contiguous"), ValueError, "same on every rank")
    odd = rand(42, 1, 4, 3, 16)                                    # N = 3 W: no 2W chunks
    expect_error(lambda: ring_attention(odd, odd, odd, layout="zigzag", causal=True), ValueError,
                 "cannot take layout 'zigzag'", f"multiple of {2 * world}")
    expect_error(lambda: shard_sequence(rand(43, 1, 1, 4 * world + 1, 8), layout="striped"), ValueError,
                 "cannot take layout 'striped'")
    expect_error(lambda: ring_attention(odd, odd, odd, layout="diagonal"), ValueError, "layout must be one of")
    h = rand(44, 1, world + 1, 4, 16)                               # heads not divisible by W
    expect_error(lambda: ulysses_attention(h, h, h), ValueError, f"query heads ({world + 1})",
                 f"world size ({world})")
    expect_error(lambda: tree_decode(rand(45, 1, 2 + rank, 1, 8), rand(46, 1, 1, 5, 8), rand(46, 1, 1, 5, 8)),
                 ValueError, "same on every rank")


CHECKS = {}
for _layout in LAYOUTS:
    for _causal in (False, True):
        CHECKS[f"ring_{_layout}_{'causal' if _causal else 'full'}_gqa"] = (
            lambda r, w, _l=_layout, _c=_causal: ring_case(r, w, layout=_l, causal=_c))
CHECKS["ring_striped_causal_mha_softcap_scale"] = lambda r, w: ring_case(
    r, w, layout="striped", causal=True, gqa=False, softcap=3.0, scale=0.3)
CHECKS["ring_zigzag_causal_no_lse_n40"] = lambda r, w: ring_case(r, w, layout="zigzag", causal=True,
                                                                 return_lse=False, n=40)
CHECKS["ring_subgroups"] = subgroup_case
CHECKS["ulysses_flash_causal_lse"] = lambda r, w: ulysses_case(r, w, variant="flash", causal=True, return_lse=True)
CHECKS["ulysses_flash_mqa_sinks"] = lambda r, w: ulysses_case(
    r, w, variant="flash", hkv=1, causal=True, sink_logits=rand(16, 4))
CHECKS["ulysses_sliding_window"] = lambda r, w: ulysses_case(r, w, variant="sliding_window", window=5, sinks=2)
CHECKS["ulysses_sliding_window_per_head"] = lambda r, w: ulysses_case(
    r, w, variant="sliding_window", window=torch.tensor([[3, 0], [-1, 0], [2, 2], [6, 1]]))
CHECKS["tree_decode_one_token"] = lambda r, w: tree_case(r, w, nq=1)
CHECKS["tree_decode_three_tokens"] = lambda r, w: tree_case(r, w, nq=3)
CHECKS["lasp2_linear_no_decay"] = lambda r, w: lasp2_case(r, w, decay=False)
CHECKS["lasp2_linear_decay"] = lambda r, w: lasp2_case(r, w, decay=True)
CHECKS["lasp2_lightning"] = lambda r, w: lasp2_case(r, w, decay=True, lightning=True)
CHECKS["bad_input"] = bad_input_case


# --------------------------------------------------------------------------- the spawned group

@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def group_results(request, tmp_path_factory):
    return run_group(__name__, request.param, tmp_path_factory.mktemp(f"dist{request.param}"),
                     deadline_s=DEADLINE_S, group_timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize("check", list(CHECKS))
def test_distributed(group_results, check):
    assert_check(group_results, check)


# --------------------------------------------------------------------------- single process

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_block_plan_is_the_causal_mask_and_balanced(layout, world):
    """The blocks of every (rank, source) pair cover exactly the causal mask between
    their global positions; zigzag and striped give every rank the same work."""
    local = 6
    n = local * world
    work = []
    for rank in range(world):
        qpos = positions(layout, rank, world, n)
        pairs = 0
        for source in range(world):
            kpos = positions(layout, source, world, n)
            want = kpos[None, :] <= qpos[:, None]
            got = torch.zeros(local, local, dtype=torch.bool)
            for b in block_plan(layout, rank, source, local, causal=True):
                m = b.q_hi - b.q_lo
                block = torch.ones(m, b.k_hi - b.k_lo, dtype=torch.bool)
                if b.causal:
                    assert m == b.k_hi - b.k_lo
                    block = torch.tril(block)
                assert not got[b.q_lo:b.q_hi, b.k_lo:b.k_hi].any(), "blocks overlap"
                got[b.q_lo:b.q_hi, b.k_lo:b.k_hi] = block
                pairs += int(block.sum())          # pairs visited (a causal block skips its upper half)
            assert torch.equal(got, want), (rank, source)
        work.append(pairs)
    if layout == "contiguous":
        assert work[-1] > work[0]
    else:
        assert max(work) - min(work) <= local * world, work   # equal up to the diagonals


@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_partition_the_sequence(layout):
    world, n = 4, 40
    allpos = torch.cat([positions(layout, r, world, n) for r in range(world)])
    assert torch.equal(allpos.sort().values, torch.arange(n))
    if layout == "zigzag":
        assert positions(layout, 1, world, n).tolist() == [5, 6, 7, 8, 9, 30, 31, 32, 33, 34]
    if layout == "striped":
        assert positions(layout, 1, world, n).tolist()[:3] == [1, 5, 9]


def test_world_size_one_without_process_group():
    """No process group: every function is its single-process op."""
    assert not dist.is_initialized()
    q, k, v = rand(51, 1, 4, 10, 16), rand(52, 1, 2, 10, 16), rand(53, 1, 2, 10, 16)
    for layout in LAYOUTS:
        assert torch.equal(shard_sequence(q, layout=layout), q)
        assert torch.equal(unshard_sequence(q, layout=layout), q)
        out, lse = ring_attention(q, k, v, layout=layout, causal=True, return_lse=True)
        ref, ref_lse = attnkit.flash_attention(q, k, v, causal=True, return_lse=True, backend="reference")
        close("ring out", out, ref)
        close("ring lse", lse, ref_lse)
    close("ulysses", ulysses_attention(q, k, v, variant="sliding_window", window=3),
          attnkit.attention(q, k, v, "sliding_window", window=3))
    close("tree", tree_decode(q[:, :, -1:], k, v), attnkit.flash_attention(q[:, :, -1:], k, v))
    d = rand(54, 4, low=0.1)
    close("lasp2", lasp2_linear_attention(q, k, v, decay=d), attnkit.linear_attention(q, k, v, decay=d))
    close("lasp2 lightning", lasp2_lightning_attention(q, k, v, d), attnkit.lightning_attention(q, k, v, d))


def test_bad_arguments_single_process():
    q = rand(61, 1, 2, 8, 16)
    expect_error(lambda: ring_attention(q, q, q[:, :, :4]), ValueError, "same sequence")
    expect_error(lambda: ring_attention(q, q, q, causal=1), TypeError, "causal")
    expect_error(lambda: ring_attention(q, q, q[:, :, :, :4].contiguous(), softcap=-1.0), ValueError, "softcap")
    expect_error(lambda: shard_sequence(q, layout="zigzag", dim=4), ValueError, "dim 4")
    expect_error(lambda: shard_sequence([1, 2], layout="zigzag"), TypeError, "x must be a torch.Tensor")
    expect_error(lambda: ring_attention(q, q, q, group=object()), ValueError, "not initialized")
    expect_error(lambda: ulysses_attention(q, q, q, variant="nope"), ValueError, "unknown attention variant")
    expect_error(lambda: lasp2_linear_attention(q, q, q, decay=-torch.ones(2)), ValueError, "decay")


@pytest.mark.parametrize("causal", [False, True])
def test_block_backward_kernel_matches_torch(causal):
    """The engine-kernel path of the ring backward (used on CUDA) equals the PyTorch
    path, here through Triton's interpreter: q/k/v of one block against final o/lse."""
    q, k, v = rand(71, 1, 4, 24, 16), rand(72, 1, 2, 24, 16), rand(73, 1, 2, 24, 16)
    do = rand(74, 1, 4, 24, 16)
    o, lse = block_forward(q, k, v, causal=causal, scale=0.25, softcap=None)
    delta = (do * o).sum(-1)
    want = block_backward_torch(q, k, v, lse, do, delta, causal=causal, scale=0.25, softcap=None)
    got = block_backward_kernel(q, k, v, o, lse, do, causal=causal, scale=0.25, softcap=None)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        close(name, a, b)


def test_cost_model_table(capsys):
    costs.main(["--lengths", "131072", "1048576", "--worlds", "2", "64"])
    text = capsys.readouterr().out
    assert "| 1,048,576 | 64 |" in text and "n/a" in text        # 32 heads do not split over 64 ranks
    m = costs.Model()
    assert costs.lasp2(1 << 17, 8, m) == costs.lasp2(1 << 20, 8, m)                  # independent of N
    assert costs.ring(1 << 20, 8, m)["steps"] == 7 and costs.ulysses(1 << 20, 8, m)["steps"] == 4
    assert costs.tree(1, 64, m)["steps"] == 12
    # ring sends (W-1) K/V shards: 2 * Hkv * N/W * D * 2 bytes each
    assert costs.ring(1 << 20, 8, m)["bytes"] == 7 * 2 * 8 * (1 << 17) * 128 * 2
