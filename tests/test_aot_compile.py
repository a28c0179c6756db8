"""Every kernel code path compiles for a Hopper GPU (sm_90), checked without a GPU.

The interpreter that runs the kernel tests on CPU skips Triton's GPU compile rules; this
test records one launch per distinct code path (kernel, jit hooks, flags) of every
variant's float16 examples and compiles it to a cubin with the ptxas inside the triton
wheel, config after config of its autotune table until one does not spill registers:
every code path must have a spill-free config for the GPU's prune filter to keep
(tools/aot_compile.py; run it with ``--configs all`` for every autotune config)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton without its NVIDIA backend (no ptxas)")
def test_every_kernel_code_path_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    tool = str(ROOT / "tools" / "aot_compile.py")
    result = subprocess.run([sys.executable, tool, "--dedupe", "--configs", "first-clean", "--report",
                             "--dtypes", "float16", "--launches", str(tmp_path / "launches.pkl")],
                            check=False, capture_output=True, text=True, env=env, timeout=900)
    # a failure: a compile error, too much shared memory, a code path whose kept configs all
    # spill, or a main config (flash forward at head dim 64/128) without HGMMA
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "0 failures" in result.stdout
    for head_dim in (64, 128):  # the main configs were compiled and reported with HGMMA
        main = [line for line in result.stdout.splitlines() if line.startswith("| attn_fwd_kernel |")
                and f"VARIANT_MASK=flash_mask HEAD_DIM={head_dim} HEAD_DIM_V={head_dim} float16]" in line]
        assert main and "| yes (" in main[0], result.stdout[-6000:]


def test_prune_filter_drops_spilling_configs():
    """On a GPU the prune filter measures each config's spills; here a fake measurement."""
    from attnkit.kernels.engine import configs

    table = configs.autotune_configs("fwd")
    spills = {id(c): (64 if c.kwargs["BLOCK_M"] == 128 else 0) for c in table}
    kept = configs.without_spills(table, lambda c: spills[id(c)])
    assert kept and all(c.kwargs["BLOCK_M"] != 128 for c in kept)
    assert [c for c in table if c in kept] == kept  # order kept
    worst = configs.without_spills(table[:2], lambda c: 10 if c is table[0] else 20)
    assert worst == [table[0]]  # everything spills: the least-spilling one stays
