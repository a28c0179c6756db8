"""Registry, dispatch, the verification harness, the LSE merge, modules and packaging."""

import math
import pathlib
import re

import pytest
import torch

import attnkit
from attnkit.flash import VARIANT as FLASH
from attnkit.kernels.engine import new_output
from attnkit.registry import Case, Variant
from attnkit.testing import check_variant, poison_outputs, relative_error

from conftest import DEVICE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


@pytest.fixture
def third_party():
    """Register variants built from flash's pieces under temporary names."""
    names = []

    def register(name, kernel):
        names.append(name)
        return attnkit.register_variant(Variant(
            name=name, reference=FLASH.reference, kernel=kernel, options=FLASH.options, validate=FLASH.validate,
            extra_outputs=FLASH.extra_outputs,
            examples=lambda: [Case((1, 2, 19, 16), (1, 2, 23, 16), (1, 2, 23, 16), {"causal": True})]))

    yield register
    for n in names:
        attnkit.unregister_variant(n)


# ---------------------------------------------------------------- registry and dispatch


def test_registry_lists_and_gets():
    assert "flash" in attnkit.list_variants()
    spec = attnkit.get_variant("flash")
    assert callable(spec.reference) and callable(spec.kernel)
    assert spec.options["causal"] is False
    with pytest.raises(ValueError, match="unknown attention variant 'nope'.*flash"):
        attnkit.get_variant("nope")


def test_third_party_variant_dispatches_and_passes_the_harness(third_party):
    third_party("my_flash", FLASH.kernel)
    assert "my_flash" in attnkit.list_variants()
    q = rand(1, 2, 10, 16)
    out = attnkit.attention(q, q, q, "my_flash", causal=True)
    assert out.shape == (1, 2, 10, 16)
    reports = check_variant("my_flash", dtype=torch.float32, device=DEVICE)
    assert all(r.ok for r in reports)


def test_registering_twice_needs_replace(third_party):
    third_party("dup", FLASH.kernel)
    with pytest.raises(ValueError, match="already registered"):
        attnkit.register_variant(attnkit.get_variant("dup"))
    attnkit.register_variant(attnkit.get_variant("dup"), replace=True)
    with pytest.raises(TypeError, match="attnkit.Variant"):
        attnkit.register_variant("flash")


def test_harness_catches_a_slightly_wrong_kernel(third_party):
    def wrong(q, k, v, **options):
        result = FLASH.kernel(q, k, v, **options)
        return (result[0] * 1.001,) + tuple(result[1:]) if isinstance(result, tuple) else result * 1.001

    third_party("wrong", wrong)
    with pytest.raises(AssertionError, match="BAD out"):
        check_variant("wrong", dtype=torch.float32, device=DEVICE)


def test_harness_catches_unwritten_outputs(third_party):
    def lazy(q, k, v, *, return_lse=False, **options):
        out = new_output(q.shape[:-1] + (v.shape[-1],), q.dtype, q.device)  # never written
        lse = new_output(q.shape[:-1], torch.float32, q.device)
        return (out, lse) if return_lse else out

    third_party("lazy", lazy)
    reports = check_variant("lazy", dtype=torch.float32, device=DEVICE, raise_on_failure=False)
    assert not reports[0].ok
    assert any(math.isnan(c.kernel_error) for c in reports[0].comparisons)


def test_poison_fills_with_nan_only_inside_the_context():
    with poison_outputs():
        assert torch.isnan(new_output((4,), torch.float32, torch.device("cpu"))).all()
    assert attnkit.testing.POISON is False


def test_relative_error_rules():
    x = torch.tensor([1.0, 2.0, -math.inf])
    assert relative_error(x, x) == 0.0
    assert relative_error(torch.tensor([1.0, 2.5, -math.inf]), x) == pytest.approx(0.25)
    assert math.isinf(relative_error(torch.tensor([1.0, 2.0, 0.0]), x))
    assert math.isnan(relative_error(torch.tensor([1.0, math.nan, -math.inf]), x))


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_of_key_splits_equals_full_attention(backend):
    q, k, v = rand(1, 2, 13, 16, seed=1), rand(1, 2, 40, 16, seed=2), rand(1, 2, 40, 16, seed=3)
    full, full_lse = attnkit.flash_attention(q, k, v, return_lse=True, backend=backend)
    parts = [attnkit.flash_attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, backend=backend)
             for a, b in ((0, 7), (7, 30), (30, 40))]
    out, lse = attnkit.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-5)


def test_merge_of_empty_parts_is_zero_and_neg_inf():
    out = torch.randn(1, 1, 3, 4, requires_grad=True)
    lse = torch.full((1, 1, 3), -math.inf, requires_grad=True)
    merged, merged_lse = attnkit.merge_attention([out, out], [lse, lse])
    assert torch.all(merged == 0) and torch.isneginf(merged_lse).all()
    merged.sum().backward()
    assert torch.isfinite(out.grad).all()
    with pytest.raises(ValueError, match="as many outputs as lses"):
        attnkit.merge_attention([out], [])


# ---------------------------------------------------------------- modules


def test_attention_module_gqa_matches_functional():
    torch.manual_seed(0)
    block = attnkit.nn.Attention(64, num_heads=4, num_kv_heads=2, causal=True).to(DEVICE)
    x = rand(2, 11, 64)
    y = block(x)
    assert y.shape == x.shape
    q, k, v = block.qkv(x).view(2, 11, 8, 16).transpose(1, 2).split([4, 2, 2], dim=1)
    want = block.proj(attnkit.flash_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(y, want)
    y.sum().backward()
    assert block.qkv.weight.grad is not None
    assert "variant='flash'" in repr(block)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=65, num_heads=4), "divisible by num_heads"),
    (dict(dim=64, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(dim=64, num_heads=4, variant="nope"), "unknown attention variant"),
    (dict(dim=64, num_heads=4, windw=3), "unknown option"),
])
def test_attention_module_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attnkit.nn.Attention(**kwargs)


# ---------------------------------------------------------------- packaging and CI


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_cmds = [c.strip() for c in commands if "pytest" in c]
    assert len(test_cmds) == 1, "README must give exactly one test set-up command"
    assert test_cmds[0] in ci


def test_every_package_folder_is_importable():
    """setup.py maps src/attnkit to attnkit and kernels/ to attnkit.kernels: every folder imports."""
    import importlib

    folders = [("attnkit", p) for p in (ROOT / "src/attnkit").rglob("__init__.py")]
    folders += [("attnkit.kernels", p) for p in (ROOT / "kernels").rglob("__init__.py")]
    for prefix, init in folders:
        base = ROOT / "src/attnkit" if prefix == "attnkit" else ROOT / "kernels"
        name = ".".join((prefix,) + init.parent.relative_to(base).parts)
        assert pathlib.Path(importlib.import_module(name).__file__).resolve() == init.resolve()


def test_readme_table_lists_every_variant_with_its_status():
    readme = (ROOT / "README.md").read_text()
    for name in attnkit.list_variants():
        row = re.search(rf"^\| `{name}` \|(.*)$", readme, flags=re.M)
        assert row, f"README's variant table has no row for {name}"
        cells = [c.strip() for c in row.group(1).split("|")]
        status = attnkit.get_variant(name).status
        expected = ["yes" if status[key] else "no" for key in ("reference", "forward", "backward")]
        assert cells[1:4] == expected, f"README row of {name} says {cells[1:4]}, registry says {expected}"


def test_importing_attnkit_does_not_import_triton():
    """TRITON_INTERPRET must still work when set after ``import attnkit`` (python -m attnkit relies on it)."""
    import subprocess
    import sys

    code = "import sys, attnkit; assert 'triton' not in sys.modules, 'attnkit imported triton'"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_main_job_prints_its_table():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "attnkit", "--variants", "flash,linear", "--seqlen", "40",
                             "--heads", "2", "--head-dim", "16"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("variant") and "max rel err" in line for line in lines)
    rows = [line for line in lines if line.startswith(("flash", "linear"))]
    assert len(rows) == 6 and all(line.rstrip().endswith("ok") for line in rows), result.stdout  # 3 backends each
    assert sum(line.split()[1] == "torch" for line in rows) == 2, result.stdout


def test_merge_attention_rows_equals_the_dense_merge():
    # parts indexed by row (any number per row, -inf ones contribute nothing) equal
    # merge_attention over a dense (rows x slots) layout, values and gradients, with rows
    # that no part saw (out 0, lse -inf, zero gradients rather than NaN)
    from attnkit.merge import merge_attention_rows

    g = torch.Generator().manual_seed(0)
    R, Dv, slots = 12, 5, 3
    out = torch.randn(R, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(R, generator=g, dtype=torch.float64)
    lse[[2, 7]] = -math.inf                                  # row 7 gets no part either: empty
    lse.requires_grad_()
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 5, 9, 11, 3])     # up to 3 parts per row, in any order
    slot = torch.tensor([0, 1, 0, 0, 1, 2, 0, 0, 0, 0])
    p_out = torch.randn(rows.shape[0], Dv, generator=g, dtype=torch.float64, requires_grad=True)
    p_lse = torch.randn(rows.shape[0], generator=g, dtype=torch.float64)
    p_lse[8] = -math.inf                                     # a padding part: finite output, no weight
    p_lse.requires_grad_()
    half = 5                                                  # the parts in two calls
    got = merge_attention_rows(out, lse, [(p_out[:half], p_lse[:half], rows[:half]),
                                          (p_out[half:], p_lse[half:], rows[half:])])
    dense_out = [out] + [torch.zeros(R, Dv, dtype=torch.float64).index_put((rows[slot == s],), p_out[slot == s])
                         for s in range(slots)]
    dense_lse = [lse] + [torch.full((R,), -math.inf, dtype=torch.float64).index_put((rows[slot == s],),
                                                                                   p_lse[slot == s])
                         for s in range(slots)]
    want = attnkit.merge_attention([o[None, None] for o in dense_out], [x[None, None] for x in dense_lse])
    torch.testing.assert_close(got[0], want[0][0, 0])
    torch.testing.assert_close(got[1], want[1][0, 0])
    assert got[1][7] == -math.inf and torch.all(got[0][7] == 0)
    w = torch.randn(R, Dv, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got[0] * w).sum() + got[1][got[1].isfinite()].sum(), (out, lse, p_out, p_lse))
    grads_want = torch.autograd.grad((want[0][0, 0] * w).sum() + want[1][0, 0][want[1][0, 0].isfinite()].sum(),
                                     (out, lse, p_out, p_lse))
    for a, b in zip(grads, grads_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
