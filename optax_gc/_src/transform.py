"""Gradient Centralization as an optax transform: the per-leaf arithmetic."""

import math
import numbers
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gc._src import rules as rules_lib
from optax_gc._src import tree as tree_lib
from optax_gc._src.plan import make_plan

# Leaves at least this large (in elements) sum their fan-in with a dot; smaller
# ones, which stay in cache, keep the reduction (it traces and compiles faster).
DOT_MIN_SIZE = 2**16
# Rows of the dot's constant operand, all equal: XLA:CPU hands a dot with 2 or
# more rows to YNNPACK, which ran GC+adamw on the ResNet-50 pytree at 1.10x adamw
# against 1.21x for its own 1-row matrix-vector product. The extra row costs
# arithmetic, not memory traffic. Batched float32 dots (a scan's layer axis) keep
# 1 row: there YNNPACK was slower (a (12, 768, 3072) leaf: 6.8 ms against 3.8 ms).
# Batched bfloat16 dots keep 2: with 1, XLA:CPU converts the leaf to float32 first.
ROWS = 2


def _dot_applies(g: jax.Array, axes: tuple[int, ...]) -> bool:
  """Whether ``_fan_in_dot`` takes this leaf's fan-in sum on XLA:CPU.

  float32, float64 and bfloat16 leaves of ``DOT_MIN_SIZE`` elements or more
  whose fan-in axes are contiguous (every preset layout). float16 keeps the
  reduction: its ``2**-k`` is subnormal, which XLA:CPU flushes to zero, for
  fan-ins over 2**14. A leaf sharded on an ``AxisType.Explicit`` mesh keeps the
  reduction, whose sharding rule needs no gather (a dot with a replicated
  constant would add one).
  """
  return (
    g.dtype in (jnp.float32, jnp.float64, jnp.bfloat16)
    and axes == tuple(range(axes[0], axes[-1] + 1))
    and g.size >= DOT_MIN_SIZE
    and not any(s is not None for s in getattr(jax.typeof(g).sharding, "spec", ()))
  )


def _fan_in_dot(g: jax.Array, axes: tuple[int, ...], scale: float) -> jax.Array:
  """``sum(g * scale, axes)`` as one dot with a constant: XLA:CPU's fast form.

  A dot of the leaf with a constant of ``scale`` reads the leaf once and writes
  nothing of its size. ``jnp.sum(g * scale, axes)`` does not on XLA:CPU (jax
  0.10): it becomes a YNNPACK fusion that writes a full-size temporary (64 MiB
  for the ResNet-50 update, against 0.8 MiB with the dot), an extra pass over
  memory that made GC+adamw twice as slow as adamw (for bfloat16 leaves it
  writes a float32 copy, twice the leaf's bytes). Kept axes before the fan-in
  become batch axes, so no operand is transposed. ``scale`` (a power of two) is
  exact in the constant, the products are exact, and the accumulation is in
  float32 or the leaf's wider dtype at ``Precision.HIGHEST``; the result has the
  kept axes in order. For the leaves ``_dot_applies`` accepts.
  """
  lead, fan = axes[0], tuple(g.shape[a] for a in axes)
  dot = partial(
    jax.lax.dot_general,
    precision=jax.lax.Precision.HIGHEST,
    preferred_element_type=jnp.promote_types(g.dtype, jnp.float32),
  )
  if axes[-1] == g.ndim - 1:  # (kept..., fan-in...): a matrix times vectors
    weights = jnp.full(fan + (ROWS,), scale, g.dtype)
    dims = ((axes, tuple(range(len(axes)))), ((), ()))
    return dot(g, weights, dims)[..., 0]
  # (batch..., fan-in..., out...): (batched) vectors times a matrix.
  rows = ROWS if lead == 0 or g.dtype == jnp.bfloat16 else 1
  weights = jnp.full(g.shape[:lead] + (rows,) + fan, scale, g.dtype)
  batch = tuple(range(lead))
  dims = ((tuple(range(lead + 1, lead + 1 + len(axes))), axes), (batch, batch))
  total = dot(weights, g, dims)
  return jax.lax.index_in_dim(total, 0, axis=lead, keepdims=False)


def centre(g: jax.Array, axes: tuple[int, ...], strength=1.0) -> jax.Array:
  """Returns ``g - strength * mean(g, axes)``, computed in float32 or wider.

  The mean is ``sum(g * 2**-k) * (2**k / n)`` with ``2**k >= n``: scaling by a
  power of two is exact, and the scaled sum cannot overflow, so a finite float32
  input near 1e37 keeps a finite, accurate mean (``jnp.mean`` overflows there).
  The price is at the other end: float32 values below about ``2**(k - 126)``
  (1e-34 for a fan-in of 4,608) become subnormal after the scaling, which
  XLA:CPU flushes to zero, so a leaf made only of such tiny gradients gets a
  less accurate mean (relative error 4e-5 at 1e-33, against 2e-6 unscaled).
  Taking the unscaled sum too (a second row of the dot) and using it where
  finite fixes that, but made GC+adamw 4-8% slower (BENCHMARKS.md).
  The difference is clamped to the leaf dtype's finite range, where the exact
  result (up to twice the largest input) is not representable. The sum reduces
  over ``axes`` and is broadcast back, never reshaped, so a sharded leaf only
  adds an all-reduce. On XLA:CPU, for float32 and bfloat16 leaves of 2**16
  elements or more with contiguous fan-in axes (every preset layout), the sum
  is a dot with a constant of ``2**-k``, which reads the leaf once (see
  ``_fan_in_dot``); other backends keep the reduction, which their XLA fuses.
  A static ``strength`` of 1.0 adds no multiply; any other scales the small mean.

  Example:
    >>> import jax.numpy as jnp
    >>> print(centre(jnp.array([[1.0, 4.0], [3.0, 0.0]]), (0,)))
    [[-1.  2.]
     [ 1. -2.]]
  """
  compute = jnp.promote_types(g.dtype, jnp.float32)
  x = g if g.dtype == compute else g.astype(compute)
  n = math.prod(g.shape[a] for a in axes)
  k = math.ceil(math.log2(n))
  scale = 2.0**-k

  def reduction(g, x):  # GPUs and TPUs fuse it into one read of the leaf
    return jnp.sum(x * scale, axis=axes)

  def dot(g, x):  # XLA:CPU's fast form (see _fan_in_dot)
    return _fan_in_dot(g, axes, scale)

  if _dot_applies(g, axes):
    total = jax.lax.platform_dependent(g, x, cpu=dot, default=reduction)
  else:
    total = reduction(g, x)
  mean = total * (2.0**k / n)
  if not (isinstance(strength, numbers.Real) and strength == 1.0):
    mean = mean * jnp.asarray(strength, compute)
  kept = tuple(d for d in range(g.ndim) if d not in axes)
  big = np.asarray(jnp.finfo(g.dtype).max, compute)
  out = jax.lax.clamp(-big, x - jax.lax.broadcast_in_dim(mean, g.shape, kept), big)
  return out if out.dtype == g.dtype else out.astype(g.dtype)


def _check_strength(strength) -> None:
  if isinstance(strength, numbers.Real) and not 0.0 <= float(strength) <= 1.0:
    raise ValueError(
      f"strength={strength!r} is outside [0, 1]; 1.0 is the paper's GC and 0.0 the "
      "identity. To ramp GC in, schedule it: "
      "optax.inject_hyperparams(optax_gc.centralize)(strength=schedule)."
    )


def _check_tree(params, rules, strict: bool, remembered: dict) -> None:
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
  plan = make_plan(params, rules, remembered)
  problems = (
    [f"  leaf {r.path!r} {r.shape} {r.dtype}: no rule decided it" for r in plan.unmatched]
    + [f"  leaf {r.path!r} {r.shape} {r.dtype}: guessed ({r.decided_by})" for r in plan.guesses]
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
  preset: str | None = "flax",
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
  _check_strength(strength)
  if not isinstance(strict, bool):
    raise ValueError(f"strict must be True or False, got {strict!r}.")

  # Logical axis names seen at init, by path: nnx.Optimizer calls init on
  # Variables, which carry them, and update on plain arrays, which do not.
  remembered = {}

  def init_fn(params):
    remembered.update(tree_lib.names_seen(tree_lib.flatten(params)[0]))
    _check_tree(params, compiled, strict, remembered)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    centred = tree_lib.map_fan_in(
      lambda g, axes: centre(g, axes, strength), updates, compiled, remembered
    )
    return centred, state

  return optax.GradientTransformation(init_fn, update_fn)


def with_centralization(
  tx: optax.GradientTransformation,
  rules: rules_lib.RulesLike = (),
  *,
  preset: str | None = "flax",
  strength: float | jax.Array = 1.0,
  strict: bool = False,
  on: Literal["gradient", "update"] = "gradient",
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
  gc = centralize(rules, preset=preset, strength=strength, strict=strict)
  tx = optax.with_extra_args_support(tx)
  if on not in ("gradient", "update"):
    raise ValueError(
      f'on={on!r}; use "gradient" (the paper\'s GC) or "update" (GC2: centre the final update).'
    )

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
