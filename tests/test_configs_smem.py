"""The engine's prune filter fits tiles to the device's real shared memory per block, and to the head
dims their table rows were measured spill-free at."""

import pytest


def _fwd_tiles(head_dim: int, arch: int | None) -> list[tuple[int, int, int]]:
    from attnkit.kernels.engine import configs

    named = {"BLOCK_D": head_dim, "BLOCK_DV": head_dim, "DOT_PRECISION": "tf32", "LISTS": None,
             "LIST_BQ": 1, "LIST_BK": 1}
    kept = configs.prune(configs.autotune_configs("fwd"), named, arch=arch)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_keeps_the_128x128_forward_tile(head_dim):
    # at D = 128 with 3 stages it needs 224 KiB (229376 bytes): within sm_90's 227 KiB
    assert (128, 128, 3) in _fwd_tiles(head_dim, arch=90)


def test_the_128x128_tile_is_dropped_where_it_does_not_fit():
    assert (128, 128, 3) not in _fwd_tiles(128, arch=80)  # A100: 163 KiB
    assert (128, 128, 3) not in _fwd_tiles(64, arch=86)   # 99 KiB: 112 KiB needed at D = 64
    assert (128, 128, 3) in _fwd_tiles(64, arch=80)


def test_limit_without_a_gpu_is_the_sm90_figure():
    from attnkit.kernels.engine import configs

    assert configs.smem_limit() == configs.SMEM_PER_BLOCK[90] == 232448
    assert configs.smem_limit(80) == 166912
    with pytest.raises(ValueError, match="arch"):
        configs.smem_limit(75)


def test_a_table_row_with_a_max_head_dim_is_dropped_above_it(monkeypatch):
    """A row's fifth entry is the largest head dim it was measured spill-free at (tools/aot_compile.py)."""
    from attnkit.kernels.engine import configs

    monkeypatch.setitem(configs.TABLES, "fwd", [(128, 64, 4, 3, 64), (64, 64, 8, 3)])
    assert (128, 64, 3) in _fwd_tiles(64, arch=90)
    assert (128, 64, 3) not in _fwd_tiles(128, arch=90)  # the pointer config and its TMA twin
    assert (64, 64, 3) in _fwd_tiles(128, arch=90)
    assert all(c.max_head_dim in (64, None) for c in configs.autotune_configs("fwd"))
