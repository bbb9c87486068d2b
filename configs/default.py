"""The default comparison: the MNIST-1D paper's CNN with Adam, with and without GC, 5 seeds.

It is ``mnist1d_cnn`` unchanged; it takes a few minutes on 2 CPU cores.

  optax-gc-compare                      # the same as --config=default
  optax-gc-compare --config.optimizer=sgd --config.seeds=3
"""

from optax_gc.experiments.config import load


def get_config():
  return load("mnist1d_cnn")
