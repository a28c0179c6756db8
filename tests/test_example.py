"""The training example runs end to end (a few steps of every variant)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_gpt_example_runs_every_variant():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--steps", "3", "--plot", "",
                             "--log-every", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for variant in ("flash", "sliding_window", "lightning", "moba"):
        assert f"{variant:>15} step    2" in result.stdout
    assert "final loss" in result.stdout
