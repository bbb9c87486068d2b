"""The default comparison: ``mnist1d_cnn`` unchanged (the MNIST-1D paper's CNN, SGD-momentum).

It trains 5 seeds with and without GC and takes a few minutes on 2 CPU cores.

  optax-gc-compare                      # the same as --config=default
  optax-gc-compare --config.optimizer=adam --config.seeds=3
"""

from optax_gc.experiments.config import load


def get_config():
  return load("mnist1d_cnn")
