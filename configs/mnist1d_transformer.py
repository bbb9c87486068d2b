"""MNIST-1D as a sequence of 10 patches, a 2-layer Transformer with scanned blocks, Adam.

The blocks are stacked by ``nnx.vmap`` (a leading layer axis on every block
parameter); ``optax_gc.rules_for`` reads each kernel's fan-in from the model and
keeps that axis. ``gc_plan.txt`` in the run folder shows the decision for every
parameter. 3000 steps (half the CNN's) keep a 5-seed comparison within about 10
minutes on 2 CPU cores.

  optax-gc-compare --config=configs/mnist1d_transformer.py --config.optimizer=sgd
"""

from optax_gc.experiments.config import base_config


def get_config():
  config = base_config()
  config.name = "mnist1d_transformer"
  config.dataset = "mnist1d"
  config.model.kind = "transformer"
  config.model.patch_size = 4
  config.model.d_model = 32
  config.model.num_heads = 4
  config.model.num_layers = 2
  config.model.mlp_dim = 64
  config.num_steps = 3000
  config.adam.learning_rate = 1e-3
  config.sgd.learning_rate = 0.05
  return config
