"""ring_attention with windows and sinks (a chain that only talks to the ranks a window
reaches), sink logits and packed sequences, on 2 and 4 gloo ranks, against one process:
forward, LSE and gradients (q, k, v and sink_logits). The windowed ring's transfers are
counted. Harness as tests/test_distributed.py: one spawned group per world size runs
every check in ``CHECKS``, each bounded by the gloo timeout and the group's deadline.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from gloo_group import assert_check, run_group
from test_distributed import (
    close,
    expect_error,
    grads_of,
    rand,
    sum_over_ranks,
)

import attnkit
from attnkit.distributed import costs, ring_attention, shard_sequence, unshard_sequence
from attnkit.distributed.ring import Pattern

GROUP_TIMEOUT_S = 30
DEADLINE_S = 120
LOCAL = 8                 # tokens per rank


def reference(q, k, v, s=None, *, causal=False, window=None, sinks=0, softcap=None, cu=None):
    """One process: sliding_window_attention for a window, flash_attention otherwise."""
    packed = {"cu_seqlens_q": cu, "cu_seqlens_k": cu} if cu is not None else {}
    if window is not None:
        return attnkit.sliding_window_attention(q, k, v, window=window, sinks=sinks, softcap=softcap, sink_logits=s,
                                                return_lse=True, backend="reference", **packed)
    return attnkit.flash_attention(q, k, v, causal=causal, softcap=softcap, sink_logits=s, return_lse=True,
                                   backend="reference", **packed)


def ring_case(rank, world, *, layout="contiguous", hkv=2, batch=2, logits=False, cu=None, ref_window=None,
              **options):
    """``options`` go to both ring_attention and the reference (``ref_window`` replaces
    the window for the reference: causal folded in)."""
    n = LOCAL * world
    if cu is not None:
        batch, cu = 1, torch.tensor(cu(n), dtype=torch.int32)
    q, k, v = rand(1, batch, 4, n, 16), rand(2, batch, hkv, n, 16), rand(3, batch, hkv, n, 8)
    g, gl = rand(4, batch, 4, n, 8), rand(5, batch, 4, n)
    inputs = [q, k, v] + ([rand(6, 4)] if logits else [])
    ref_opts = dict(options, window=ref_window or options.get("window"))
    (o_ref, l_ref), ref_grads = grads_of(lambda *t: reference(*t, cu=cu, **ref_opts), inputs, (g, gl))
    sh = lambda t: shard_sequence(t, layout=layout)

    def dist_fn(q, k, v, s=None):
        return ring_attention(q, k, v, layout=layout, sink_logits=s, cu_seqlens=cu, return_lse=True, **options)

    (o, lse), grads = grads_of(dist_fn, [sh(t) for t in inputs[:3]] + inputs[3:], (sh(g), sh(gl)))
    whole = unshard_sequence(o, layout=layout)
    d_logits = sum_over_ranks(grads[3]) if logits else None          # every collective before any assert
    close("out", o, sh(o_ref))
    close("unshard(out)", whole, o_ref)
    close("lse", lse, sh(l_ref))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(name, got, sh(want))
    if logits:
        close("sum of d sink_logits over ranks", d_logits, ref_grads[3])


def count_sends(fn) -> int:
    """The isend ops this rank posts while running fn()."""
    sends = []
    original = dist.batch_isend_irecv

    def counting(ops):
        sends.extend(op for op in ops if op.op is dist.isend)
        return original(ops)

    dist.batch_isend_irecv = counting
    try:
        fn()
    finally:
        dist.batch_isend_irecv = original
    return len(sends)


def transfers_case(rank, world):
    """A window of 3 < N_local talks to one neighbour below: one hop per direction of use,
    forward and backward; the full ring makes W - 1 hops (K and V: 2 sends each)."""
    n = LOCAL * world
    q, k, v = (shard_sequence(rand(i, 1, 2, n, 16), layout="contiguous").requires_grad_(True) for i in (7, 8, 9))

    def run(**options):
        out = ring_attention(q, k, v, layout="contiguous", **options)
        out.sum().backward()

    full = count_sends(lambda: run(causal=True))
    windowed = count_sends(lambda: run(window=3))
    wide = count_sends(lambda: run(window=LOCAL + 2))              # ceil((W-1) / N_local) = 2 hops
    sends = torch.tensor([full, windowed, wide])
    per_rank = [torch.zeros_like(sends) for _ in range(world)]
    dist.all_gather(per_rank, sends)
    full, windowed, wide = torch.stack(per_rank).sum(0).tolist()
    # full ring: W - 1 K/V hops forward and backward, W dK/dV hops, on every rank
    assert full == world * 2 * (3 * world - 2), full
    # chain, one hop: ranks 0..W-2 send K/V forward, again in backward, and ranks 1..W-1 send dK/dV back
    assert windowed == 3 * 2 * (world - 1), windowed
    hops = min(2, world - 1)
    assert wide == 3 * 2 * sum(max(0, world - s) for s in range(1, hops + 1)), wide
    assert windowed < full and wide < full


def bad_input_case(rank, world):
    x = rand(41, 1, 4, LOCAL, 16)
    expect_error(lambda: ring_attention(x, x, x, window=4), ValueError, "rejected", "layout='contiguous'",
                 "layout='zigzag'")
    expect_error(lambda: ring_attention(x, x, x, layout="contiguous", sinks=2), ValueError, "sinks=2 needs a window")
    expect_error(lambda: ring_attention(x, x, x, layout="contiguous", window=3 + rank), ValueError,
                 "window must be the same on every rank", "rank 0: ((2, 0),")
    expect_error(lambda: ring_attention(x, x, x, layout="contiguous", window=(-2, 0)), ValueError, "window[0]")
    bad = torch.zeros(4 if rank == 0 else 3)
    expect_error(lambda: ring_attention(x, x, x, sink_logits=bad), ValueError, "rejected", "sink_logits",
                 "got (3,)")
    expect_error(lambda: ring_attention(x, x, x, sink_logits=torch.full((4,), float(rank))), ValueError,
                 "sink_logits must be the same on every rank")
    cu = torch.tensor([0, 5, LOCAL * world], dtype=torch.int32)
    two = rand(42, 2, 4, LOCAL, 16)
    expect_error(lambda: ring_attention(two, two, two, cu_seqlens=cu), ValueError, "batch size must be 1")
    expect_error(lambda: ring_attention(x, x, x, cu_seqlens=cu[:2] if rank else cu), ValueError,
                 "cu_seqlens must end at the packed length")
    expect_error(lambda: ring_attention(x, x, x, cu_seqlens=cu.long()), TypeError, "cu_seqlens", "int32")


def _two_seqs(n):
    return [0, n // 2 - 3, n]


def _four_seqs(n):
    return [0, 5, 5, n - LOCAL - 2, n]          # an empty sequence; sequences straddle ranks


CHECKS = {
    "window_smaller_than_shard": lambda r, w: ring_case(r, w, window=3),
    "window_larger_than_two_shards": lambda r, w: ring_case(r, w, window=2 * LOCAL + 3),
    "window_pair_right_and_sinks": lambda r, w: ring_case(r, w, window=(5, 2), sinks=2),
    "window_sinks_past_the_reach_mqa_softcap": lambda r, w: ring_case(r, w, window=3, sinks=3, hkv=1, softcap=2.0),
    "window_causal_clamps_right": lambda r, w: ring_case(r, w, window=(LOCAL + 1, 4), causal=True,
                                                        ref_window=(LOCAL + 1, 0)),
    "window_per_head_sinks_logits": lambda r, w: ring_case(
        r, w, window=torch.tensor([[2, 0], [-1, 0], [LOCAL, 1], [0, 0]]), sinks=1, logits=True),
    "sink_logits_zigzag_causal": lambda r, w: ring_case(r, w, layout="zigzag", causal=True, logits=True),
    "sink_logits_striped_full_mha": lambda r, w: ring_case(r, w, layout="striped", hkv=4, logits=True),
    "packed_zigzag_causal": lambda r, w: ring_case(r, w, layout="zigzag", causal=True, cu=_four_seqs),
    "packed_striped_full_logits": lambda r, w: ring_case(r, w, layout="striped", cu=_two_seqs, logits=True),
    "packed_contiguous_causal": lambda r, w: ring_case(r, w, causal=True, cu=_two_seqs),
    "packed_window_sinks_logits": lambda r, w: ring_case(r, w, window=4, sinks=2, cu=_four_seqs, logits=True),
    "transfers": transfers_case,
    "bad_input": bad_input_case,
}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def group_results(request, tmp_path_factory):
    return run_group(__name__, request.param, tmp_path_factory.mktemp(f"ringext{request.param}"),
                     deadline_s=DEADLINE_S, group_timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize("check", list(CHECKS))
def test_ring_ext(group_results, check):
    assert_check(group_results, check)


def test_single_process_window_sinks_logits_packed():
    """No process group: the chain degenerates to one masked block, equal to the variants."""
    q, k, v = rand(51, 1, 4, 20, 16), rand(52, 1, 2, 20, 16), rand(53, 1, 2, 20, 16)
    s, cu = rand(54, 4), torch.tensor([0, 7, 20], dtype=torch.int32)
    got = ring_attention(q, k, v, layout="contiguous", window=(4, 1), sinks=2, sink_logits=s, cu_seqlens=cu)
    close("window", got, reference(q, k, v, s, window=(4, 1), sinks=2, cu=cu)[0])
    got = ring_attention(q, k, v, causal=True, sink_logits=s, cu_seqlens=cu)
    close("packed", got, reference(q, k, v, s, causal=True, cu=cu)[0])


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_window_reach_is_the_ranks_a_window_sees(world):
    """Pattern.reach gives exactly the farthest ranks whose keys some query sees."""
    local, n = 6, 6 * world
    for window in [(2, 0), (5, 0), (6, 0), (7, 3), (13, 6), (-1, 0), (0, -1)]:
        pattern = Pattern(False, (window,) * 2, 0, None)
        pos = torch.arange(n)
        seen = pattern.visible(pos, pos)[0]
        ranks = pos // local
        dist_below = max(int((ranks[i] - ranks[seen[i]]).max()) for i in range(n))
        dist_above = max(int((ranks[seen[i]] - ranks[i]).max()) for i in range(n))
        assert pattern.reach("contiguous", local, world) == (dist_below, dist_above), window


def test_cost_model_covers_every_scheme(capsys):
    """``python -m attnkit.distributed.costs`` prints every scheme and the papers' figures
    beside the model's; the formulas follow each scheme's communication pattern."""
    costs.main(["--lengths", "262144", "--worlds", "8", "--scheme-world", "8"])
    text = capsys.readouterr().out
    for name in ("windowed ring", "| Ulysses |", "USP (8 x 1)", "TokenRing", "LASP-2 (linear", "LASP-2H", "tree decode",
                 "Star Attention", "1.45x", "+36.6%", "86% MFU", "not measurements"):
        assert name in text, name
    m = costs.Model()
    n, w = 1 << 20, 16
    local, shard = n // w, costs.ring(n, w, m)["bytes"] / (w - 1)      # one K/V shard
    assert costs.windowed_ring(n, w, m, window=local // 2) == {"bytes": shard, "steps": 1}
    assert costs.windowed_ring(n, w, m, window=2 * local + 1)["bytes"] == 2 * shard      # two hops
    assert costs.windowed_ring(n, w, m, window=n)["steps"] == w - 1                       # the whole ring
    assert costs.windowed_ring(n, w, m, window=local, sinks=4)["steps"] == 2              # + the sink all-reduce
    usp = costs.usp(n, 8, 2, m)
    assert usp["steps"] == 4 + 1 and usp["slow_bytes"] == 2 * 1 * (n / 2) * 128 * 2      # Hkv / U = 1 head
    assert usp["fast_bytes"] == costs.ulysses(n // 2, 8, m)["bytes"]
    assert costs.lasp2h(n, w, m) == {"bytes": costs.ring(n, w, m)["bytes"], "steps": 1}
    assert costs.token_ring(n, w, m)["step_bytes"] == 32 * local * (128 + 1) * 4       # fp32 partials back
    assert costs.layer_time("striped", 1 << 18, 8, m) < costs.layer_time("ring", 1 << 18, 8, m)
    assert costs.star(n, w, m, query_tokens=3)["bytes"] == 3 * costs.tree(n, w, m)["bytes"]
    assert costs.star(n, w, m, anchor=local)["bytes"] == shard + costs.tree(n, w, m)["bytes"]   # + the anchor
