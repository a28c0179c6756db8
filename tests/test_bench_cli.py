"""``python -m attnkit.bench``: the GPU round's dry run on CPU, its tables and the
docs/performance.md section writer."""

from pathlib import Path

import pytest
import torch

from attnkit import bench

ROOT = Path(__file__).resolve().parents[1]

FAKE_REPORT = {
    "benchmarks": [
        {
            "fullname": "benchmarks/test_flash.py::test_flash[attnkit-1024-64-full-fwd]",
            "params": {"provider": "attnkit", "seqlen": 1024},
            "extra_info": {"ms": 0.25, "tflops": 412.345},
        },
        {
            "fullname": "benchmarks/test_flash.py::test_flash[sdpa-1024-64-full-fwd]",
            "params": {"provider": "sdpa", "seqlen": 1024},
            "extra_info": {"ms": 0.3},
        },
        {
            "fullname": "benchmarks/test_decode.py::test_decode[flex-1-4096]",
            "params": {"provider": "flex"},
            "extra_info": {"ms": 1.5, "tflops": 2.0},
        },
    ]
}


def test_dry_run_on_cpu_lists_bf16_selection_and_every_benchmark_file(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ATTNKIT_BENCH_QUICK", raising=False)
    # A small test file keeps the collection short; the selection is the same for tests/.
    assert bench.main(["--dry-run", "--quick", "--tests", "tests/test_contract.py"]) == 0
    out = capsys.readouterr().out
    for path in sorted((ROOT / "benchmarks").glob("test_*.py")):
        assert f"benchmarks/{path.name}" in out
    assert "-k 'bfloat16 or bf16'" in out
    assert "--benchmark-only" in out and "--benchmark-json=" in out
    selects = [line for line in out.splitlines() if "selects:" in line]
    assert len(selects) == 2 and all(line.endswith(" test ids") for line in selects), out
    # --quick reaches benchmarks/conftest.py, which keeps one size per benchmark.
    quick = int(selects[1].split()[1])
    full_command = bench.pytest_commands(bench.parse_args([]), Path("report.json"))[1]
    full = int(bench.collect_count(full_command, bench.child_env(quick=False)).split()[0])
    assert 0 < quick < full


def test_without_gpu_and_without_dry_run_exits_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ["--quick", "--write", "--dry-run", "--tests", "--benchmarks", "--skip-tests"]:
        assert option in out
    assert "default: benchmarks" in out and "default: None" in out


def test_render_tables_from_a_pytest_benchmark_report():
    tables = bench.load_rows(FAKE_REPORT)
    assert list(tables) == ["benchmarks/test_flash.py", "benchmarks/test_decode.py"]
    text = bench.render_tables(tables)
    assert text.index("#### benchmarks/test_decode.py") < text.index("#### benchmarks/test_flash.py")
    assert "| `test_flash[attnkit-1024-64-full-fwd]` | attnkit | 0.250 | 412.3 |" in text
    assert "| `test_flash[sdpa-1024-64-full-fwd]` | sdpa | 0.300 | - |" in text  # no flops: no TFLOP/s
    assert "| `test_decode[flex-1-4096]` | flex | 1.500 | 2.0 |" in text


def test_write_section_twice_replaces_it_and_keeps_hand_written_text(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written before\n")
    bench.write_section(doc, "first run")
    doc.write_text(doc.read_text() + "\nhand-written after\n")
    bench.write_section(doc, "second run")
    text = doc.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert "second run" in text and "first run" not in text
    assert text.startswith("# Performance\n\nhand-written before\n")
    assert text.endswith(f"{bench.END}\n\nhand-written after\n")


def test_replace_section_rejects_a_lone_marker():
    with pytest.raises(ValueError, match="bench:end"):
        bench.replace_section(f"text\n{bench.BEGIN}\nno end\n", "section")


def test_docs_name_the_command_and_performance_md_has_one_generated_section():
    command = "python -m attnkit.bench --quick --write docs/performance.md"
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert command in (ROOT / "README.md").read_text() and command in performance
    assert performance.count(bench.BEGIN) == 1 and performance.count(bench.END) == 1
    assert performance.index(bench.BEGIN) < performance.index(bench.END)


def test_a_round_writes_device_versions_command_and_tables(monkeypatch, tmp_path, capsys):
    """The wiring after pytest: the report the benchmark command writes becomes the section."""
    import json
    import subprocess

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        for arg in command:
            if arg.startswith("--benchmark-json="):
                Path(arg.split("=", 1)[1]).write_text(json.dumps(FAKE_REPORT))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    doc = tmp_path / "performance.md"
    doc.write_text("hand-written\n")
    assert bench.main(["--write", str(doc)]) == 0
    assert len(commands) == 2 and "bfloat16 or bf16" in commands[0]
    text = doc.read_text()
    assert text.startswith("hand-written\n")
    assert "- device: Fake H200" in text and f"torch {torch.__version__}" in text
    assert f"- command: `python -m attnkit.bench --write {doc}`" in text
    assert "| `test_flash[attnkit-1024-64-full-fwd]` | attnkit | 0.250 | 412.3 |" in text
    assert "#### benchmarks/test_decode.py" in capsys.readouterr().out
