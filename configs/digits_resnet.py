"""scikit-learn's 8x8 digits, a small batch-norm ResNet, SGD-momentum: the paper's regime.

The recipe of GC's ImageNet and CIFAR results (batch norm, SGD-momentum 0.9,
coupled weight decay 5e-4, a step schedule) at the scale of 8x8 digits: a stem
and two residual stages of 16 and 32 channels.

  optax-gc-compare --config=digits_resnet
"""

from optax_gc.experiments.config import base_config


def get_config():
  config = base_config()
  config.name = "digits_resnet"
  config.dataset = "digits"
  config.data = {"test_fraction": 0.2, "seed": 0}
  config.model.kind = "resnet2d"
  config.model.channels = (16, 32)
  config.optimizer = "sgd"
  config.schedule = "step"
  config.batch_size = 64
  config.num_steps = 1500
  config.eval_every = 100
  config.sgd.learning_rate = 0.1
  return config
