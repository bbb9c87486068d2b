"""The experiment runner: Flax models trained with and without GC on offline data.

Run it as ``optax-gc-compare --config=default`` or ``python -m optax_gc.experiments``;
see :mod:`optax_gc.experiments.cli` for the flags and ``configs/`` for the
experiments. Needs the ``experiments`` extra (flax, ml_collections, absl,
mnist1d, scikit-learn, matplotlib, tqdm).
"""

import importlib.util
import sys

PROG = "optax-gc-compare"
# The modules the ``experiments`` extra of pyproject.toml installs, by import name.
EXTRA_MODULES = ("absl", "flax", "matplotlib", "ml_collections", "mnist1d", "sklearn", "tqdm")


def main(argv: list[str] | None = None) -> int:
  """``optax-gc-compare``: :func:`optax_gc.experiments.cli.main`, once its modules are there.

  Without the ``experiments`` extra it prints one line naming what is missing
  and the install command, and returns 2.
  """
  missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
  if missing:
    print(
      f"{PROG}: error: the runner needs the experiments extra (missing: {', '.join(missing)}); "
      'install it with: pip install "optax_gc[experiments]"',
      file=sys.stderr,
    )
    return 2
  from optax_gc.experiments import cli

  return cli.main(argv)


__all__ = ["main"]
