"""The fused engine at every config its autotune tables keep (issue 18), against the float64
reference, forward and backward, on the paths a config takes.

The configs are read from ``kernels/engine/configs`` (its ``TABLES``, through
``autotune_configs``, TMA twins included when the tables have them) when the tests are
collected, so a config added later is covered without editing this file. ``force_config``
fixes (BLOCK_M, BLOCK_N) for all three kernels at once (forward: queries owned x keys per
step; dK/dV: queries per step x keys owned; dQ: queries owned x keys per step), so one forced
tile runs a table's pair in every pass; warps and stages do not exist for the interpreter.

Every config runs range mode (flash causal, Nq != Nk, both lengths ragged for its tile, GQA,
Dv != D). Dense range mode, list mode (block_sparse, MoBA) and a packed varlen batch with a
learnable score mod and a softcap run on the extreme tiles (smallest, largest, tallest,
widest), where a schedule or an edge mask goes wrong first; with TMA configs, on the extreme
TMA tiles too (each list/varlen path through one of them). The file keeps to ~40 s of one
core under the interpreter.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from attnkit.kernels.engine import configs
from conftest import DEVICE

import attnkit
from attnkit.block_sparse.block_mask import BlockMask
from attnkit.registry import Case, packed_offsets
from attnkit.testing import check_case


def kept_configs() -> list[tuple[int, int, bool]]:
    """Every distinct (BLOCK_M, BLOCK_N, TMA) the autotuner of any engine kernel may pick."""
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bool(c.kwargs.get("TMA", False)))
                   for kind in configs.TABLES for c in configs.autotune_configs(kind)})


CONFIGS = kept_configs()
POINTER = [c for c in CONFIGS if not c[2]]
TMA = [c for c in CONFIGS if c[2]]


def _extremes(tiles):
    """The smallest, largest, tallest (BLOCK_M / BLOCK_N) and widest tiles, without repeats."""
    def area(t):
        return t[0] * t[1]

    picks = [min(tiles, key=lambda t: (area(t), t)), max(tiles, key=lambda t: (area(t), t)),
             max(tiles, key=lambda t: (t[0] / t[1], area(t))), min(tiles, key=lambda t: (t[0] / t[1], -area(t)))]
    return list(dict.fromkeys(picks))


POINTER_EXTREMES = _extremes(POINTER)
TMA_EXTREMES = _extremes(TMA) if TMA else []
EXTREMES = POINTER_EXTREMES + TMA_EXTREMES
#: (config, causal): causal at every config (full and masked segments, empty rows where Nq > Nk);
#: dense (no mask: the ragged ends bounded by the length checks alone) at the extreme ones
RANGE_CASES = [(c, True) for c in CONFIGS] + [(c, False) for c in EXTREMES]
PATHS = ["block_sparse", "moba", "varlen_mod_softcap"]
#: (path, config): every path on the extreme pointer tiles, and the extreme TMA tiles dealt over the paths
PATH_CONFIGS = ([(p, c) for p in PATHS for c in POINTER_EXTREMES]
                + [(PATHS[i % len(PATHS)], c) for i, c in enumerate(TMA_EXTREMES)])


def config_id(config) -> str:
    return f"{config[0]}x{config[1]}" + ("-tma" if config[2] else "")


def ragged(block: int) -> int:
    """A length of more than one block and not a multiple of it: the last tile is cut off."""
    return block + block // 2 + 9


@contextlib.contextmanager
def forced(config):
    bm, bn, tma = config
    with configs.force_config(bm, bn, **({"tma": True} if tma else {})):
        yield


def check(variant: str, case: Case, config, monkeypatch) -> None:
    """The kernel at ``config`` against the float64 reference (forward, LSE, every gradient);
    every engine launch must have run at that config (a silently ignored force passes nothing)."""
    launched = []
    fixed_config = configs.fixed_config

    def spy(*args, **kwargs):
        launched.append(fixed_config(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(configs, "fixed_config", spy)
    with forced(config):
        report = check_case(variant, case, dtype=torch.float32, device=DEVICE, backend="triton")
    assert report.comparisons and report.ok, str(report)
    assert len(launched) >= 3, f"expected the forward, dK/dV and dQ launches, saw {launched}"
    for got in launched:
        assert (got["BLOCK_M"], got["BLOCK_N"], bool(got.get("TMA", False))) == tuple(config), launched


@pytest.mark.parametrize("config,causal", RANGE_CASES,
                         ids=lambda x: ("causal" if x else "dense") if isinstance(x, bool) else config_id(x))
def test_range_mode_at_every_kept_config(config, causal, monkeypatch):
    bm, bn, _ = config
    # causal: Nq < Nk for square tiles (rows see a prefix of the keys); dense: Nq > Nk
    nq, nk = (ragged(bm), ragged(bn) + 13) if causal else (ragged(bm) + 13, ragged(bn))
    assert nq % bm and nk % bn and nq != nk
    case = Case((1, 2, nq, 16), (1, 1, nk, 16), (1, 1, nk, 32), {"causal": causal}, name="ragged_gqa_dv32")
    check("flash", case, config, monkeypatch)


def _block_mask_case(tile) -> Case:
    bm, bn = tile
    bq, bk = bm * (2 if bm < 64 else 1), bn * (2 if bn < 64 else 1)  # blocks of one or two tiles
    nq, nk = ragged(bq), ragged(bk)
    g = torch.Generator().manual_seed(bm * 1000 + bn)
    dense = torch.rand(1, 2, -(-nq // bq), -(-nk // bk), generator=g) < 0.6
    dense[..., -1, 0] = True  # the ragged last query block sees something in every head
    mask = BlockMask.from_dense(dense, (bq, bk), (nq, nk))
    return Case((1, 2, nq, 16), (1, 1, nk, 16), (1, 1, nk, 16), {"block_mask": mask, "causal": True},
                name=f"blocks{bq}x{bk}_causal_gqa")


def _moba_case(tile) -> Case:
    block = max(tile[1], 32)  # MoBA blocks a multiple of the keys per tile
    n = ragged(block)
    return Case((1, 2, n, 16), (1, 1, n, 16), (1, 1, n, 16), {"block_size": block, "top_k": 2},
                name=f"moba_bs{block}_gqa")


def _varlen_mod_case(tile) -> Case:
    """A packed batch (sequences shorter than a tile, empty, longer than a tile, one token) with a
    learnable per-sequence ALiBi score mod (its gradient is accumulated in the dQ pass), a
    causal mask mod and a softcap."""
    bm, bn = tile
    # tall tiles give Nq > Nk per sequence (causal rows that see nothing), the others Nq < Nk;
    # the second sequence has keys and no query
    lengths_q = [bm // 2 + 3, 0, bm + 5, 1]
    lengths_k = [bn // 2 + 7, 5, bn + 9, 1]
    return Case((1, 2, sum(lengths_q), 16), (1, 1, sum(lengths_k), 16), (1, 1, sum(lengths_k), 16),
                {"softcap": 4.0},
                {"slopes": lambda g: 0.3 + torch.rand(len(lengths_q), 2, generator=g, dtype=torch.float64),
                 "cu_seqlens_q": packed_offsets(*lengths_q), "cu_seqlens_k": packed_offsets(*lengths_k)},
                build=lambda t: {"score_mod": attnkit.mods.alibi(t["slopes"]), "mask_mod": attnkit.mods.causal(),
                                 "cu_seqlens_q": t["cu_seqlens_q"], "cu_seqlens_k": t["cu_seqlens_k"]},
                name="varlen_alibi_softcap_causal_gqa")


_CASES = {"block_sparse": ("block_sparse", _block_mask_case), "moba": ("moba", _moba_case),
          "varlen_mod_softcap": ("flex", _varlen_mod_case)}


@pytest.mark.parametrize("path,config", PATH_CONFIGS,
                         ids=lambda x: x if isinstance(x, str) else config_id(x))
def test_list_varlen_and_mod_paths_at_extreme_configs(path, config, monkeypatch):
    variant, make = _CASES[path]
    check(variant, make(config[:2]), config, monkeypatch)


def test_the_sweep_covers_every_table():
    """Every (BLOCK_M, BLOCK_N) of each table, and every TMA twin, is swept in range mode; the
    other paths run on kept configs only."""
    swept = {c for c, _ in RANGE_CASES}
    for kind, table in configs.TABLES.items():
        assert table, kind
        for bm, bn, *_ in table:
            assert (bm, bn, False) in swept, (kind, bm, bn)
        for c in configs.autotune_configs(kind):
            assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bool(c.kwargs.get("TMA", False))) in swept
    assert {c for _, c in PATH_CONFIGS} <= swept and {p for p, _ in PATH_CONFIGS} == set(PATHS)
