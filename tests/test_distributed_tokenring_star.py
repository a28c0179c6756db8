"""TokenRing and Star Attention on gloo, against the single process.

TokenRing: forward, LSE and gradients equal to one process (every layout, causal and
not, GQA and MHA), the transfers it makes (queries forward, partial outputs back, both
in flight in one step; pairs that see no key send nothing), and the same error on every
rank. Star Attention: equal to its own single-process rule (:func:`star_reference`), its
query rows equal to full attention, and how close it stays to full attention through a
small two-layer model (the error is printed and recorded in docs/distributed.md).

Each world size (2 and 4 ranks) is ONE spawned gloo group that runs every check in
``CHECKS`` (the harness of tests/test_distributed.py).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from gloo_group import assert_check, run_group
from test_distributed import close, expect_error, grads_of, rand

import attnkit
from attnkit.distributed import (
    LAYOUTS,
    shard_sequence,
    star_attention,
    token_ring_attention,
    unshard_sequence,
)
from attnkit.distributed import token_ring as token_ring_module
from attnkit.distributed.star import star_mask, star_reference

GROUP_TIMEOUT_S = 30      # a collective that waits longer than this fails (gloo timeout)
DEADLINE_S = 120          # the whole spawned group, start-up included


# --------------------------------------------------------------------------- checks (run on every rank)
# Every collective of a check runs before its first assertion.

def token_ring_case(rank, world, *, layout, causal, gqa=True, scale=None, return_lse=True, n=24):
    hkv = 2 if gqa else 4
    q, k, v = rand(101, 2, 4, n, 16), rand(102, 2, hkv, n, 16), rand(103, 2, hkv, n, 8)
    g, gl = rand(104, 2, 4, n, 8), rand(105, 2, 4, n)
    weights = (g, gl) if return_lse else (g,)

    def full(q, k, v):
        out = attnkit.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=return_lse, backend="reference")
        return out if return_lse else (out,)

    ref_outs, ref_grads = grads_of(full, (q, k, v), weights)
    sh = lambda t: shard_sequence(t, layout=layout)

    def dist_fn(q, k, v):
        return token_ring_attention(q, k, v, None, causal=causal, layout=layout, scale=scale, return_lse=return_lse)

    outs, grads = grads_of(dist_fn, (sh(q), sh(k), sh(v)), tuple(sh(w) for w in weights))
    whole = unshard_sequence(outs[0], layout=layout)             # every collective before any assert
    close("unshard(out)", whole, ref_outs[0])
    for name, got, want in zip(("out", "lse"), outs, ref_outs):
        close(name, got, sh(want))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(name, got, sh(want))


def token_ring_transfers_case(rank, world):
    """The P2P sends of one forward, by peer offset: W - 1 query shards to rank + 1 and
    W - 1 partial outputs back to their owners, a query and a partial in flight in the
    same step (4 ranks: both directions at once); with contiguous causal shards, rank r
    computes (and sends) only for the W - 1 - r later ranks' queries."""
    batches = []
    real = token_ring_module.dist.batch_isend_irecv

    def recording(ops):
        batches.append([(op.peer - rank) % world for op in ops if op.op is dist.isend])   # default group
        return real(ops)

    q = rand(111, 1, 2, 4 * world, 8)
    token_ring_module.dist.batch_isend_irecv = recording
    try:
        token_ring_attention(q, q, q)
        full_batches, batches = batches, []
        token_ring_attention(q, q, q, causal=True, layout="contiguous")
        causal_batches = batches
    finally:
        token_ring_module.dist.batch_isend_irecv = real
    sends = [offset for batch in full_batches for offset in batch]
    # step 0 sends the query only; steps 2.. also a partial to rank - (step - 1)
    want = [1] * (world - 1) + [(-(step - 1)) % world for step in range(2, world + 1)]
    assert sorted(sends) == sorted(want), (sends, want)
    if world > 2:
        assert any(1 in b and world - 1 in b for b in full_batches), full_batches    # both neighbours at once
    partials = sum(len(b) for b in causal_batches) - (world - 1)                      # minus the query sends
    assert partials == world - 1 - rank, (rank, causal_batches)


def token_ring_bad_input_case(rank, world):
    q = rand(121, 1, 2, 4 * world, 8)
    expect_error(lambda: token_ring_attention(q, q, q, causal=rank == 0), ValueError, "token_ring_attention",
                 "causal must be the same on every rank", "rank 0: True")
    expect_error(lambda: token_ring_attention(q, q, q, layout="diagonal"), ValueError, "layout must be one of")
    odd = rand(122, 1, 2, 3, 8)                                   # N = 3 W: no 2W chunks for zigzag
    expect_error(lambda: token_ring_attention(odd, odd, odd), ValueError, "cannot take layout 'zigzag'",
                 f"multiple of {2 * world}")
    expect_error(lambda: token_ring_attention(q, q, q[:, :, :, :4].contiguous() if rank == 1 else q), ValueError,
                 "same on every rank")


def star_case(rank, world, *, anchor, nq=3, hkv=2, softcap=None, scale=None):
    block = 6
    n = world * block + nq
    q, k, v = rand(131, 2, 4, n, 16), rand(132, 2, hkv, n, 16), rand(133, 2, hkv, n, 8)
    want = star_reference(q, k, v, world_size=world, anchor_len=anchor, query_len=nq, scale=scale, softcap=softcap)
    full = attnkit.flash_attention(q, k, v, causal=True, scale=scale, softcap=softcap, backend="reference")
    rows = torch.cat([torch.arange(rank * block, (rank + 1) * block), torch.arange(world * block, n)])
    local = [t.index_select(2, rows) for t in (q, k, v)]
    out = star_attention(*local, None, anchor_len=anchor, query_len=nq, scale=scale, softcap=softcap)
    close("star vs its reference", out, want.index_select(2, rows))
    close("query rows vs full attention", out[:, :, block:], full[:, :, world * block:])
    assert not out.requires_grad


def star_bad_input_case(rank, world):
    x = rand(141, 1, 2, 8, 8)
    expect_error(lambda: star_attention(x, x, x, anchor_len=6, query_len=2 + rank), ValueError, "star_attention",
                 "rank 1 rejected its input", "anchor_len must be at most the context block length L = 5")
    expect_error(lambda: star_attention(x, x, x, anchor_len=rank, query_len=2), ValueError,
                 "anchor_len must be the same on every rank")
    expect_error(lambda: star_attention(x, x, x, anchor_len=2, query_len=8), ValueError,
                 "query_len (8) must leave at least one context token")


CHECKS = {}
for _layout in LAYOUTS:
    for _causal in (False, True):
        CHECKS[f"token_ring_{_layout}_{'causal' if _causal else 'full'}_gqa"] = (
            lambda r, w, _l=_layout, _c=_causal: token_ring_case(r, w, layout=_l, causal=_c))
CHECKS["token_ring_contiguous_causal_mha_scale_no_lse_n20"] = lambda r, w: token_ring_case(
    r, w, layout="contiguous", causal=True, gqa=False, scale=0.3, return_lse=False, n=20)
CHECKS["token_ring_transfers"] = token_ring_transfers_case
CHECKS["token_ring_bad_input"] = token_ring_bad_input_case
CHECKS["star_anchor_whole_block"] = lambda r, w: star_case(r, w, anchor=6)
CHECKS["star_anchor_part_mqa_softcap"] = lambda r, w: star_case(r, w, anchor=2, hkv=1, softcap=2.0, scale=0.2)
CHECKS["star_no_anchor_no_query"] = lambda r, w: star_case(r, w, anchor=0, nq=0)
CHECKS["star_bad_input"] = star_bad_input_case


# --------------------------------------------------------------------------- the spawned group

@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def group_results(request, tmp_path_factory):
    return run_group(__name__, request.param, tmp_path_factory.mktemp(f"tokenring{request.param}"),
                     deadline_s=DEADLINE_S, group_timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize("check", list(CHECKS))
def test_distributed(group_results, check):
    assert_check(group_results, check)


# --------------------------------------------------------------------------- single process

def test_world_size_one_is_full_attention():
    """No process group: TokenRing is flash attention, Star Attention exact causal attention."""
    assert not dist.is_initialized()
    q, k, v = rand(151, 1, 4, 12, 16), rand(152, 1, 2, 12, 16), rand(153, 1, 2, 12, 8)
    for causal in (False, True):
        out, lse = token_ring_attention(q, k, v, causal=causal, return_lse=True)
        ref, ref_lse = attnkit.flash_attention(q, k, v, causal=causal, return_lse=True, backend="reference")
        close("token ring out", out, ref)
        close("token ring lse", lse, ref_lse)
    full = attnkit.flash_attention(q, k, v, causal=True, backend="reference")
    close("star", star_attention(q, k, v, anchor_len=3, query_len=4), full)
    close("star reference", star_reference(q, k, v, world_size=1, anchor_len=3, query_len=4), full)


def test_star_mask_is_the_rule():
    """Context 8 on 2 ranks (blocks of 4), anchor 2, 2 query tokens."""
    m = star_mask(8, 2, 2, 2).int()
    assert m[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]          # rank 0: plain causal
    assert m[5].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]          # rank 1: anchor + own block up to itself
    assert m[9].tolist() == [1] * 10                                  # last query token: everything before it
    assert m[8].tolist() == [1] * 9 + [0]


def test_star_bad_arguments_single_process():
    x = rand(161, 1, 2, 8, 8)
    expect_error(lambda: star_attention(x, x, x, anchor_len=2.0, query_len=2), TypeError, "anchor_len must be an int")
    expect_error(lambda: star_attention(x, x, x, anchor_len=-1, query_len=2), ValueError, "anchor_len must be >= 0")
    expect_error(lambda: star_attention(x, x, x[:, :, :4], anchor_len=1, query_len=2), ValueError,
                 "same sequence")
    expect_error(lambda: star_reference(x, x, x, world_size=4, anchor_len=1, query_len=2), ValueError,
                 "world_size = 4 equal blocks")


def star_error_on_two_layers(*, anchor_len: int, sink: float, world: int = 4, block: int = 16, n_query: int = 4,
                             dim: int = 32, heads: int = 2) -> float:
    """Relative error of the query tokens' hidden states after two residual attention
    layers under Star Attention's rule, against full causal attention. Random weights;
    every token shares one component c of the embedding; ``sink`` > 0 adds ``sink c`` to
    the first token and ties W_k to W_q, so that every query scores that token highly:
    an attention sink, as trained LLMs have at their first token."""
    g = torch.Generator().manual_seed(1)
    n = world * block + n_query
    c = torch.randn(dim, generator=g)
    x = torch.randn(1, n, dim, generator=g) + c
    x[:, 0] += sink * c
    weights = [[torch.randn(dim, dim, generator=g) / dim ** 0.5 for _ in range(4)] for _ in range(2)]

    def forward(attend):
        h = x
        for wq, wk, wv, wo in weights:
            wk = wq if sink else wk
            q, k, v = ((h @ w).view(1, n, heads, dim // heads).transpose(1, 2) for w in (wq, wk, wv))
            h = h + attend(q, k, v).transpose(1, 2).reshape(1, n, dim) @ wo
        return h[:, -n_query:]

    full = forward(lambda q, k, v: attnkit.flash_attention(q, k, v, causal=True, backend="reference"))
    star = forward(lambda q, k, v: star_reference(q, k, v, world_size=world, anchor_len=anchor_len,
                                                  query_len=n_query))
    return ((star - full).norm() / full.norm()).item()


def test_star_stays_close_to_full_attention():
    """The example of docs/distributed.md (Star Attention): 4 blocks of 16 tokens and 4
    query tokens through two layers. With an attention sink at the first token, an anchor
    of one block brings the error from ~5% to ~4e-6; without a sink, from ~16% to ~9%."""
    errors = {(sink, anchor): star_error_on_two_layers(anchor_len=anchor, sink=sink)
              for sink in (0.0, 8.0) for anchor in (0, 4, 16)}
    for (sink, anchor), err in errors.items():
        print(f"sink {sink}, anchor_len {anchor:2d}: relative error of the query outputs {err:.2e}")
    assert errors[8.0, 16] < 1e-4 and errors[8.0, 0] > 1e-2
    assert errors[8.0, 16] < errors[8.0, 4] < errors[8.0, 0]
    assert errors[0.0, 16] < errors[0.0, 0]
