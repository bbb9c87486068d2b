"""Gradient Centralization as an optax transform: the per-leaf arithmetic."""

import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from optax_gc._src import rules as rules_lib
from optax_gc._src import tree as tree_lib
from optax_gc._src.fan_in import fan_in_sum
from optax_gc._src.plan import make_plan


def _saturate(x: jax.Array, *, big: float) -> jax.Array:
  return jax.lax.clamp(jnp.asarray(-big, x.dtype), x, jnp.asarray(big, x.dtype))


# ``x`` clamped to ``[-big, big]``, as a primitive that differentiation and
# ``jax.linear_transpose`` treat as the identity it is on every representable
# result: GC stays a linear map (its own transpose) with the overflow guard in.
_saturate_p = Primitive("optax_gc_saturate")
_saturate_p.def_impl(_saturate)
_saturate_p.def_abstract_eval(lambda x, *, big: x)
mlir.register_lowering(_saturate_p, mlir.lower_fun(_saturate, multiple_results=False))
batching.defvectorized(_saturate_p)
ad.deflinear(_saturate_p, lambda ct, *, big: [_saturate_p.bind(ct, big=big)])


def centre(g: jax.Array, axes: tuple[int, ...], strength=1.0) -> jax.Array:
  """Returns ``g - strength * mean(g, axes)``, computed in float32 or wider.

  The mean is ``sum(g * 2**-k) * (2**k / n)`` with ``2**k >= n``: scaling by a
  power of two is exact, and the scaled sum cannot overflow, so a finite float32
  input near 1e37 keeps a finite, accurate mean (``jnp.mean`` overflows there).
  Values below about ``2**(k - 126)`` become subnormal after the scaling, which
  XLA:CPU flushes to zero: a leaf made only of such tiny gradients gets a less
  accurate mean. The difference is clamped to the leaf dtype's finite range,
  where the exact result (up to twice the largest input) is not representable;
  the clamp is a primitive that ``jax.linear_transpose`` and differentiation
  see as the identity, so the map stays linear and symmetric. The sum
  (:func:`fan_in_sum`) reduces over ``axes`` and is broadcast back, never
  reshaped, so a sharded leaf only adds an all-reduce. A static ``strength`` of
  1.0 adds no multiply; any other scales the small mean.

  Example:
    >>> import jax.numpy as jnp
    >>> print(centre(jnp.array([[1.0, 4.0], [3.0, 0.0]]), (0,)))
    [[-1.  2.]
     [ 1. -2.]]
  """
  g = jnp.asarray(g)  # a NumPy float64 leaf is float32 to jax when x64 is off
  compute = jnp.promote_types(g.dtype, jnp.float32)
  x = g if g.dtype == compute else g.astype(compute)
  n = math.prod(g.shape[a] for a in axes)
  k = math.ceil(math.log2(n))
  mean = fan_in_sum(g, axes, 2.0**-k) * (2.0**k / n)
  if not (isinstance(strength, numbers.Real) and strength == 1.0):
    mean = mean * jnp.asarray(strength, compute)
  kept = tuple(d for d in range(g.ndim) if d not in axes)
  big = float(jnp.finfo(g.dtype).max)
  out = _saturate_p.bind(x - jax.lax.broadcast_in_dim(mean, g.shape, kept), big=big)
  return out if out.dtype == g.dtype else out.astype(g.dtype)


On = Literal["gradient", "update"]


def _check_args(strength, strict, on: On = "gradient") -> None:
  """The arguments ``centralize`` and ``with_centralization`` take beside the rules.

  A ``strength`` array is checked like a float where its value is known (not
  traced): ``inject_hyperparams`` hands the transform traced values inside a step.
  """
  is_float = isinstance(strength, numbers.Real) and not isinstance(strength, bool)
  is_array = (
    isinstance(strength, jax.Array | np.ndarray)
    and np.ndim(strength) == 0
    and jnp.issubdtype(strength.dtype, jnp.floating)
  )
  if not (is_float or is_array):
    raise TypeError(
      f"strength={strength!r}: give a float in [0, 1] (1.0 is the paper's GC, 0.0 the "
      "identity) or a scalar float array; to schedule it, use "
      "optax.inject_hyperparams(optax_gc.centralize)(strength=schedule)."
    )
  if not isinstance(strength, jax.core.Tracer) and not 0.0 <= float(strength) <= 1.0:
    raise ValueError(
      f"strength={strength!r} is outside [0, 1] (or not a number); 1.0 is the paper's GC "
      "and 0.0 the identity. To ramp GC in, schedule it: "
      "optax.inject_hyperparams(optax_gc.centralize)(strength=schedule)."
    )
  if not isinstance(strict, bool):
    raise TypeError(f"strict={strict!r}: give True or False.")
  if on not in ("gradient", "update"):
    raise ValueError(
      f'on={on!r}; use "gradient" (the paper\'s GC) or "update" (GC2: centre the final update).'
    )


def _check_tree(params, rules, strict: bool) -> None:
  """The checks ``init`` runs: a flattened tree, and strict mode."""
  leaves = jax.tree_util.tree_leaves(params)
  if len(leaves) == 1 and leaves[0] is params and np.ndim(params) == 1:
    raise ValueError(
      f"centralize() was given a single 1-D array of shape {np.shape(params)} as the whole "
      "tree. GC centres each neuron's fan-in, which a flat vector has lost, so it would do "
      "nothing. If it comes from optax.flatten(...), put GC outside it: "
      "optax.chain(optax_gc.centralize(), optax.flatten(optax.adam(1e-3)))."
    )
  if not strict:
    return
  plan = make_plan(params, rules)
  problems = (
    [f"  leaf {r.path!r} {r.shape} {r.dtype}: no rule decided it" for r in plan.unmatched]
    + [f"  leaf {r.path!r} {r.shape} {r.dtype}: guessed ({r.decided_by})" for r in plan.guesses]
    + [f"  leaf {r.path!r} {r.shape} {r.dtype}: undecided ({r.decided_by})" for r in plan.undecided]
    + [f"  {r.name}: matched no leaf" for r in plan.unused_rules]
  )
  if problems:
    raise ValueError(
      "centralize(strict=True) found:\n"
      + "\n".join(problems)
      + "\nDerive the rules from the model with optax_gc.rules_for(model, ...), or give each "
      "listed leaf a rule (axes None leaves it unchanged); fix or remove each unused rule "
      "(a rule shadowed by an earlier one also counts as unused). "
      "optax_gc.explain(params, rules, preset=...) shows every leaf's path and decision."
    )


def centralize(
  rules: rules_lib.RulesLike = (),
  *,
  preset: rules_lib.Preset | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
) -> optax.GradientTransformation:
  """Gradient Centralization: removes from each neuron's gradient its fan-in mean.

  For every leaf, the axes to average over (the neuron's fan-in) are chosen by
  ``rules``, then by the ``preset``; the first rule that matches the leaf's
  path wins. Each chosen leaf becomes ``g - strength * mean(g, axes)``. The
  rules to give are those :func:`optax_gc.rules_for` derives from the model:
  every parameter's fan-in as its layer defines it, stack axes kept. Without
  them, the ``"flax"`` preset centres only ``kernel`` and ``w`` leaves, as
  ``(..., in, out)``, with attention q/k/v ``(in, heads, head_dim)`` and output
  ``(heads, head_dim, out)`` kernels; a sibling bias or logical axis names
  show a stack; where nothing does, it guesses, and ``explain`` marks the guess.
  Use :func:`optax_gc.explain` to see the plan for a tree before training.

  ``optax.centralize`` averages over every axis but the first (PyTorch's
  layout), which on a Flax kernel is not GC; ``preset="torch"`` does that, with
  embeddings, biases and norms left alone.

  Put GC before the optimizer, never inside ``optax.flatten``: that hands the
  transform one flat vector in which the neurons are lost (``init`` raises a
  ``ValueError`` when it sees one).

  Args:
    rules: ordered ``(pattern, axes)`` pairs (or a dict) and the rules of
      :func:`optax_gc.rules_for`, tried before the preset's. ``pattern`` is a
      regular expression searched in the leaf's path (``params/Conv_0/kernel``,
      ``layers/0/linear/kernel``; a trailing ``value`` is dropped). ``axes``:
      a tuple of ints (negative ones count from the end), ``"all_but_last"``,
      ``"all_but_first"``, or None to leave the leaf unchanged.
    preset: ``"flax"`` (also Haiku), ``"torch"`` (also Equinox), or None for
      only your rules (unmatched leaves are unchanged).
    strength: the fraction of the mean removed; 1.0 is the paper's GC, 0.0 the
      identity. May be traced, so ``optax.inject_hyperparams`` can schedule it.
    strict: if True, ``init`` raises ``ValueError`` listing every floating leaf
      with 2 or more dimensions that no rule decided, every layout the preset
      guessed, and every user rule that decided no leaf.

  Returns:
    A stateless :class:`optax.GradientTransformation`.

  Raises:
    ValueError: at construction for an invalid pattern, axes or preset; when
      updating a leaf that lacks an axis its rule names (the message gives the
      path, the shape and the rule).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_gc
    >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    >>> tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> grads = {"Dense_0": {"kernel": jnp.array([[1., 2.], [2., 4.], [3., 0.]]),
    ...                      "bias": jnp.array([1., 1.])}}
    >>> gc, _ = optax_gc.centralize().update(grads, optax.EmptyState())
    >>> print(gc["Dense_0"]["kernel"])  # each output unit's column sums to zero
    [[-1.  0.]
     [ 0.  2.]
     [ 1. -2.]]
    >>> print(gc["Dense_0"]["bias"])
    [1. 1.]

  References:
    Yong et al, `Gradient Centralization: A New Optimization Technique for Deep
    Neural Networks <https://arxiv.org/abs/2004.01461>`_, 2020.
  """
  compiled = rules_lib.compile_rules(rules, preset)
  _check_args(strength, strict)

  def init_fn(params):
    _check_tree(params, compiled, strict)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    centred = tree_lib.map_fan_in(lambda g, axes: centre(g, axes, strength), updates, compiled)
    return centred, state

  return optax.GradientTransformation(init_fn, update_fn)


def with_centralization(
  tx: optax.GradientTransformation,
  rules: rules_lib.RulesLike = (),
  *,
  preset: rules_lib.Preset | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
  on: On = "gradient",
) -> optax.GradientTransformationExtraArgs:
  """Centralizes the gradients, then applies ``tx``, keeping ``tx``'s own state.

  ``optax.chain(centralize(), tx)`` has state ``(EmptyState(), tx_state)``;
  this wrapper's state is exactly ``tx_state``, so a checkpoint of the
  optimizer state restores whether GC is switched on or off, and GC can be
  switched on mid-training by restoring a plain ``tx`` checkpoint.

  With ``on="update"`` (the reference's "GC2") ``tx`` runs first and its final
  update is centred instead: every neuron's fan-in mean of the weights then
  stays exactly at its initial value, whatever ``tx`` is.

  Args:
    tx: the optimizer to wrap.
    rules, preset, strength, strict: as in :func:`optax_gc.centralize`.
    on: ``"gradient"`` (GC, the default) or ``"update"`` (GC2).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is ``tx``'s.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_gc
    >>> params = {"kernel": jnp.ones((3, 2))}
    >>> tx = optax_gc.with_centralization(optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> jax.tree.structure(state) == jax.tree.structure(optax.adam(1e-3).init(params))
    True
  """
  _check_args(strength, strict, on)
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(
      f"tx is a {type(tx).__name__}; give the optax optimizer to wrap, e.g. "
      "optax_gc.with_centralization(optax.adamw(1e-3))."
    )
  gc = centralize(rules, preset=preset, strength=strength, strict=strict)
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    gc.init(params)
    return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if on == "gradient":
      updates, _ = gc.update(updates, optax.EmptyState())
    updates, state = tx.update(updates, state, params, **extra_args)
    if on == "update":
      updates, _ = gc.update(updates, optax.EmptyState())
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
