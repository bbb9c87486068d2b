"""mypy: the package type-checks (it ships py.typed; configuration in pyproject.toml)."""

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.long  # mypy

ROOT = pathlib.Path(__file__).parents[1]


def test_mypy_is_clean_on_the_package(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stdout + result.stderr
