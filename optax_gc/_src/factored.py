"""Adafactor's factored second moment, factored over the fan-in and fan-out the rules read.

Each leaf's layout comes from the rules through :func:`optax_gc._src.roles._export`,
as the exporters' values do.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gc._src import tree as tree_lib
from optax_gc._src.roles import _compile, _contraction, _export
from optax_gc._src.rules import Decision, RulesLike


class FactoredRmsState(NamedTuple):
  """State of :func:`optax_gc.scale_by_factored_rms`.

  A leaf factored over its fan-in and fan-out holds ``v_in``, its mean square
  over the fan-out axes (one value per fan-in and kept index), and ``v_out``,
  its mean square over the fan-in axes (one per fan-out and kept index), both
  with the leaf's rank; every other leaf holds its full second moment ``v``.
  Unused slots hold one-element arrays.
  """

  # Named as optax's states name their step, which shadows tuple.count.
  count: jax.Array  # type: ignore[assignment]
  v_in: optax.Updates
  v_out: optax.Updates
  v: optax.Updates


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one leaf is scaled: factored over (``fan_in``, ``fan_out``) or not, and its blocks.

  ``block`` holds the axes of one block for the RMS clipping: a layer's fan-in
  and fan-out, or every axis of a leaf without roles.
  """

  floating: bool
  factored: bool
  fan_in: tuple[int, ...] = ()
  fan_out: tuple[int, ...] = ()
  block: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Moments:
  """One leaf's results; not a pytree, so ``jax.tree.map`` carries it as one leaf."""

  update: Any
  v_in: Any
  v_out: Any
  v: Any


def _decay_rate_pow(step, exponent=0.8):
  """Adafactor's schedule of the second moment's decay: ``1 - (step + 1) ** -exponent``."""
  return 1.0 - jnp.asarray(step + 1, jnp.float32) ** (-exponent)


def _zeros_reduced(x, axes: tuple[int, ...]):
  """Zeros shaped (and sharded) as ``x``'s mean over ``axes`` with the axes kept."""
  return jnp.zeros_like(jax.eval_shape(lambda a: jnp.mean(a, axis=axes, keepdims=True), x))


def scale_by_factored_rms(
  rules: RulesLike,
  factored: bool = True,
  decay_rate: float = 0.8,
  step_offset: int = 0,
  min_dim_size_to_factor: int = 128,
  epsilon: float = 1e-30,
  decay_rate_fn: Callable[[Any, Any], Any] = _decay_rate_pow,
  *,
  clipping_threshold: float | None = None,
) -> optax.GradientTransformation:
  """Adafactor's factored second moment, factored over each leaf's fan-in and fan-out.

  ``optax.scale_by_factored_rms`` factors each leaf over its two largest axes:
  on a stacked attention kernel ``(d_model, layers, heads, head_dim)`` that is
  ``d_model`` against ``head_dim``, with the layers and the heads mixed into
  each statistic (and with its default ``min_dim_size_to_factor`` the kernel is
  not factored at all when ``head_dim`` is under 128). Here the roles the
  rules read decide: the mean square is kept over the fan-in axes and over the
  fan-out axes, for each entry of the kept axes, so each layer of a stack gets
  the update it would get alone, and the state is ``(fan_in + fan_out)`` floats
  per layer. A leaf without both a fan-in and a fan-out (a bias, a norm scale,
  a table) keeps its full second moment, as does a leaf whose fan-in or
  fan-out is smaller than ``min_dim_size_to_factor``.

  ``clipping_threshold`` clips the update's RMS per block, as
  ``optax.clip_by_block_rms`` does per leaf in ``optax.adafactor``, but each
  layer of a stack (each entry of the kept axes) is its own block.

  Args:
    rules: the rules of :func:`optax_gc.rules_for`.
    factored: whether to factor the second moment of contracted leaves.
    decay_rate: the second moment's decay, as in optax.
    step_offset: the step the decay schedule starts from (for fine-tuning).
    min_dim_size_to_factor: factor a leaf only if its fan-in and its fan-out
      (products of their axes' sizes) are both at least this large.
    epsilon: added to the squared gradient.
    decay_rate_fn: ``f(step, decay_rate)`` giving the decay at a step;
      Adafactor's ``1 - (step + 1) ** -decay_rate`` by default.
    clipping_threshold: clip each layer's update to this RMS; None (the
      default, as ``optax.scale_by_factored_rms``) does not clip, 1.0 is
      ``optax.adafactor``'s.

  Returns:
    An :class:`optax.GradientTransformation` with a
    :class:`FactoredRmsState`. ``update`` needs no params.

  References:
    Shazeer et al, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import optax_gc
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return nn.DenseGeneral((2, 3), use_bias=False)(x).reshape(x.shape), None
    >>> Stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=4)
    >>> x = jnp.ones((2, 6))
    >>> rules = optax_gc.rules_for(Stack(), x, None)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), x, None)["params"]
    >>> params["DenseGeneral_0"]["kernel"].shape  # (d_model, layers, heads, head_dim)
    (6, 4, 2, 3)
    >>> tx = optax_gc.scale_by_factored_rms(rules, min_dim_size_to_factor=2)
    >>> state = jax.eval_shape(tx.init, params)
    >>> state.v_in["DenseGeneral_0"]["kernel"].shape, state.v_out["DenseGeneral_0"]["kernel"].shape
    ((6, 4, 1, 1), (1, 4, 2, 3))
  """
  where = "scale_by_factored_rms"
  compiled = _compile(rules, where)
  if clipping_threshold is not None and not clipping_threshold > 0:
    raise ValueError(
      f"{where}: clipping_threshold={clipping_threshold!r}; give a positive RMS (1.0 is "
      "Adafactor's) or None not to clip."
    )

  def layout(leaf: tree_lib.Leaf, decision: Decision) -> _Layout:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      return _Layout(floating=False, factored=False)
    rule = _contraction(decision)
    if rule is None:  # a stacked bias or norm scale is still clipped layer by layer
      kept = decision.derived.kept if decision.derived is not None else ()
      return _Layout(True, False, block=tuple(a for a in range(len(leaf.shape)) if a not in kept))
    fan_in, fan_out = rule.axes, rule.fan_out
    assert fan_in is not None  # _contraction keeps only leaves with a fan-in
    big = lambda axes: math.prod(leaf.shape[a] for a in axes) >= min_dim_size_to_factor  # noqa: E731
    factor = factored and bool(fan_out) and big(fan_in) and big(fan_out)
    return _Layout(True, factor, fan_in, fan_out, fan_in + fan_out)

  def layouts(tree):
    return _export(tree, compiled, where, layout)

  def init_leaf(x, lay: _Layout) -> _Moments:
    one = jnp.zeros((1,), jnp.result_type(x))
    if lay.factored:
      return _Moments(None, _zeros_reduced(x, lay.fan_out), _zeros_reduced(x, lay.fan_in), one)
    return _Moments(None, one, one, jnp.zeros_like(x) if lay.floating else one)

  def init_fn(params):
    moments = jax.tree.map(init_leaf, params, layouts(params))
    return _state(jnp.zeros([], jnp.int32), moments)

  def update_leaf(g, v_in, v_out, v, lay: _Layout, decay) -> _Moments:
    if not lay.floating:
      return _Moments(g, v_in, v_out, v)
    wide = jnp.promote_types(g.dtype, jnp.float32)
    g32 = g.astype(wide)
    g2 = jnp.square(g32) + epsilon
    if lay.factored:
      new_in = decay * v_in.astype(wide) + (1 - decay) * jnp.mean(g2, lay.fan_out, keepdims=True)
      new_out = decay * v_out.astype(wide) + (1 - decay) * jnp.mean(g2, lay.fan_in, keepdims=True)
      # v ~ v_in * v_out / (the layer's mean square): the rank-1 estimate, per kept entry.
      share = new_in / jnp.mean(new_in, lay.fan_in, keepdims=True)
      u = g32 * jax.lax.rsqrt(share) * jax.lax.rsqrt(new_out)
      new_in, new_out, new_v = new_in.astype(v_in.dtype), new_out.astype(v_out.dtype), v
    else:
      new_v = decay * v.astype(wide) + (1 - decay) * g2
      u = g32 * jax.lax.rsqrt(new_v)
      new_in, new_out, new_v = v_in, v_out, new_v.astype(v.dtype)
    if clipping_threshold is not None:
      rms = jnp.sqrt(jnp.mean(jnp.square(u), lay.block, keepdims=True))
      u = u / jnp.maximum(1.0, rms / clipping_threshold)
    return _Moments(u.astype(g.dtype), new_in, new_out, new_v)

  def update_fn(updates, state, params=None):
    del params
    decay = decay_rate_fn(state.count - step_offset, decay_rate)
    moments = jax.tree.map(
      lambda g, v_in, v_out, v, lay: update_leaf(g, v_in, v_out, v, lay, decay),
      updates,
      state.v_in,
      state.v_out,
      state.v,
      layouts(updates),
    )
    new_updates = jax.tree.map(lambda m: m.update, moments)
    return new_updates, _state(optax.safe_increment(state.count), moments)

  return optax.GradientTransformation(init_fn, update_fn)


def _state(count, moments) -> FactoredRmsState:
  return FactoredRmsState(
    count,
    jax.tree.map(lambda m: m.v_in, moments),
    jax.tree.map(lambda m: m.v_out, moments),
    jax.tree.map(lambda m: m.v, moments),
  )
