"""The experiment runner: Flax models trained with and without GC on offline data.

Run it as ``optax-gc-compare --config=default`` or ``python -m optax_gc.experiments``;
see :mod:`optax_gc.experiments.cli` for the flags and ``configs/`` for the
experiments. Needs the ``experiments`` extra (flax, ml_collections, mnist1d,
scikit-learn, matplotlib, tqdm).
"""

from optax_gc.experiments.cli import main

__all__ = ["main"]
