"""MNIST-1D, the MNIST-1D paper's MLP (two hidden layers of 100 ReLU units), Adam.

The paper reports about 68% test accuracy for it.

  optax-gc-compare --config=configs/mnist1d_mlp.py --config.optimizer=sgd
"""

from optax_gc.experiments.config import base_config


def get_config():
  config = base_config()
  config.name = "mnist1d_mlp"
  config.dataset = "mnist1d"
  config.model.kind = "mlp"
  config.model.hidden = (100, 100)
  return config
