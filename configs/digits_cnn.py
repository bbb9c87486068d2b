"""scikit-learn's 8x8 digits (1437 train / 360 test images), a two-layer CNN, Adam.

optax-gc-compare --config=configs/digits_cnn.py --config.optimizer=sgd
"""

from optax_gc.experiments.config import base_config


def get_config():
  config = base_config()
  config.name = "digits_cnn"
  config.dataset = "digits"
  config.data = {"test_fraction": 0.2, "seed": 0}
  config.model.kind = "cnn2d"
  config.model.channels = (16, 32)
  config.batch_size = 64
  config.num_steps = 1500
  config.eval_every = 100
  config.adam.learning_rate = 1e-3
  config.sgd.learning_rate = 0.05
  return config
