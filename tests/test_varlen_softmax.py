"""Packed variable-length batches (cu_seqlens_q/k) on sliding_window_attention and flex_attention.

The rule every test checks: a packed batch gives exactly what its sequences give when run
one at a time (forward, LSE and every gradient), on both backends. Lengths 1, 17, 113 and
an empty sequence; windows and sinks restart at each sequence; mods see the sequence index
as ``b`` and positions from the sequence's start.
"""

import itertools
from collections.abc import Callable, Sequence

import pytest
import torch
from conftest import DEVICE

import attnkit
from attnkit import mods

BACKENDS = ["reference", "triton"]
SELF = ([1, 17, 113, 0], [1, 17, 113, 0])
# per sequence Nq != Nk: decode-like (Nq < Nk), Nq > Nk (rows before the first key), keys with no
# query, and an empty sequence
CROSS = ([1, 17, 40, 0, 12, 0], [3, 17, 70, 0, 5, 4])


def offsets(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def rand(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float().to(DEVICE)


def run(op: Callable, lengths_q: list[int], lengths_k: list[int], heads_q: int, heads_kv: int,
        options: dict, per_sequence: Callable[[int], dict] = lambda s: {}, learnable: Sequence[str] = (),
        head_dim: int = 32, head_dim_v: int = 24):
    """Run ``op`` on the packed batch and on each sequence alone; return both results:
    [out, lse, dq, dk, dv, *grads of the ``learnable`` options]. ``per_sequence(s)`` maps an
    option's name to how sequence s run alone takes it (a tensor with one row per sequence
    gives it its row)."""
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    q = rand(1, heads_q, sum(lengths_q), head_dim, seed=1)
    k = rand(1, heads_kv, sum(lengths_k), head_dim, seed=2)
    v = rand(1, heads_kv, sum(lengths_k), head_dim_v, seed=3)
    do = rand(1, heads_q, sum(lengths_q), head_dim_v, seed=4)

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v)]

    # packed
    qp, kp, vp = leaves()
    extra = {name: options[name].detach().clone().requires_grad_() for name in learnable}
    out, lse = op(qp, kp, vp, **{**options, **extra}, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    out.backward(do)
    packed = [out.detach(), lse, qp.grad, kp.grad, vp.grad, *(extra[n].grad for n in learnable)]

    # one by one
    qs, ks, vs = leaves()
    extra = {name: options[name].detach().clone().requires_grad_() for name in learnable}
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for s, ((q0, q1), (k0, k1)) in enumerate(zip(itertools.pairwise(bq), itertools.pairwise(bk))):
        opts = {**options, **extra}
        for name, pick in per_sequence(s).items():  # slicing a learnable leaf keeps its graph
            opts[name] = pick(opts[name])
        o, o_lse = op(qs[:, :, q0:q1], ks[:, :, k0:k1], vs[:, :, k0:k1], **opts, return_lse=True)
        outs.append(o)
        lses.append(o_lse)
    out = torch.cat(outs, dim=2)
    out.backward(do)
    alone = [out.detach(), torch.cat(lses, dim=2), qs.grad, ks.grad, vs.grad, *(extra[n].grad for n in learnable)]
    return packed, alone


def assert_same(packed, alone, backend: str):
    names = ["out", "lse", "dq", "dk", "dv", "learnable"]
    tol = {"rtol": 1e-5, "atol": 1e-5} if backend == "triton" else {"rtol": 1e-6, "atol": 1e-6}
    for i, (got, want) in enumerate(zip(packed, alone)):
        name = names[min(i, 5)]
        assert got is not None and want is not None, name
        assert torch.isfinite(got).all() or name == "lse", name  # lse is -inf on rows that see nothing
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def per_row(name: str):
    """per_sequence option: row s of a (S, ...) tensor, kept (1, ...)."""
    return lambda s: {name: lambda t: t[s:s + 1]}


# ---------------------------------------------------------------- sliding_window_attention

def sliding(*args, **kwargs):
    return attnkit.sliding_window_attention(*args, **kwargs)


SW_CASES = {
    # causal window with sinks and learnable sink logits, GQA, lengths 1, 17, 113, 0
    "causal_w9_sinks4_gqa": (SELF, 4, 2, {"window": 9, "sinks": 4, "sink_logits": 0.5 * rand(4, seed=5)},
                             ("sink_logits",)),
    # non-causal (left, right) window with sinks, softcap, Nq != Nk per sequence (bottom-right per sequence)
    "left20_right5_sinks3_cross": (CROSS, 2, 1, {"window": (20, 5), "sinks": 3, "softcap": 3.0}, ()),
    # per-head windows: full causal, local, only itself, (12, 3); sinks 2; GQA
    "per_head_windows_gqa": (SELF, 4, 2, {"window": [[-1, 0], [7, 0], [0, 0], [12, 3]], "sinks": 2}, ()),
    # dense (-1, -1) with sinks (sinks are then inside the window) on cross lengths
    "dense_cross": (CROSS, 2, 2, {"window": (-1, -1), "sinks": 5}, ()),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SW_CASES))
def test_sliding_window_varlen_equals_sequences_one_by_one(case, backend):
    (lengths_q, lengths_k), hq, hkv, options, learnable = SW_CASES[case]
    options = {n: (torch.tensor(o, device=DEVICE) if n == "window" and isinstance(o, list) else
                   o.to(DEVICE) if isinstance(o, torch.Tensor) else o) for n, o in options.items()}
    packed, alone = run(lambda *a, **kw: sliding(*a, **kw, backend=backend), lengths_q, lengths_k, hq, hkv,
                        options, learnable=learnable)
    assert_same(packed, alone, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_varlen_restarts_window_and_sinks(backend):
    """Against the definition: in sequence s, query i (key position p = i + Nk_s - Nq_s) sees
    key j of the same sequence iff j <= p and (j >= p - 3 or j < 2), positions counted from
    the sequence's start; no key of another sequence."""
    lengths = [5, 9, 0, 7]
    cu = offsets(lengths)
    q, k, v = rand(1, 1, 21, 16, seed=1), rand(1, 1, 21, 16, seed=2), rand(1, 1, 21, 16, seed=3)
    got = sliding(q, k, v, window=4, sinks=2, cu_seqlens_q=cu, cu_seqlens_k=cu, backend=backend)
    mask = torch.zeros(21, 21, dtype=torch.bool)
    for start, n in zip(cu.tolist(), lengths):
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask[start:start + n, start:start + n] = (j <= i) & ((j >= i - 3) | (j < 2))
    want = torch.nn.functional.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                                            attn_mask=mask)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_varlen_score_mod_sees_sequence_index(backend):
    """ALiBi with one row of slopes per sequence (S, Hq): b is the sequence index."""
    lengths_q, lengths_k = SELF
    slopes = (0.2 + torch.rand(len(lengths_q), 2, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    packed, alone = run(lambda *a, score_mod, **kw: sliding(*a, score_mod=mods.alibi(score_mod), **kw,
                                                            backend=backend),
                        lengths_q, lengths_k, 2, 1, {"window": (11, 2), "sinks": 1, "score_mod": slopes},
                        per_sequence=per_row("score_mod"), learnable=("score_mod",))
    assert_same(packed, alone, backend)


def test_sliding_window_examples_have_a_varlen_case():
    cases = attnkit.get_variant("sliding_window").examples()
    assert any(c.tensors and "cu_seqlens_q" in c.tensors for c in cases)


# ---------------------------------------------------------------- flex_attention

def flex(*args, **kwargs):
    return attnkit.flex_attention(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flex_varlen_mods_see_per_sequence_positions(backend):
    """Causal mask_mod and ALiBi with per-sequence slopes: q_idx/kv_idx restart at every
    sequence (bottom-right within it), b is the sequence index; learnable slopes."""
    lengths_q, lengths_k = CROSS
    slopes = (0.2 + torch.rand(len(lengths_q), 4, generator=torch.Generator().manual_seed(0))).to(DEVICE)

    def op(*a, score_mod, **kw):
        return flex(*a, score_mod=mods.alibi(score_mod), mask_mod=mods.causal(), **kw, backend=backend)

    packed, alone = run(op, lengths_q, lengths_k, 4, 2, {"score_mod": slopes}, per_sequence=per_row("score_mod"),
                        learnable=("score_mod",))
    assert_same(packed, alone, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flex_varlen_mask_mod_per_sequence_tensor(backend):
    """prefix_lm with one prefix length per sequence (S,), softcap, no mask in between: the
    mask's b is the sequence index."""
    lengths_q, lengths_k = SELF
    prefix = torch.tensor([1, 5, 30, 0], device=DEVICE)

    def op(*a, mask_mod, **kw):
        return flex(*a, mask_mod=mods.prefix_lm(mask_mod), softcap=4.0, **kw, backend=backend)

    packed, alone = run(op, lengths_q, lengths_k, 2, 2, {"mask_mod": prefix},
                        per_sequence=per_row("mask_mod"))
    assert_same(packed, alone, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flex_varlen_dense(backend):
    """No mods: each sequence attends to all of its own keys and none of another's."""
    lengths_q, lengths_k = CROSS
    packed, alone = run(lambda *a, **kw: flex(*a, **kw, backend=backend), lengths_q, lengths_k, 2, 1, {})
    assert_same(packed, alone, backend)


def test_flex_varlen_refuses_a_block_mask():
    cu = offsets([8, 8])
    q = k = v = rand(1, 2, 16, 16, seed=0)
    block_mask = attnkit.create_block_mask(mods.causal(), None, None, 16, 16, block_size=16, device=DEVICE)
    with pytest.raises(ValueError, match="block_mask.*cu_seqlens|cu_seqlens.*block_mask"):
        flex(q, k, v, block_mask=block_mask, cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_flex_examples_have_a_varlen_case():
    cases = attnkit.get_variant("flex").examples()
    assert any(c.tensors and "cu_seqlens_q" in c.tensors for c in cases)


# ---------------------------------------------------------------- bad input, both variants

def _sw(q, k, v, **kw):
    return attnkit.sliding_window_attention(q, k, v, window=4, **kw)


def _flex(q, k, v, **kw):
    return attnkit.flex_attention(q, k, v, mask_mod=mods.causal(), **kw)


BAD = [
    (torch.tensor([0, 4, 8], dtype=torch.int64), [0, 4, 8], TypeError, "cu_seqlens_q must have dtype torch.int32"),
    ([0, 4, 8], [0.0, 4.0, 8.0], TypeError, "cu_seqlens_k must have dtype torch.int32"),
    ([0, 6, 4, 8], [0, 2, 4, 8], ValueError, "cu_seqlens_q must be non-decreasing"),
    ([1, 4, 8], [0, 4, 8], ValueError, "cu_seqlens_q must start at 0"),
    ([0, 4, 8], [0, 4, 7], ValueError, "cu_seqlens_k must end at the packed length 8"),
    ([0, 4, 8], [0, 2, 4, 8], ValueError, "same number of sequences"),
    ([0, 4, 8], None, ValueError, "must be given together"),
    (None, [0, 4, 8], ValueError, "must be given together"),
]


def _as_tensor(c):
    if c is None or isinstance(c, torch.Tensor):
        return c
    return torch.tensor(c, dtype=torch.float32 if isinstance(c[0], float) else torch.int32)


@pytest.mark.parametrize("op", [_sw, _flex], ids=["sliding_window", "flex"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu_q,cu_k,error,match", BAD)
def test_bad_cu_seqlens(op, backend, cu_q, cu_k, error, match):
    q = k = v = rand(1, 2, 8, 16, seed=0)
    with pytest.raises(error, match=match):
        op(q, k, v, cu_seqlens_q=_as_tensor(cu_q), cu_seqlens_k=_as_tensor(cu_k), backend=backend)


@pytest.mark.parametrize("op", [_sw, _flex], ids=["sliding_window", "flex"])
def test_cu_seqlens_need_batch_one(op):
    q = k = v = rand(2, 2, 8, 16, seed=0)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size must be 1"):
        op(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
