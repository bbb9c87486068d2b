"""The docs' Python blocks run in order, file by file, and print what the docs show after them."""

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n```\n(.*?)```\n)?", re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_and_print_what_the_doc_shows(doc):
  blocks = BLOCK.findall(doc.read_text())
  namespace: dict = {}
  for index, (code, expected) in enumerate(blocks):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(code, f"{doc.name} block {index}", "exec"), namespace)
    if expected:
      got = [line.rstrip() for line in out.getvalue().strip().splitlines()]
      assert got == [line.rstrip() for line in expected.strip().splitlines()], f"block {index}"


def test_the_docs_show_code_with_its_output():
  shown = {doc.name: BLOCK.findall(doc.read_text()) for doc in DOCS}
  assert len(shown["README.md"]) >= 4 and sum(bool(out) for _, out in shown["README.md"]) >= 2
  assert sum(bool(out) for _, out in shown["rules.md"]) >= 2
