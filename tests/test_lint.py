"""ruff: the project is lint-clean and formatted (configuration in pyproject.toml)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
FOLDERS = ["optax_gc", "tests", "configs", "benchmarks", "results"]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(args):
  result = subprocess.run(
    [sys.executable, "-m", "ruff", *args, *FOLDERS],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout + result.stderr
