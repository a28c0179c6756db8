"""Every kernel code path compiles for a Hopper GPU (sm_90), checked without a GPU.

The interpreter that runs the kernel tests on CPU skips Triton's GPU compile rules; this
test records one launch per distinct code path (kernel, jit hooks, flags) of every
variant's float16 examples and compiles it to a cubin with the ptxas inside the triton
wheel (tools/aot_compile.py; run it with ``--configs all`` for every autotune config)."""

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
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--dedupe", "--configs", "first",
                             "--dtypes", "float16", "--launches", str(tmp_path / "launches.pkl")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "0 failures" in result.stdout
