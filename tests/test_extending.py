"""An out-of-tree softmax variant written with the public extension API only
(examples/chunked_attention.py, walked through in docs/extending.md).

Checks: kernel vs reference on the example's cases (float32 and float16, and a float32
tiling sweep); the block schedule is exact and tight against a dense mask built from the
definition; the example imports nothing private; bad ``chunk_size`` is reported by name;
the example's ``main()`` runs; ``score_mod=`` works on the new variant.

The example registers the variant ``"chunked"`` when imported. It is imported inside a
module-scoped fixture (never at collection time, so test_contract.py, which collects
``attnkit.list_variants()`` at import, sees the in-tree variants only) and unregistered
when this module's tests are done.
"""

import ast
import importlib.util
import math
import pathlib

import pytest
import torch

import attnkit
import attnkit.extension as ext

from conftest import DEVICE, DTYPES

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "chunked_attention.py"
DTYPE_IDS = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.fixture(scope="module")
def example():
    """The example module, imported by path (this registers "chunked"); unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("chunked_attention_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "chunked" in attnkit.list_variants()
    yield module
    attnkit.unregister_variant("chunked")


def dense_mask(Nq, Nk, chunk_size):
    """(Nq, Nk) boolean mask straight from the definition (tests only: it is Nq x Nk)."""
    p = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    return (j <= p) & (p >= 0) & (torch.div(j, chunk_size, rounding_mode="floor")
                                  == torch.div(p, chunk_size, rounding_mode="floor"))


# ---------------------------------------------------------------------------------------------
# (a) kernel vs reference on the example's cases: forward, LSE and gradients.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernel_matches_reference(example, dtype):
    reports = attnkit.testing.check_variant("chunked", dtype=dtype, device=DEVICE, raise_on_failure=False)
    assert len(reports) == len(example.examples())
    for report in reports:
        assert report.ok, str(report)
        assert {"out", "lse", "dq", "dk", "dv"} <= {c.name for c in report.comparisons}, str(report)


def test_kernel_tiling_sweep(example):
    reports = attnkit.testing.check_variant("chunked", dtype=torch.float32, device=DEVICE, tilings=ext.TILINGS,
                                            raise_on_failure=False)
    assert len(reports) == len(ext.TILINGS) * len(example.examples())
    assert {r.tiling for r in reports} == set(ext.TILINGS)
    for report in reports:
        assert not report.refused, str(report)
        assert report.ok, str(report)


def test_score_mod_works_on_the_new_variant(example):
    """A learnable ALiBi score mod on chunked attention: the engine runs it and its backward
    (dslopes included) with no code in the example."""
    case = ext.Case((1, 4, 50, 32), (1, 2, 50, 32), (1, 2, 50, 32), {"chunk_size": 20},
                    tensors={"slopes": lambda g: 0.2 + 0.5 * torch.rand(4, generator=g, dtype=torch.float64)},
                    build=lambda t: {"score_mod": attnkit.mods.alibi(t["slopes"])}, name="alibi_learnable")
    with ext.force_config(16, 32):
        report = ext.check_case("chunked", case, dtype=torch.float32, device=DEVICE)
    assert report.ok, str(report)
    assert "dslopes" in {c.name for c in report.comparisons}, str(report)


def test_reference_matches_dense_definition(example):
    """The reference against naive float64 attention with the dense mask (empty rows give 0)."""
    g = torch.Generator().manual_seed(0)
    for Nq, Nk, chunk_size in [(40, 40, 8), (40, 40, 1), (13, 50, 16), (50, 13, 5), (1, 33, 10), (30, 30, 100)]:
        q = torch.randn(1, 4, Nq, 8, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, 2, Nk, 8, generator=g, dtype=torch.float64) for _ in range(2))
        out, lse = example.chunked_reference(q, k, v, chunk_size=chunk_size, return_lse=True)
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~dense_mask(Nq, Nk, chunk_size), -math.inf)
        torch.testing.assert_close(out, torch.softmax(s, -1).nan_to_num(0.0) @ vv)
        torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_public_op_and_cross_check_with_flash(example):
    """chunked_attention through the registry: the kernel equals the reference, and a chunk
    at least as long as the keys is plain bottom-right causal attention (flash)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 24, 16, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 2, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    out, lse = example.chunked_attention(q, k, v, chunk_size=16, return_lse=True, backend="triton")
    ref, ref_lse = example.chunked_attention(q, k, v, chunk_size=16, return_lse=True, backend="reference")
    assert out.shape == (1, 2, 24, 16) and lse.shape == (1, 2, 24)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    causal = attnkit.flash_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(example.chunked_attention(q, k, v, chunk_size=40, backend="reference"), causal)
    # a chunk far beyond int32 (the kernel caps it at Nk)
    huge = example.chunked_attention(q, k, v, chunk_size=10 ** 12, backend="triton")
    torch.testing.assert_close(huge, causal, atol=1e-5, rtol=1e-5)
    assert attnkit.explain(q, k, v, "chunked", "triton", chunk_size=16).backend == "triton"


# ---------------------------------------------------------------------------------------------
# (b) The block schedule: visits exactly the blocks with a visible pair, lists as full exactly
# the blocks whose pairs are all visible, and its ranges do not overlap.
# ---------------------------------------------------------------------------------------------
SCHEDULE_PARAMS = [
    # (Nq, Nk, chunk_size, block_m, block_n)
    (64, 64, 16, 16, 16),
    (64, 64, 16, 32, 16),
    (77, 77, 20, 16, 32),
    (77, 77, 20, 64, 16),
    (100, 100, 7, 16, 16),
    (1, 90, 32, 16, 16),
    (1, 90, 13, 32, 64),
    (29, 83, 24, 16, 16),
    (37, 53, 13, 32, 16),
    (60, 25, 10, 16, 16),
    (60, 25, 10, 32, 64),
    (33, 33, 1, 16, 16),
    (45, 45, 1000, 16, 32),
    (90, 90, 45, 32, 32),
    (130, 40, 64, 64, 16),
]


@pytest.mark.parametrize("Nq,Nk,chunk_size,bm,bn", SCHEDULE_PARAMS)
def test_schedule_is_exact_and_tight(example, Nq, Nk, chunk_size, bm, bn):
    schedule = ext.Schedule(mask=example.chunked_mask, kv_range=example.chunked_kv_range,
                            q_range=example.chunked_q_range, args=(chunk_size,))
    attnkit.testing.check_schedule(schedule, dense_mask(Nq, Nk, chunk_size), tilings=[(bm, bn)], tight=True)


# ---------------------------------------------------------------------------------------------
# (c) Only public imports: the example is what a third party can write.
# ---------------------------------------------------------------------------------------------
def test_example_uses_only_the_public_api():
    tree = ast.parse(EXAMPLE.read_text(), filename=str(EXAMPLE))
    modules = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.append(alias.name)
                assert not any(part.startswith("_") for part in alias.name.split(".")), alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            modules.append(node.module)
            assert not any(part.startswith("_") for part in node.module.split(".")), node.module
            for alias in node.names:
                assert not alias.name.startswith("_"), f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Attribute):
            # no private attribute either (e.g. attnkit._reference.softmax_attend)
            assert not node.attr.startswith("_"), f"private attribute .{node.attr} (line {node.lineno})"
    attnkit_modules = {m for m in modules if m.split(".")[0] == "attnkit"}
    assert attnkit_modules == {"attnkit", "attnkit.extension"}, attnkit_modules
    allowed = {"attnkit", "attnkit.extension", "torch", "triton", "triton.language", "os", "sys", "typing"}
    assert set(modules) <= allowed, set(modules) - allowed


# ---------------------------------------------------------------------------------------------
# (d) Bad chunk_size: a clear error that names it.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,error", [(0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError),
                                         ("16", TypeError), (torch.tensor(16), TypeError)],
                         ids=["zero", "negative", "float", "bool", "str", "tensor"])
def test_bad_chunk_size(example, value, error):
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(error, match="chunk_size"):
        example.chunked_attention(q, k, v, chunk_size=value)
    with pytest.raises(error, match="chunk_size"):
        attnkit.explain(q, k, v, "chunked", chunk_size=value)


def test_missing_chunk_size(example):
    q = k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match="chunk_size"):
        attnkit.attention(q, k, v, "chunked")
    with pytest.raises(TypeError, match="chunk_size"):
        example.chunked_attention(q, k, v)
    with pytest.raises(TypeError, match="chunk_size"):  # an unknown option lists the known ones
        attnkit.attention(q, k, v, "chunked", chunk=16)


def test_variant_has_the_shared_softmax_options(example):
    spec = attnkit.get_variant("chunked")
    assert dict(spec.options) == {"chunk_size": None, **ext.SOFTMAX_OPTIONS}
    assert spec.status == {"reference": True, "forward": True, "backward": True}
    assert spec.extra_outputs == {"return_lse": "lse"}


# ---------------------------------------------------------------------------------------------
# (e) The example's main() runs and passes.
# ---------------------------------------------------------------------------------------------
def test_main_runs(example, capsys, monkeypatch):
    # main() sweeps attnkit.extension.TILINGS; test_kernel_tiling_sweep already ran the full
    # sweep, so here one tiling keeps the interpreter's time down (main reads TILINGS per call).
    monkeypatch.setattr(ext, "TILINGS", ((16, 32),))
    example.main()
    printed = capsys.readouterr().out
    n = len(example.examples()) * 2
    assert f"{n} of {n} checks passed" in printed, printed
    assert "FAILED" not in printed
