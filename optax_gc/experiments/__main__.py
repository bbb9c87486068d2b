"""``python -m optax_gc.experiments``: the same as the ``optax-gc-compare`` script."""

import sys

from optax_gc.experiments import main

__all__ = ["main"]

if __name__ == "__main__":
  sys.exit(main())
