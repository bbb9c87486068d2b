"""MNIST-1D, a small batch-norm ResNet of 1-D convolutions, SGD-momentum: the paper's regime.

GC's reported gains were on batch-norm ResNets trained with SGD-momentum 0.9,
coupled weight decay 5e-4 and a step schedule (the learning rate x0.1 at half
and three quarters of training). This is that recipe at MNIST-1D's scale: a
stem and three residual stages of 16, 32 and 64 channels.

  optax-gc-compare --config=mnist1d_resnet
  optax-gc-compare --config=mnist1d_resnet --sweep=sgd.learning_rate=0.03,0.1,0.3,1,3
"""

from optax_gc.experiments.config import base_config


def get_config():
  config = base_config()
  config.name = "mnist1d_resnet"
  config.dataset = "mnist1d"
  config.model.kind = "resnet1d"
  config.model.channels = (16, 32, 64)
  config.optimizer = "sgd"
  config.schedule = "step"
  config.num_steps = 3000
  config.sgd.learning_rate = 0.1
  return config
