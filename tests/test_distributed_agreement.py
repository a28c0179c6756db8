"""Ranks that disagree: every collective entry point of attnkit.distributed makes its
ranks agree on the dtypes, shapes and options of a call before the first transfer,
and every rank raises the same clear error when they differ or when one rank's input
is invalid (docs/distributed.md, Ranks agree before they communicate).

One spawned gloo group of 2 ranks runs every check in ``CHECKS`` (the harness of
tests/test_distributed.py, with a short collective timeout: a rank left waiting fails
in seconds instead of hanging); each check returns the message of the error it
expected, and the pytest tests compare the messages of the two ranks.
"""

from __future__ import annotations

import json

import pytest
import torch
from gloo_group import assert_check, run_group
from test_distributed import close, rand

import attnkit
from attnkit.distributed import (
    LAYOUTS,
    lasp2_lightning_attention,
    lasp2_linear_attention,
    ring_attention,
    shard_sequence,
    tree_decode,
    ulysses_attention,
    unshard_sequence,
)
from attnkit.distributed._comm import _AGREEMENT_BYTES, _disagreement, _encode, render

WORLD = 2
GROUP_TIMEOUT_S = 8       # a rank left waiting in a collective fails after this (gloo timeout)
DEADLINE_S = 90           # the whole spawned group, start-up included


def raised(fn, exc_type, *words) -> str:
    """The message of the ``exc_type`` that ``fn()`` raises; it must contain ``words``."""
    try:
        fn()
    except exc_type as exc:
        msg = str(exc)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"message lacks {missing}: {msg}") from exc
        return msg
    raise AssertionError(f"expected {exc_type.__name__} mentioning {words}")


def qkv(seed: int = 1, n: int = 8, dtype=torch.float32):
    return tuple(rand(seed + i, 1, 2, n, 16).to(dtype) for i in range(3))


# --------------------------------------------------------------------------- checks (run on every rank)

def ring_dtype(rank):
    """float64 on rank 1 used to crash gloo (``enforce fail ... 2048 vs 1024``)."""
    q, k, v = qkv(dtype=torch.float64 if rank == 1 else torch.float32)
    return "\n".join(raised(lambda layout=layout: ring_attention(q, k, v, layout=layout, causal=True), TypeError,
                            "ring_attention: the dtype of q, k and v must be the same on every rank",
                            "rank 0: torch.float32; rank 1: torch.float64")
                     for layout in LAYOUTS)


def ring_option(rank, name, values):
    q, k, v = qkv()
    options = {name: values[rank]}
    return raised(lambda: ring_attention(q, k, v, **options), ValueError,
                  f"{name} must be the same on every rank", f"rank 0: {values[0]!r}", f"rank 1: {values[1]!r}")


def ring_bad_head_dim(rank):
    """Rank 1's k has the wrong head dim: it rejects its input, rank 0 used to be left
    waiting ("connection reset" or the timeout)."""
    q, k, v = qkv()
    if rank == 1:
        k = k[..., :8]
    return raised(lambda: ring_attention(q, k, v, causal=True), ValueError,
                  "ring_attention: rank 1 rejected its input", "same head dim, got 16 and 8")


def ring_bad_flag(rank):
    q, k, v = qkv()
    return raised(lambda: ring_attention(q, k, v, causal=True if rank == 0 else 1), TypeError,
                  "rank 1 rejected its input", "causal must be a bool")


def ring_bad_everywhere(rank):
    """Every rank rejects its input: one message, the ranks grouped."""
    q, k, v = qkv()
    return raised(lambda: ring_attention(q, k, v, layout="diagonal"), ValueError,
                  "ranks 0, 1 rejected their inputs", "layout must be one of")


def ulysses_option(rank, variant, name, values):
    q, k, v = qkv(n=6)
    options = {name: values[rank]}
    if variant == "sliding_window" and name != "window":
        options["window"] = 3
    return raised(lambda: ulysses_attention(q, k, v, variant=variant, backend="reference", **options), ValueError,
                  "ulysses_attention:", f"{name} must be the same on every rank")


def ulysses_dtype(rank):
    q, k, v = qkv(n=6, dtype=torch.float64 if rank == 1 else torch.float32)
    return raised(lambda: ulysses_attention(q, k, v, backend="reference"), TypeError,
                  "the dtype of q, k and v must be the same on every rank")


def ulysses_bad_window(rank):
    """A window that only rank 1 forgot: it used to fail after the first all-to-all."""
    q, k, v = qkv(n=6)
    window = 3 if rank == 0 else None
    return raised(lambda: ulysses_attention(q, k, v, variant="sliding_window", window=window), TypeError,
                  "ulysses_attention: rank 1 rejected its input", "window")


def ulysses_bad_head_window(rank):
    """A per-head window tensor whose second half (the heads rank 1 runs) is invalid."""
    q, k, v = qkv(n=6)
    window = torch.tensor([[2, 0], [-5, 0]])
    return raised(lambda: ulysses_attention(q, k, v, variant="sliding_window", window=window), ValueError,
                  "ranks 0, 1 rejected their inputs", "window")


def ulysses_packed(rank):
    q, k, v = qkv(n=6)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    return raised(lambda: ulysses_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu), ValueError,
                  "ranks 0, 1 rejected their inputs", "does not take packed batches (cu_seqlens_q)")


def tree_scale(rank):
    q, k, v = rand(1, 1, 2, 1, 16), rand(2, 1, 2, 3 + rank, 16), rand(3, 1, 2, 3 + rank, 16)
    return raised(lambda: tree_decode(q, k, v, scale=[0.25, 0.5][rank]), ValueError,
                  "tree_decode: scale must be the same on every rank", "rank 0: 0.25", "rank 1: 0.5")


def tree_dtype(rank):
    dtype = torch.float64 if rank == 1 else torch.float32
    q, k, v = rand(1, 1, 2, 1, 16).to(dtype), rand(2, 1, 2, 5, 16).to(dtype), rand(3, 1, 2, 5, 16).to(dtype)
    return raised(lambda: tree_decode(q, k, v), TypeError, "tree_decode: the dtype of q, k_shard and v_shard")


def tree_bad_input(rank):
    q, k, v = rand(1, 1, 2, 1, 16), rand(2, 1, 2, 5, 16), rand(3, 1, 2 + rank, 5, 16)
    return raised(lambda: tree_decode(q, k, v), ValueError, "tree_decode: rank 1 rejected its input",
                  "same number of heads")


def lasp2_decay(rank):
    q, k, v = qkv()
    decay = torch.tensor([0.1, 0.2 + 0.1 * rank])
    return raised(lambda: lasp2_linear_attention(q, k, v, decay=decay), ValueError,
                  "lasp2_linear_attention: decay must be the same on every rank")


def lasp2_scale(rank):
    q, k, v = qkv()
    return raised(lambda: lasp2_linear_attention(q, k, v, scale=[None, 0.3][rank]), ValueError,
                  "scale must be the same on every rank", "rank 0: 0.25", "rank 1: 0.3")


def lasp2_dtype(rank):
    q, k, v = qkv(dtype=torch.float64 if rank == 1 else torch.float32)
    return raised(lambda: lasp2_linear_attention(q, k, v), TypeError, "the dtype of q, k and v")


def lasp2_bad_decay(rank):
    q, k, v = qkv()
    decay = torch.tensor([0.1, 0.2 if rank == 0 else -1.0])
    return raised(lambda: lasp2_linear_attention(q, k, v, decay=decay), ValueError,
                  "rank 1 rejected its input", "decay")


def lightning_slopes(rank):
    q, k, v = qkv()
    slopes = attnkit.lightning_slopes(2, rank, 4)
    return raised(lambda: lasp2_lightning_attention(q, k, v, slopes), ValueError,
                  "lasp2_lightning_attention: slopes must be the same on every rank")


def unshard_dtype(rank):
    x = rand(1, 1, 2, 4, 16).to(torch.float64 if rank == 1 else torch.float32)
    return raised(lambda: unshard_sequence(x, layout="zigzag"), TypeError,
                  "unshard_sequence: the dtype of x_local must be the same on every rank")


def unshard_layout(rank):
    x = rand(1, 1, 2, 4, 16)
    return raised(lambda: unshard_sequence(x, layout=["zigzag", "striped"][rank]), ValueError,
                  "layout must be the same on every rank")


def different_functions(rank):
    q, k, v = qkv(n=6)
    call = [lambda: ring_attention(q, k, v, layout="contiguous"), lambda: ulysses_attention(q, k, v)][rank]
    return raised(call, ValueError, "the function called must be the same on every rank",
                  "rank 0: 'ring_attention'", "rank 1: 'ulysses_attention'")


def still_works(rank):
    """After every rejected call the group is clean (no transfer was left half done): an
    agreed call and its all-gather return the right values."""
    x = rand(7, 1, 2, 8, 16)
    whole = unshard_sequence(shard_sequence(x, layout="zigzag"), layout="zigzag")
    close("unshard(shard(x))", whole, x)
    return ""


CHECKS = {
    "ring_dtype_every_layout": ring_dtype,
    "ring_causal": lambda r: ring_option(r, "causal", [False, True]),
    "ring_scale": lambda r: ring_option(r, "scale", [0.25, 0.5]),
    "ring_softcap": lambda r: ring_option(r, "softcap", [None, 5.0]),
    "ring_layout": lambda r: ring_option(r, "layout", ["zigzag", "striped"]),
    "ring_bad_head_dim_on_one_rank": ring_bad_head_dim,
    "ring_bad_flag_on_one_rank": ring_bad_flag,
    "ring_bad_on_every_rank": ring_bad_everywhere,
    "ulysses_window": lambda r: ulysses_option(r, "sliding_window", "window", [3, 4]),
    "ulysses_causal": lambda r: ulysses_option(r, "flash", "causal", [True, False]),
    "ulysses_scale": lambda r: ulysses_option(r, "flash", "scale", [None, 0.5]),
    "ulysses_sink_logits": lambda r: ulysses_option(r, "flash", "sink_logits",
                                                    [torch.zeros(2), torch.tensor([0.0, 1.0])]),
    "ulysses_dtype": ulysses_dtype,
    "ulysses_bad_window_on_one_rank": ulysses_bad_window,
    "ulysses_bad_head_window": ulysses_bad_head_window,
    "ulysses_packed": ulysses_packed,
    "tree_scale": tree_scale,
    "tree_dtype": tree_dtype,
    "tree_bad_input_on_one_rank": tree_bad_input,
    "lasp2_decay": lasp2_decay,
    "lasp2_scale": lasp2_scale,
    "lasp2_dtype": lasp2_dtype,
    "lasp2_bad_decay_on_one_rank": lasp2_bad_decay,
    "lasp2_lightning_slopes": lightning_slopes,
    "unshard_dtype": unshard_dtype,
    "unshard_layout": unshard_layout,
    "different_functions": different_functions,
    "still_works": still_works,
}


# --------------------------------------------------------------------------- the spawned group

@pytest.fixture(scope="module")
def group_results(request, tmp_path_factory):
    """Run the selected checks in one group; returns (results per rank, what went wrong with
    the group: "" when it ended normally)."""
    names = [item.callspec.params["check"] for item in request.session.items       # those pytest selected
             if item.module is request.module and "check" in getattr(getattr(item, "callspec", None), "params", {})]
    return run_group(__name__, WORLD, tmp_path_factory.mktemp("agreement"), names=names or list(CHECKS),
                     deadline_s=DEADLINE_S, group_timeout_s=GROUP_TIMEOUT_S, with_world=False)


@pytest.mark.parametrize("check", list(CHECKS))
def test_ranks_agree(group_results, check):
    """Every rank raises the expected error, with the same message on every rank."""
    assert_check(group_results, check, same_message=True)


def test_group_finished(group_results):
    """No rank crashed or was left waiting: the whole group ended before its deadline."""
    assert not group_results[1], group_results[1]


# --------------------------------------------------------------------------- single process

def _fields(**values):
    return {"op": "ring_attention", "fields": [[what, render(v), "ValueError"] for what, v in values.items()]}


def test_disagreement_groups_ranks_and_names_the_odd_one():
    """With more ranks the message groups equal values, so the odd rank stands out."""
    message, error = _disagreement([_fields(causal=True), _fields(causal=False), _fields(causal=True)])
    assert error is ValueError
    assert message == "ring_attention: causal must be the same on every rank, got ranks 0, 2: True; rank 1: False"
    assert _disagreement([_fields(causal=True)] * 3) == (None, ValueError)
    rejected = {"op": "ring_attention", "error": ["TypeError", "causal must be a bool, got int"]}
    message, error = _disagreement([_fields(causal=True), rejected, rejected])
    assert error is TypeError
    assert message == "ring_attention: ranks 1, 2 rejected their inputs: causal must be a bool, got int"


def test_render_compares_values_not_identity():
    big = torch.arange(64.0)
    assert render(big) == render(big.clone()) != render(big + 1)      # a digest of the values
    assert render(torch.tensor([1, 2])) != render(torch.tensor([1.0, 2.0]))   # dtype counts
    assert render(object()) == render(object()) == "<object>"          # no memory address
    assert render((1, 2.5, None)) == "(1, 2.5, None)"


def test_payload_fits_the_fixed_buffer():
    """A long message is cut to fit one rank's share of the all-gather, never dropped."""
    data = _encode({"op": "ulysses_attention", "error": ["ValueError", "bad window " + "x" * 10_000]})
    assert len(data) <= _AGREEMENT_BYTES
    assert json.loads(data)["error"][1].startswith("bad window xxx")
    many = _encode({"op": "ulysses_attention", "fields": [[f"option{i}", "y" * 50, "ValueError"] for i in range(99)]})
    assert len(many) <= _AGREEMENT_BYTES
