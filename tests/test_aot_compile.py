"""Every kernel code path compiles for a Hopper GPU (sm_90), checked without a GPU.

The interpreter that runs the kernel tests on CPU skips Triton's GPU compile rules; one run
of tools/aot_compile.py records one launch per distinct code path (kernel, jit hooks, flags)
of every variant's float16 examples and compiles it to a cubin with the ptxas inside the
triton wheel, config after config of its autotune table until one does not spill registers:
every code path must have a spill-free config for the GPU's prune filter to keep. The same
run compiles the main launches — flash's forward, dK/dV and dQ kernels on whole blocks,
causal and not, at head dim 128 at every config the static prune filter keeps (at 64 the
first kept config; `python tools/aot_compile.py --report main` compiles every one at both):
none may spill (the tables must not keep a spilling config there), and the first must use
Hopper's warpgroup MMA (HGMMA). ``--report`` without ``main`` does that for every launch."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAIN_KERNELS = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}
#: the main head dim compiled at every kept config; at the other (64) only the first kept config is,
#: to keep the suite's time (the tables' head-dim limits drop configs at 128, where spills happen)
FULL_HEAD_DIM = 128


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def _tool():
    spec = importlib.util.spec_from_file_location("aot_compile", ROOT / "tools" / "aot_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


needs_ptxas = pytest.mark.skipif(not _nvidia_backend_available(), reason="triton without its NVIDIA backend (no ptxas)")


@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    """One run of the tool: record once, compile in two processes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    launches = tmp_path_factory.mktemp("aot") / "launches.pkl"
    return subprocess.run([sys.executable, str(ROOT / "tools" / "aot_compile.py"), "--dedupe", "--configs",
                           "first-clean", "--report", "main", "--full-head-dims", str(FULL_HEAD_DIM),
                           "--dtypes", "float16", "--jobs", "2", "--launches", str(launches)],
                          check=False, capture_output=True, text=True, env=env, timeout=1800)


def _table_rows(stdout: str) -> dict[tuple[str, str], list[dict]]:
    """The report's main table, rows grouped by (kernel, launch label), in order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or cells[0] not in MAIN_KERNELS:
            continue
        tile = re.match(r"(\d+) x (\d+)(?: TMA=(\w+))?", cells[2])
        groups.setdefault((cells[0], cells[1]), []).append(
            {"tile": (int(tile[1]), int(tile[2]), int(cells[3]), int(cells[4]), tile[3] == "True"),
             "spills": int(cells[6]), "hgmma": cells[8].startswith("yes")})
    return groups


def _kept(kind: str, head_dim: int) -> list[tuple]:
    """What the static prune filter keeps for a main launch (fp16, sm_90)."""
    from attnkit.kernels.engine import configs

    named = {"BLOCK_D": head_dim, "BLOCK_DV": head_dim, "DOT_PRECISION": "tf32", "LISTS": None,
             "LIST_BQ": 1, "LIST_BK": 1}
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, bool(c.kwargs.get("TMA")))
            for c in configs.prune(configs.autotune_configs(kind), named, arch=90)]


@needs_ptxas
def test_every_kernel_code_path_compiles_for_sm90(compile_check):
    # a failure: a compile error, too much shared memory, a code path whose kept configs all
    # spill, a spill in a kept config of a main launch, or a main launch's first config without HGMMA
    out = compile_check.stdout[-8000:] + compile_check.stderr[-3000:]
    assert compile_check.returncode == 0, out
    assert " 0 failures" in compile_check.stdout, out


@needs_ptxas
@pytest.mark.parametrize("kernel", sorted(MAIN_KERNELS))
def test_every_kept_config_of_the_main_launches_is_clean(compile_check, kernel):
    groups = _table_rows(compile_check.stdout)
    for head_dim in (64, 128):
        for causal in (0, 1):
            label = next((launch for k, launch in groups if k == kernel and f"VARIANT_ARGS=({causal})" in launch
                          and f"HEAD_DIM={head_dim} HEAD_DIM_V={head_dim} float16" in launch), None)
            assert label is not None, f"{kernel} causal={causal} D={head_dim} missing:\n{compile_check.stdout[-6000:]}"
            rows = groups[(kernel, label)]
            kept = _kept(MAIN_KERNELS[kernel], head_dim)
            assert [r["tile"] for r in rows] == (kept if head_dim == FULL_HEAD_DIM else kept[:1])
            spilling = [r["tile"] for r in rows if r["spills"]]
            assert not spilling, f"{kernel} {label}: kept configs that spill: {spilling}"
            assert rows[0]["hgmma"], f"{kernel} {label}: its first config {rows[0]['tile']} has no HGMMA"


def test_judge_fails_on_a_spill_or_no_hgmma_in_a_main_launch():
    tool = _tool()
    entry = {"name": "attn_fwd_kernel", "args": {"Q": ("tensor", "float16"), "HEAD_DIM": ("int", 128),
                                                  "HEAD_DIM_V": ("int", 128)}, "constexpr": ["HEAD_DIM", "HEAD_DIM_V"]}

    def row(spills: int, hgmma: bool, shared: int = 1024) -> dict:
        return {"config": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}, "registers": 200,
                "spills": spills, "shared": shared, "hgmma": hgmma, "hgmma_source": "sass", "tma": False}

    def failures(outcome, is_main):
        return tool.judge(entry, outcome, is_main=is_main, check_clean=True, smem_limit=4096)["failures"]

    assert failures([row(0, True), row(0, False)], True) == []
    assert any("spills 8 bytes" in f for f in failures([row(0, True), row(8, True)], True))
    assert any("no HGMMA" in f for f in failures([row(0, False), row(0, True)], True))
    assert any("shared memory" in f for f in failures([row(0, True, shared=8192)], True))
    # elsewhere a spill is the GPU prune filter's business, unless every config spills
    verdict = tool.judge(entry, [row(8, False), row(0, False)], is_main=False, check_clean=True, smem_limit=4096)
    assert verdict["failures"] == [] and len(verdict["spills"]) == 1
    assert any("every kept config spills" in f for f in failures([row(8, True)], False))


_EXTERNAL = '''
import triton
import triton.language as tl

TARGET = triton.runtime.driver.active.get_current_target()  # as the Triton tutorials ask at import


@triton.autotune([triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2),
                  triton.Config({"BLOCK": 128}, num_warps=8, num_stages=3)], key=["n"])
@triton.jit
def copy(src, dst, desc, n, scale, stride, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs * stride) * scale, mask=offs < n)
'''


def test_external_kernel_is_read_with_its_signature_and_autotune_configs(tmp_path):
    tool = _tool()
    path = tmp_path / "ext_kernel.py"
    path.write_text(_EXTERNAL)
    entry, configs = tool.external_entry(f"{path}:copy", "src=*fp16,dst=*fp16,desc=tensordesc<fp16[BLOCK,64]>,"
                                         "scale=fp32,stride=1,WIDE=True", 90)
    assert entry["args"] == {"src": ("type", "*fp16"), "dst": ("type", "*fp16"),
                             "desc": ("type", "tensordesc<fp16[BLOCK,64]>"), "n": ("int", 16),
                             "scale": ("type", "fp32"), "stride": ("int", 1), "WIDE": ("const", True),
                             "BLOCK": ("autotuned",)}
    assert configs == [{"BLOCK": 64, "num_warps": 4, "num_stages": 2}, {"BLOCK": 128, "num_warps": 8, "num_stages": 3}]
    _, source = tool._source(entry, {"BLOCK": 128})
    assert source.signature["desc"] == "tensordesc<fp16[128,64]>"  # block shapes follow the config
    assert source.signature["stride"] == "constexpr"  # 1 is specialized, as the launcher does
    assert source.attrs[(0,)] == source.attrs[(3,)] == [["tt.divisibility", 16]]  # aligned pointer, n % 16 == 0
    with pytest.raises(ValueError, match="--signature.*nope"):
        tool.external_entry(f"{path}:copy", "nope=i32", 90)
    with pytest.raises(ValueError, match="PATH:KERNEL"):
        tool.external_entry("copy", "", 90)


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
