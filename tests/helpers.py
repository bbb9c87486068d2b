"""Independent references for the tests: NumPy, float64, written without optax_gc."""

import re

import jax
import numpy as np

COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter", "all-reduce")


def np_centre(g, axes, strength=1.0):
  """GC of one array in float64: g - strength * mean over ``axes``."""
  x = np.asarray(g, dtype=np.float64)
  if axes is None:
    return x
  return x - strength * x.mean(axis=tuple(axes), keepdims=True)


def flat(tree):
  """{path string: leaf} built with jax.tree_util, for comparing trees by name."""
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
    if names and names[-1] == "value":
      names = names[:-1]
    out["/".join(names)] = leaf
  return out


def fan_in_sums(g, axes):
  """Sum over the fan-in, in float64: zero for every output unit after GC."""
  return np.asarray(g, dtype=np.float64).sum(axis=tuple(axes))


def nest(flat_tree):
  """The nested dict of ``{"a/b": leaf}``: the inverse of :func:`flat` for dicts."""
  out = {}
  for path, value in flat_tree.items():
    node = out
    *parents, last = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = value
  return out


def collectives(hlo: str) -> list[str]:
  """The collective operations in compiled HLO text (async ``-start`` forms included)."""
  return sorted(op for op in COLLECTIVES if re.search(rf"\b{op}(-start)?\(", hlo))
