"""USP (Ulysses x ring on a 2-D mesh) and LASP-2H on gloo, against one process.

ONE spawned gloo group of 4 ranks (as in test_distributed.py; start-up, importing torch
and attnkit in every rank, dominates the time) runs every check: USP on 2 x 2 meshes
(both dimension orders), 4 x 1 and 1 x 4; LASP-2H on 4 ranks. LASP-2H on 2 ranks is
checked by the hybrid example (examples/hybrid_lasp2.py), run at the end. Every check
runs its collectives before its first assertion; the parent kills any worker still
alive at the deadline.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch
import torch.distributed as dist
from gloo_group import assert_check, run_group
from test_distributed import close, expect_error, grads_of, rand

import attnkit
from attnkit.distributed import (
    lasp2h_attention,
    shard_sequence,
    unshard_sequence,
    usp_attention,
)
from attnkit.distributed.layout import MeshGroups, check_mesh_length

GROUP_TIMEOUT_S = 30      # a collective that waits longer than this fails (gloo timeout)
DEADLINE_S = 120          # the whole spawned group, start-up included
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(shape, names=("ulysses", "ring")):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def raised(fn, exc_type, *words) -> str:
    """The message of the error fn raises (checked: the type and words)."""
    try:
        fn()
    except exc_type as exc:
        missing = [w for w in words if w not in str(exc)]
        if missing:
            raise AssertionError(f"message lacks {missing}: {exc}") from exc
        return str(exc)
    raise AssertionError(f"expected {exc_type.__name__} mentioning {words}")


# --------------------------------------------------------------------------- USP

def usp_case(mesh, *, layout, causal, hkv=2, softcap=None, scale=None, sinks=False, n=24):
    q, k, v = rand(1, 2, 4, n, 16), rand(2, 2, hkv, n, 16), rand(3, 2, hkv, n, 8)
    g, gl = rand(4, 2, 4, n, 8), rand(5, 2, 4, n)
    inputs = [q, k, v] + ([rand(6, 4)] if sinks else [])
    opts = {"causal": causal, "softcap": softcap, "scale": scale}

    def full(q, k, v, s=None):
        return attnkit.flash_attention(q, k, v, sink_logits=s, return_lse=True, backend="reference", **opts)

    (o_ref, l_ref), ref_grads = grads_of(full, inputs, (g, gl))
    sh = lambda t: shard_sequence(t, layout=layout, group=mesh)

    def dist_fn(q, k, v, s=None):
        return usp_attention(q, k, v, mesh, layout=layout, sink_logits=s, return_lse=True, **opts)

    (o, lse), grads = grads_of(dist_fn, [sh(t) for t in inputs[:3]] + inputs[3:], (sh(g), sh(gl)))
    whole = unshard_sequence(o, layout=layout, group=mesh)
    d_sink = None
    if sinks:                   # each rank holds its share of the sink gradient
        d_sink = grads[3].clone()
        dist.all_reduce(d_sink)                                       # every collective before any assert
    close("out", o, sh(o_ref))
    close("unshard(out)", whole, o_ref)
    close("lse", lse, sh(l_ref))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(name, got, sh(want))
    if sinks:
        close("sum of d sink_logits over ranks", d_sink, ref_grads[3])


def usp_shards_case(mesh, groups: MeshGroups, layout):
    """shard_sequence over the mesh: every position once, layout over the ring dimension,
    contiguous over the Ulysses one; unshard_sequence undoes it (and its gradient)."""
    n = 24
    x = torch.arange(float(n)).view(1, 1, n, 1).repeat(1, 2, 1, 3)
    mine = shard_sequence(x, layout=layout, group=mesh)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    leaf = mine.clone().requires_grad_(True)
    back = unshard_sequence(leaf, layout=layout, group=mesh)
    (back * x).sum().backward()
    ring_shard = shard_sequence(x, layout=layout, group=groups.ring_group)       # the ring layout alone
    local = n // (groups.ring_size * groups.ulysses_size)
    close("shard = the ring shard's ulysses part", mine,
          ring_shard[:, :, groups.ulysses_rank * local:(groups.ulysses_rank + 1) * local])
    got = sorted(int(p) for t in everyone for p in t[0, 0, :, 0])
    assert got == list(range(n)), got
    close("unshard(shard)", back, x)
    close("gradient of unshard", leaf.grad, mine)


def usp_bad_input(rank, world):
    """The same clear error on every rank; the messages are returned so that the test
    can compare them across ranks."""
    mesh = _mesh((2, world // 2))
    x = rand(40, 1, 4, 8, 16)
    messages = []
    messages.append(raised(lambda: usp_attention(x, x, x, "mesh"), TypeError, "mesh must be a 2-D"))
    flat = _mesh((world,), ("ring",))
    messages.append(raised(lambda: usp_attention(x, x, x, flat), ValueError, "mesh must be a 2-D",
                           "('ulysses', 'ring')", "1-D"))
    named = _mesh((2, world // 2), ("dp", "cp"))
    messages.append(raised(lambda: usp_attention(x, x, x, named), ValueError, "('dp', 'cp')"))
    messages.append(raised(lambda: shard_sequence(x, layout="zigzag", group=named), ValueError, "group must be"))
    h = rand(41, 1, 3, 8, 16)                                       # 3 heads, U = 2
    messages.append(raised(lambda: usp_attention(h, h, h, mesh), ValueError, "query heads of q (3)",
                           "'ulysses' dimension (2)"))
    messages.append(raised(lambda: usp_attention(x, x, x, mesh, layout="diagonal"), ValueError,
                           "layout must be one of"))
    messages.append(raised(lambda: usp_attention(x, x, x, mesh, layout=None), ValueError, "layout must be one of"))
    one_bad = rand(43, 1, 3 if rank == world - 1 else 4, 8, 16)    # only the last rank's heads are wrong
    messages.append(raised(lambda: usp_attention(one_bad, one_bad, one_bad, mesh), ValueError, "query heads of q (3)"))
    other = rand(44, 1, 4, 8 + 4 * (rank == 0), 16)                 # rank 0's length differs
    messages.append(raised(lambda: usp_attention(other, other, other, mesh), ValueError, "same on every rank"))
    messages.append(raised(lambda: usp_attention(x, x, x, mesh, causal=rank == 1), ValueError, "causal",
                           "same on every rank"))
    messages.append(raised(lambda: unshard_sequence(other, layout="zigzag", group=mesh), ValueError,
                           "same on every rank"))
    y = x.double() if rank == 2 else x                              # rank 2's dtype differs
    messages.append(raised(lambda: usp_attention(y, y, y, mesh), TypeError, "the dtype of q, k and v",
                           "same on every rank"))
    usp_case(mesh, layout="striped", causal=True, n=8)              # the group still works afterwards
    return messages


# --------------------------------------------------------------------------- LASP-2H

def lasp2h_case(rank, world, *, causal=True, window=None, sinks=0, ref_window=None, hkv=2, scale=None):
    """lasp2h_attention against one process: flash (no window) or sliding_window with
    ``ref_window`` (the window as it acts on the whole sequence)."""
    n = 24
    q, k, v = rand(31, 1, 4, n, 8), rand(32, 1, hkv, n, 8), rand(33, 1, hkv, n, 6)
    g = rand(34, 1, 4, n, 6)
    if window is None:
        full = lambda q, k, v: attnkit.flash_attention(q, k, v, causal=causal, scale=scale,
                                                       backend="reference")
    else:
        full = lambda q, k, v: attnkit.sliding_window_attention(
            q, k, v, window=ref_window, sinks=sinks, scale=scale, backend="reference")
    (o_ref,), ref_grads = grads_of(full, (q, k, v), (g,))
    sh = lambda t: shard_sequence(t, layout="contiguous")
    (o,), grads = grads_of(lambda q, k, v: lasp2h_attention(q, k, v, None, causal=causal, scale=scale,
                                                            window=window, sinks=sinks),
                           [sh(t) for t in (q, k, v)], (sh(g),))
    close("out", o, sh(o_ref))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        close(name, got, sh(want))


def lasp2h_bad_input(rank, world):
    x = rand(50, 1, 4, 6, 8)
    messages = []
    per_head = torch.tensor([[2, 0], [2, 1], [2, 0], [2, 0]])
    messages.append(raised(lambda: lasp2h_attention(x, x, x, None, causal=False, window=per_head), ValueError,
                           "same right edge for every head of window"))
    messages.append(raised(lambda: lasp2h_attention(x, x, x, None, sinks=2), ValueError, "sinks=2 needs a window"))
    messages.append(raised(lambda: lasp2h_attention(x, x, x, None, window=0), ValueError, "window"))
    other = rand(51, 1, 4, 6 + 2 * (rank == 1), 8)
    messages.append(raised(lambda: lasp2h_attention(other, other, other, None), ValueError, "same on every rank"))
    messages.append(raised(lambda: lasp2h_attention(x, x, x, None, window=3 + rank), ValueError, "window",
                           "same on every rank"))
    messages.append(raised(lambda: lasp2h_attention(x, x, x.double(), None), (TypeError, ValueError), "rank"))
    y = x.double() if rank == 1 else x                              # rank 1's dtype differs
    messages.append(raised(lambda: lasp2h_attention(y, y, y, None), TypeError, "the dtype of q, k and v",
                           "same on every rank"))
    lasp2h_case(rank, world, window=3, ref_window=3)                # the group still works afterwards
    return messages


# --------------------------------------------------------------------------- the checks

WORLD = 4


def usp_checks() -> dict:
    meshes = {"2x2": ((2, 2), ("ulysses", "ring")), "2x2_ring_first": ((2, 2), ("ring", "ulysses")),
              "4x1": ((4, 1), ("ulysses", "ring")), "1x4": ((1, 4), ("ulysses", "ring"))}
    checks = {}
    for label, (shape, names) in meshes.items():
        def run(rank, world, shape=shape, names=names, label=label):
            mesh = _mesh(shape, names)
            cases = [{"layout": "zigzag", "causal": True}, {"layout": "striped", "causal": False, "hkv": 4, "softcap": 3.0,
                                                               "scale": 0.3}]
            if label in ("2x2", "1x4"):
                cases += [{"layout": "contiguous", "causal": True, "hkv": 1, "sinks": True},
                          {"layout": "zigzag", "causal": False, "sinks": True, "n": 16}]
            errors = []
            for case in cases:
                try:
                    usp_case(mesh, **case)
                except AssertionError as exc:
                    errors.append(f"{case}: {exc}")
            groups = MeshGroups(mesh.get_group("ulysses"), mesh.get_local_rank("ulysses"), mesh.size(
                names.index("ulysses")), mesh.get_group("ring"), mesh.get_local_rank("ring"),
                mesh.size(names.index("ring")))
            for layout in ("zigzag", "striped", "contiguous"):
                usp_shards_case(mesh, groups, layout)
            if errors:
                raise AssertionError("\n".join(errors))
        checks[f"usp_{label}"] = run
    checks["usp_bad_input"] = usp_bad_input
    return checks


LASP2H_CHECKS = {
    "lasp2h_causal_gqa": lambda r, w: lasp2h_case(r, w),
    "lasp2h_full_mha_scale": lambda r, w: lasp2h_case(r, w, causal=False, hkv=4, scale=0.4),
    "lasp2h_window_within_a_shard_sinks": lambda r, w: lasp2h_case(r, w, window=3, sinks=2, ref_window=3),
    "lasp2h_window_over_two_shards": lambda r, w: lasp2h_case(r, w, window=15, ref_window=15),
    "lasp2h_causal_pair_right_edge_cut": lambda r, w: lasp2h_case(r, w, window=(4, 5), ref_window=(4, 0)),
    "lasp2h_per_head_windows": lambda r, w: lasp2h_case(
        r, w, window=torch.tensor([[2, 0], [-1, 3], [13, 0], [0, 0]]), sinks=1,
        ref_window=torch.tensor([[2, 0], [-1, 0], [13, 0], [0, 0]])),
    "lasp2h_noncausal_window_sinks": lambda r, w: lasp2h_case(r, w, causal=False, window=(3, 5), sinks=1,
                                                              ref_window=(3, 5)),
    "lasp2h_noncausal_window_wide": lambda r, w: lasp2h_case(r, w, causal=False, window=(14, 13),
                                                             ref_window=(14, 13)),
    "lasp2h_noncausal_right_unbounded": lambda r, w: lasp2h_case(r, w, causal=False, window=(4, -1),
                                                                 ref_window=(4, -1)),
    "lasp2h_bad_input": lasp2h_bad_input,
}


CHECKS = {**usp_checks(), **LASP2H_CHECKS}


# --------------------------------------------------------------------------- the spawned group

@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    return run_group(__name__, WORLD, tmp_path_factory.mktemp(f"usp_lasp2h{WORLD}"),
                     deadline_s=DEADLINE_S, group_timeout_s=GROUP_TIMEOUT_S)


@pytest.mark.parametrize("check", list(CHECKS))
def test_usp_lasp2h(group_results, check):
    """Equal to one process, or the same clear error on every rank."""
    assert_check(group_results, check, same_message=True)
    assert not group_results[1], group_results[1]


# --------------------------------------------------------------------------- single process

def test_lasp2h_one_process_is_the_plain_op():
    q, k, v = rand(60, 1, 4, 10, 8), rand(61, 1, 2, 10, 8), rand(62, 1, 2, 10, 8)
    close("causal", lasp2h_attention(q, k, v), attnkit.flash_attention(q, k, v, causal=True, backend="reference"))
    close("window", lasp2h_attention(q, k, v, None, window=(3, 2), sinks=1),
          attnkit.sliding_window_attention(q, k, v, window=(3, 0), sinks=1, backend="reference"))
    expect_error(lambda: lasp2h_attention(q, k, v, None, sinks=-1), ValueError, "sinks")


def test_mesh_length_names_the_multiple():
    groups = MeshGroups(None, 0, 3, None, 0, 2)             # U = 3, R = 2
    assert check_mesh_length(24, "zigzag", groups) == 4
    expect_error(lambda: check_mesh_length(18, "zigzag", groups, name="N"), ValueError,
                 "N 18 cannot take layout 'zigzag' on a 3 x 2 (ulysses x ring) mesh", "multiple of 12")


def test_hybrid_example_trains_equal_to_one_process(capsys, monkeypatch):
    """examples/hybrid_lasp2.py: LASP-2 + LASP-2H on 2 gloo ranks, equal to one process.
    Run in this process (its ranks are spawned; no third interpreter to start)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))     # the spawned ranks import it by name
    example = importlib.import_module("hybrid_lasp2")
    assert example.main(["--steps", "3"]) == 0, capsys.readouterr()
    assert "2 ranks equal one process" in capsys.readouterr().out
