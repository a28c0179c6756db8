"""The command line, the public surface of small modules, and the repository explaining
itself (issue 17, items 13-15): ``python -m attnkit --help`` documents every option with
its default, the progress display writes plain lines into a log, ``attnkit.feature_maps``
exports only feature maps, kernel code does not read test-harness state, ``Case`` takes
shapes, and no source cites a design file outside the repository."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.registry import Case

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", COLUMNS="200")
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


# ---------------------------------------------------------------- python -m attnkit


def _help_entries(text: str) -> dict:
    """``--option`` -> its help text, from argparse's --help output (entries span lines)."""
    body = text.split("options:", 1)[1]
    entries, current = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (-[-\w]+)(?:[ ,][^ ].*?)?(?:  +(.*))?$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2) or ""
        elif current is not None and line.strip():
            entries[current] += " " + line.strip()
    return entries


def test_cli_help_lists_every_option_with_help_and_default():
    result = _run("-m", "attnkit", "--help")
    assert result.returncode == 0, result.stderr
    usage = result.stdout.split("options:", 1)[0]
    options = set(re.findall(r"\[(--[\w-]+)", usage))
    assert {"--variants", "--seqlen", "--dtype", "--backends"} <= options  # the parse below found them
    entries = _help_entries(result.stdout)
    for option in sorted(options):
        text = entries.get(option, "")
        help_text = re.sub(r"\(default: .*?\)", "", text).strip()
        assert help_text, f"{option} has no help text: {text!r}"
        assert re.search(r"\(default: [^)]+\)", text), f"{option} does not show its default: {text!r}"


def test_cli_progress_is_plain_lines_in_a_log(capsys):
    from attnkit.__main__ import main

    code = main(["--variants", "flash", "--backends", "reference", "--batch", "1", "--heads", "1",
                 "--seqlen", "16", "--head-dim", "16", "--repeats", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert "\r" not in captured.err and "\r" not in captured.out
    progress = [line for line in captured.err.splitlines() if "flash / reference" in line]
    assert len(progress) == 1, captured.err  # one plain line per step, no redraws


def test_cli_runs_the_torch_backend_by_default(capsys):
    """The status table has a row per variant for the torch backend (what auto runs on CPU)."""
    from attnkit.__main__ import build_parser, main

    assert "torch" in build_parser(cuda=False).parse_args([]).backends.split(",")
    code = main(["--variants", "flash", "--backends", "torch", "--batch", "1", "--heads", "1",
                 "--seqlen", "16", "--head-dim", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("flash"))
    assert row.split()[1] == "torch" and row.split()[-1] == "ok", out


# ---------------------------------------------------------------- public surfaces


FEATURE_MAPS = {"identity", "elu_plus_one", "relu", "taylor", "Hedgehog"}


def test_feature_maps_exports_only_feature_maps():
    fm = attnkit.feature_maps
    # NAMES: the names feature_map= accepts, i.e. the same maps by name
    assert set(fm.__all__) == FEATURE_MAPS | {"NAMES"}
    public = {n for n in dir(fm) if not n.startswith("_")}
    assert public == set(fm.__all__), f"stray public names: {sorted(public - set(fm.__all__))}"
    star: dict = {}
    exec("from attnkit.feature_maps import *", star)  # noqa: S102 - what a star import binds
    assert set(star) - {"__builtins__"} == set(fm.__all__)
    for name in FEATURE_MAPS - {"Hedgehog"}:
        x = torch.randn(2, 3)
        assert getattr(fm, name)(x).shape[:-1] == x.shape[:-1]
    assert set(fm.NAMES) == {"identity", "elu+1", "relu", "taylor"}


def _imported_modules(path: Path, package: str) -> set:
    """Absolute names of the modules a file imports (relative imports resolved), and of the
    ``from X import name`` targets, so that ``from attnkit import testing`` shows up."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_kernels_do_not_import_the_test_harness():
    files = sorted((ROOT / "kernels").rglob("*.py"))
    assert files
    for path in files:
        rel = path.relative_to(ROOT / "kernels").with_suffix("")
        parts = ["attnkit", "kernels", *rel.parts]
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        imported = _imported_modules(path, package)
        assert not any(n == "attnkit.testing" or n.startswith("attnkit.testing.") for n in imported), \
            f"{path.relative_to(ROOT)} imports attnkit.testing: kernel code must not read test-harness state"
        assert "testing.POISON" not in path.read_text(), f"{path.relative_to(ROOT)} reads attnkit.testing.POISON"


def test_poison_switch_lives_in_the_runtime_module():
    from attnkit.kernels.common import new_output

    from attnkit import runtime

    assert not runtime.poison_outputs_enabled()
    with attnkit.testing.poison_outputs():  # the harness keeps its public context manager
        assert runtime.poison_outputs_enabled()
        assert torch.isnan(new_output((2, 3), torch.float32, torch.device("cpu"))).all()
        with runtime.poison_outputs():
            assert runtime.poison_outputs_enabled()
        assert runtime.poison_outputs_enabled()  # nested contexts restore the outer state
    assert not runtime.poison_outputs_enabled()
    assert attnkit.testing.POISON is False


# ---------------------------------------------------------------- Case


def test_case_given_a_tensor_raises_type_error():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(TypeError, match=r"Case q must be a shape.*got a torch\.Tensor.*q\.shape"):
        Case(q, q.shape, q.shape)
    with pytest.raises(TypeError, match=r"Case v must be a shape"):
        Case(q.shape, q.shape, q)
    with pytest.raises(TypeError, match=r"Case k must be a shape"):
        Case((1, 2, 16, 8), (1, 2, 16.0, 8), (1, 2, 16, 8))
    with pytest.raises(TypeError, match=r"Case tensors\['sink_logits'\] must be a function"):
        Case((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8), tensors={"sink_logits": torch.zeros(2)})
    case = Case(q.shape, [1, 2, 16, 8], (1, 2, 16, 8))  # torch.Size and lists are shapes too
    assert case.q == case.k == case.v == (1, 2, 16, 8)
    assert all(type(s) is tuple for s in (case.q, case.k, case.v))


# ---------------------------------------------------------------- what docs/block_sparse.md says


def test_from_mask_fn_keeps_whole_tiles_and_create_block_mask_is_exact():
    n, bs = 64, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bm = attnkit.BlockMask.from_mask_fn(lambda b, h, qi, ki: qi >= ki, None, None, n, n, bs)
    assert bm.mask_mod is None
    tiles = torch.ones(n // bs, n // bs, dtype=torch.bool).tril()
    pairs = tiles.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    whole_tiles = torch.softmax((q @ k.transpose(-1, -2) / 4).masked_fill(~pairs, float("-inf")), -1) @ v
    out = attnkit.block_sparse_attention(q, k, v, bm, backend="reference")
    causal = attnkit.flash_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, whole_tiles)
    assert not torch.allclose(out, causal)
    torch.testing.assert_close(attnkit.block_sparse_attention(q, k, v, bm, causal=True, backend="reference"), causal)
    exact = attnkit.create_block_mask(attnkit.mods.causal(), None, None, n, n, block_size=bs, device="cpu")
    torch.testing.assert_close(attnkit.flex_attention(q, k, v, block_mask=exact, backend="reference"), causal)


def test_sparsity_is_over_the_padded_tile_grid_unlike_torch():
    causal = attnkit.BlockMask.from_mask_fn(lambda b, h, qi, ki: qi >= ki, None, None, 100, 100, 64)
    dense = attnkit.BlockMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 64, (100, 100))
    assert causal.sparsity() == 25.0 and dense.sparsity() == 0.0
    assert causal.to_torch().sparsity() == pytest.approx(-22.88)  # the numbers docs/block_sparse.md quotes
    assert dense.to_torch().sparsity() == pytest.approx(-63.84)
    aligned = attnkit.BlockMask.from_mask_fn(lambda b, h, qi, ki: qi >= ki, None, None, 128, 128, 64)
    assert aligned.sparsity() == pytest.approx(aligned.to_torch().sparsity()) == 25.0


# ---------------------------------------------------------------- examples/train_gpt.py


def test_train_gpt_says_how_to_get_matplotlib_when_it_is_missing(tmp_path):
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            "sys.argv = ['train_gpt.py', '--variant', 'flash', '--steps', '2', '--batch', '2', '--seqlen', '32', "
            f"'--period', '8', '--plot', {str(tmp_path / 'loss.png')!r}]; "
            "runpy.run_path('examples/train_gpt.py', run_name='__main__')")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    note = [i for i, line in enumerate(lines) if "matplotlib is not installed" in line]
    assert note and "'.[plot]'" in lines[note[0]] and "--plot ''" in lines[note[0]], result.stdout
    assert note[0] < min(i for i, line in enumerate(lines) if "step" in line)  # said before training
    assert not (tmp_path / "loss.png").exists()


# ---------------------------------------------------------------- self-contained docs


def test_no_source_cites_a_design_file_outside_the_repository():
    needle = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    hits = []
    for folder in ("src", "kernels", "tests", "docs", "examples", "tools", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".cfg") and path.is_file():
                hits += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                         if needle in line]
    for path in ROOT.glob("*.*"):
        if path.is_file() and path.suffix in (".md", ".toml", ".py", ".cfg"):
            hits += [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line]
    assert not hits, f"sources cite {needle}, which is not in the repository: {hits}"
