"""From a tree to one decision per leaf: the adapter ``centralize``, ``explain`` and strict use.

Leaves may be arrays, ``jax.ShapeDtypeStruct``, Python scalars, PRNG keys, or
arrays in Flax's boxes (linen ``Partitioned``, nnx ``Variable``). The logical
axis names of a linen box can show a stack axis to the presets; an nnx
Variable's are not read, because ``nnx.Optimizer`` hands ``update`` plain
arrays: a decision must not depend on which of the two the transform is given.
"""

import dataclasses
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gc._src import rules as rules_lib
from optax_gc._src.paths import path_string
from optax_gc._src.presets import NO_HINT, Hint

# Logical axis names that name a stack of layers (MaxText's, Flax's examples').
STACK_NAMES = ("layers",)
# The leaves a preset may centre, and the sibling that holds their output axes.
_BIAS_OF = {"kernel": "bias", "w": "b", "weight": "bias"}


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One leaf as the rules see it: its path, shape and dtype, and its box's axis names."""

  path: str
  shape: tuple[int, ...]
  dtype: Any  # a NumPy dtype, or an extended one (PRNG keys)
  names: tuple | None = None


def box_types() -> tuple[type, ...]:
  """Flax's boxes, if Flax is loaded (no tree can hold one otherwise; nothing is imported)."""
  types = []
  if (meta := sys.modules.get("flax.core.meta")) is not None:
    types.append(meta.AxisMetadata)
  if (nnx := sys.modules.get("flax.nnx")) is not None:
    types.append(nnx.Variable)
  return tuple(types)


def logical_names(box, ndim: int) -> tuple | None:
  """A linen box's axis names if it has one name (or None) per dimension, else None.

  A sharding spec shorter than the rank, or naming several mesh axes for one
  dimension, names mesh axes, not the layer's axes.
  """
  meta = sys.modules.get("flax.core.meta")
  if meta is None or not isinstance(box, meta.AxisMetadata):
    return None
  names = tuple(getattr(box, "names", None) or ())
  if len(names) != ndim or not all(n is None or isinstance(n, str) for n in names):
    return None
  return names


def stack_axes(names: tuple | None) -> tuple[int, ...]:
  """The axes whose logical name names a stack of layers."""
  return tuple(i for i, n in enumerate(names or ()) if n in STACK_NAMES)


def _dtype(x):
  dtype = getattr(x, "dtype", None)
  if dtype is not None:
    return dtype
  try:
    return jnp.result_type(x)
  except TypeError:
    return np.dtype(object)


def flatten(tree):
  """``(leaves, values, treedef)``: a box is one leaf here, read with its axis names."""
  boxes = box_types()

  def is_box(x):
    return isinstance(x, boxes) and len(jax.tree.leaves(x)) == 1

  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box if boxes else None)
  leaves = []
  for keypath, x in flat:
    value, names = x, None
    if boxes and isinstance(x, boxes):  # a leaf here only where is_box said so
      (value,) = jax.tree.leaves(x)
      names = logical_names(x, np.ndim(value))
    leaves.append(Leaf(path_string(keypath), tuple(np.shape(value)), _dtype(value), names))
  return leaves, [x for _, x in flat], treedef


def _hints(leaves: list[Leaf]) -> list[Hint]:
  """What the tree shows around each kernel: named stack axes and its sibling bias."""
  by_path = {leaf.path: leaf for leaf in leaves}
  hints = []
  for leaf in leaves:
    head, _, name = leaf.path.rpartition("/")
    if name not in _BIAS_OF:
      hints.append(NO_HINT)
      continue
    bias = by_path.get(f"{head}/{_BIAS_OF[name]}" if head else _BIAS_OF[name])
    bias_shape = None
    if bias is not None:
      drop = stack_axes(bias.names)
      bias_shape = tuple(n for i, n in enumerate(bias.shape) if i not in drop)
    stack = stack_axes(leaf.names)
    hints.append(Hint(stack, bias_shape) if stack or bias_shape is not None else NO_HINT)
  return hints


def decide_leaves(leaves: list[Leaf], rules) -> list[rules_lib.Decision]:
  """Each leaf's decision, the one way: ``rules.decide`` with what the tree shows around it."""
  return [
    rules_lib.decide(leaf.path, leaf.shape, leaf.dtype, rules, hint)
    for leaf, hint in zip(leaves, _hints(leaves), strict=True)
  ]


def map_fan_in(fn, tree, rules):
  """Applies ``fn(leaf, axes)`` to every leaf the rules give fan-in axes; others pass through.

  A boxed leaf stays in its box.
  """
  leaves, values, treedef = flatten(tree)
  decisions = decide_leaves(leaves, rules)
  out = [
    x if d.axes is None else jax.tree.map(lambda v, a=d.axes: fn(v, a), x)
    for x, d in zip(values, decisions, strict=True)
  ]
  return jax.tree_util.tree_unflatten(treedef, out)
