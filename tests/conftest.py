"""Eight simulated CPU devices for every test, so the sharding tests run in-process.

XLA:CPU fixes its device count when jax initialises its backends, from
``XLA_FLAGS``, and jax reads ``JAX_PLATFORMS`` when it is imported: both are
set here, before any test module imports jax. pytest imports this file before
the test modules (also in each pytest-xdist worker, a process of its own).
Tests that start processes of their own (test_multihost.py, the notebooks) set
their own device counts.

Every test checks what a program computes, not how fast it runs, so XLA:CPU
compiles without LLVM's optimisations (about half the compile time), and the
run shares one compilation cache across its processes.
"""

import os
import shutil
import tempfile

from helpers import FAST_COMPILE_FLAG, with_host_device_count  # imports no jax

DEVICES = 8

os.environ["XLA_FLAGS"] = with_host_device_count(os.environ.get("XLA_FLAGS", ""), DEVICES)
os.environ["XLA_FLAGS"] += " " + FAST_COMPILE_FLAG
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole run: the same small programs are compiled
# in both pytest-xdist workers and in the processes tests start, which inherit
# this environment. jax writes its entries without a lock; one read half written
# is compiled again (pyproject.toml's filterwarnings lets its warning pass). The
# process that makes the folder (pytest's main one) removes it when the run ends.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="optax_gc-jax-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# jax_numpy_rank_promotion stays "allow": the experiments' Transformer
# (optax_gc/experiments/models.py, `patch_proj(x) + pos_embedding`) and models in
# tests/zoo.py broadcast by rank promotion, so "raise" would fail their tests.


def pytest_collection_modifyitems(items):
  """The tests marked ``long`` first (in their order), then the rest: with ``-n 2``
  the two workers start on the long ones and end on short ones, together."""
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_sessionfinish(session):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
