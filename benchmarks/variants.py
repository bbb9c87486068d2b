"""The optimizers the benchmark compares, keyed by short ids.

An id (``"centralize"``) selects a variant on the command line and names it
in the JSON; its label (``"optax_gc.centralize + adamw"``) is only for the
tables. Each variant has a base, the optimizer without GC it is timed
against, which runs whenever the variant does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

import optax_gc

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
# How a variant centres, for the bytes it must move: "none"; "optax": every
# leaf of 2 or more dimensions (optax.centralize); "plan": the leaves
# optax_gc.explain gives axes to.
Centres = Literal["none", "optax", "plan"]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer: its id, display label, base id, and how to build it from GC rules."""

  id: str
  label: str
  base: str
  centres: Centres
  make: Callable[[Any], optax.GradientTransformation]


def plain_centralize(
  rules: Any = (), *, preset: str | None = "flax"
) -> optax.GradientTransformation:
  """GC as it is usually written, ``g - jnp.mean(g, axes, keepdims=True)``: a cost reference.

  Each leaf's axes are those ``optax_gc.explain(updates, rules)`` shows, so it
  centres exactly what ``optax_gc.centralize(rules)`` does, without its guards:
  float32 gradients near 1e37 make the mean overflow to inf, and ``jnp.mean``
  leaves the reduction's form to XLA. It shows what optax_gc's guarded
  arithmetic costs over the plain form; do not train with it.

  Example:
    >>> g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 0.0]]), "bias": jnp.array([1.0, 2.0])}
    >>> out, _ = plain_centralize().update(g, optax.EmptyState())
    >>> print(out["kernel"], out["bias"])
    [[-1.  1.]
     [ 1. -1.]] [1. 2.]
  """

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    rows = optax_gc.explain(updates, rules, preset=preset).rows
    if [r.shape for r in rows] != [tuple(g.shape) for g in leaves]:
      raise ValueError("optax_gc.explain's rows are not in jax.tree.leaves order for this tree.")
    out = [
      g if r.axes is None else g - jnp.mean(g, r.axes, keepdims=True)
      for g, r in zip(leaves, rows, strict=True)
    ]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adamw() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


VARIANTS: dict[str, Variant] = {
  v.id: v
  for v in (
    Variant("adamw", "adamw", "adamw", "none", lambda rules: _adamw()),
    Variant(
      "optax_centralize",
      "optax.centralize + adamw",
      "adamw",
      "optax",
      lambda rules: optax.chain(optax.centralize(), _adamw()),
    ),
    Variant(
      "centralize",
      "optax_gc.centralize + adamw",
      "adamw",
      "plan",
      lambda rules: optax.chain(optax_gc.centralize(rules), _adamw()),
    ),
    Variant(
      "plain",
      "plain jnp.mean GC + adamw (unguarded)",
      "adamw",
      "plan",
      lambda rules: optax.chain(plain_centralize(rules), _adamw()),
    ),
    Variant(
      "with_centralization",
      "with_centralization(adamw)",
      "adamw",
      "plan",
      lambda rules: optax_gc.with_centralization(_adamw(), rules),
    ),
    Variant(
      "adamw_gc",
      "adamw_gc",
      "adamw",
      "plan",
      lambda rules: optax_gc.adamw_gc(LEARNING_RATE, weight_decay=WEIGHT_DECAY, rules=rules),
    ),
    Variant("adam", "adam", "adam", "none", lambda rules: optax.adam(LEARNING_RATE)),
    Variant(
      "adam_gc",
      "adam_gc",
      "adam",
      "plan",
      lambda rules: optax_gc.adam_gc(LEARNING_RATE, rules=rules),
    ),
  )
}
# The compile part's fourth variant: optax_gc.centralize given the rules
# optax_gc.rules_for derives from the model, not the preset's.
RULES_FOR = Variant(
  "centralize_rules_for",
  "optax_gc.centralize(rules_for(model)) + adamw",
  "adamw",
  "plan",
  VARIANTS["centralize"].make,
)


def select(ids: Iterable[str]) -> dict[str, Variant]:
  """The variants ``ids`` names and their bases, by id, in ``VARIANTS``' order.

  Raises:
    ValueError: an id is not one of ``VARIANTS``; the message lists those that are.

  Example:
    >>> list(select(["centralize", "adam_gc"]))
    ['adamw', 'centralize', 'adam', 'adam_gc']
    >>> select(["centralise"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown variant 'centralise'; the variants are: adamw, optax_centralize, ...
  """
  wanted = set()
  for i in ids:
    if i not in VARIANTS:
      raise ValueError(f"Unknown variant {i!r}; the variants are: {', '.join(VARIANTS)}.")
    wanted |= {i, VARIANTS[i].base}
  return {i: v for i, v in VARIANTS.items() if i in wanted}


def step_bytes(shapes: Any, rules: Any, variant: Variant) -> int:
  """The bytes one update step of ``variant`` must move, at the least.

  adamw (and adam) read each leaf's gradient, parameter and two moments and
  write the parameter and the moments: 7 passes over the pytree. GC adds one
  read of each leaf it centres. Dividing by the step's time gives the
  bandwidth it achieves, comparable with a streaming copy's.

  Example:
    >>> from pytrees import sds
    >>> shapes = {"Dense_0": {"kernel": sds(4, 3), "bias": sds(3)}}  # 48 + 12 bytes
    >>> step_bytes(shapes, (), VARIANTS["adamw"]), step_bytes(shapes, (), VARIANTS["centralize"])
    (420, 468)
  """

  def size(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize

  leaves = jax.tree.leaves(shapes)
  if variant.centres == "none":
    centred = 0
  elif variant.centres == "optax":
    centred = sum(size(x) for x in leaves if len(x.shape) > 1)
  else:
    centred = sum(size(r) for r in optax_gc.explain(shapes, rules).rows if r.axes is not None)
  return 7 * sum(size(x) for x in leaves) + centred
