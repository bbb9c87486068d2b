"""The README's Python blocks run in order, and print what the README shows after them."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```\n(?:\n```\n(.*?)```\n)?", README.read_text(), re.S)


def test_readme_blocks_run_and_print_what_they_show():
  assert len(BLOCKS) >= 5
  namespace = {}
  for index, (code, expected) in enumerate(BLOCKS):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, f"README block {index}", "exec"), namespace)
    if expected:
      got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
      assert got == [line.rstrip() for line in expected.strip().splitlines()], f"block {index}"
