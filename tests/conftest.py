"""Eight simulated CPU devices for every test, so the sharding tests run in-process.

XLA:CPU fixes its device count when jax initialises its backends, from
``XLA_FLAGS``, and jax reads ``JAX_PLATFORMS`` when it is imported: both are
set here, before any test module imports jax. pytest imports this file before
the test modules (also in each pytest-xdist worker, a process of its own).
Tests that start processes of their own (test_multihost.py, the notebooks) set
their own device counts.
"""

import os

from helpers import with_host_device_count  # imports no jax

DEVICES = 8

os.environ["XLA_FLAGS"] = with_host_device_count(os.environ.get("XLA_FLAGS", ""), DEVICES)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# jax_numpy_rank_promotion stays "allow": the experiments' Transformer
# (optax_gc/experiments/models.py, `patch_proj(x) + pos_embedding`) and models in
# tests/zoo.py broadcast by rank promotion, so "raise" would fail their tests.
