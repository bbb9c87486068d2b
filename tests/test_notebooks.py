"""Every notebook in notebooks/ runs end to end (small settings: OPTAX_GC_SMOKE=1)."""

from pathlib import Path

import nbformat
import pytest
from helpers import FAST_COMPILE_FLAG
from nbclient import NotebookClient

pytestmark = pytest.mark.long  # a Jupyter kernel per notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "sharded_training.ipynb", "transformer_rules.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  monkeypatch.setenv("OPTAX_GC_SMOKE", "1")
  # The kernel gets a user's device count, not conftest.py's 8 devices (the notebooks
  # that need more add to XLA_FLAGS themselves, before importing jax), and compiles fast.
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_FLAG)
  nb = nbformat.read(path, as_version=4)
  # Saved without outputs, so the repository holds no stale results.
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
  assert any("google.colab" in c.source for c in nb.cells), "needs a Colab install cell"
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors
  # The last code cell produced output (a table or a figure): the notebook ran to the end.
  assert [c for c in nb.cells if c.cell_type == "code"][-1].outputs
