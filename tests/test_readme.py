"""The README's Python blocks run in order, and print what the README shows after them."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```\n(?:\n```\n(.*?)```\n)?", README.read_text(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 5


@pytest.fixture(scope="module")
def namespace():
  return {}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block(index, namespace):
  code, expected = BLOCKS[index]
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, f"README block {index}", "exec"), namespace)
  if expected:
    got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
    assert got == [line.rstrip() for line in expected.strip().splitlines()]
