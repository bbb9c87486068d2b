"""optax_gc.centralize inside optax's wrappers, each under jax.jit.

Every result is checked against GC computed in NumPy float64 (helpers.py) with
the fan-in axes written down here, and, where the wrapper does more
(accumulation, sync, a contrib optimizer), against that wrapper run on the
reference-centred gradient.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from helpers import assert_update_is_gc, flat, nest, np_centre

import optax_gc

# Flax layouts: a Dense kernel (in, out), a Conv kernel (width, in, out), an
# attention output kernel (heads, head_dim, out), a bias.
FAN_IN = {"dense/kernel": (0,), "conv/kernel": (0, 1), "attn/out/kernel": (0, 1)}
SHAPES = {
  "dense": {"kernel": (5, 3), "bias": (3,)},
  "conv": {"kernel": (3, 4, 6)},
  "attn": {"out": {"kernel": (2, 4, 5)}},
}


def _tree(seed, offset=0.5):
  """Random leaves with a clearly non-zero mean, so GC has something to remove."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(offset, 1.0, size=s), jnp.float32),
    SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _gc_tree(tree):
  """Reference GC of a whole tree as a {path: float64 array} dict."""
  return {path: np_centre(g, FAN_IN.get(path)) for path, g in flat(tree).items()}


def _assert_tree_close(actual, expected: dict, rtol=1e-5, atol=1e-6):
  actual = flat(actual, numpy=True)
  assert set(actual) == set(expected)
  for path, value in expected.items():
    np.testing.assert_allclose(actual[path], value, rtol=rtol, atol=atol, err_msg=path)


def _assert_gc_applied(updates, grads, *, scale=1.0, strength=1.0, only=None):
  updates, grads = flat(updates, numpy=True), flat(grads, numpy=True)
  for path, g in grads.items():
    axes = FAN_IN.get(path) if only is None or path in only else None
    assert_update_is_gc(updates[path], g, axes, path=path, scale=scale, strength=strength)


@pytest.mark.parametrize("mask_kind", ["tree", "callable"])
def test_masked(mask_kind):
  mask = {"dense": {"kernel": False, "bias": False}, "conv": {"kernel": True}}
  mask["attn"] = {"out": {"kernel": True}}
  if mask_kind == "callable":
    tree_mask, mask = mask, lambda params: tree_mask
  params, grads = _tree(0), _tree(1)
  tx = optax.masked(optax_gc.centralize(), mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  _assert_gc_applied(updates, grads, only={"conv/kernel", "attn/out/kernel"})


@pytest.mark.parametrize("wrapper", ["partition", "multi_transform"])
def test_partition(wrapper):
  labels = {"dense": {"kernel": "gc", "bias": "gc"}, "conv": {"kernel": "plain"}}
  labels["attn"] = {"out": {"kernel": "gc"}}
  transforms = {
    "gc": optax.chain(optax_gc.centralize(strict=True), optax.sgd(0.5)),
    "plain": optax.sgd(0.5),
  }
  tx = getattr(optax, wrapper)(transforms, labels)
  params, grads = _tree(0), _tree(1)
  # The "gc" branch sees the "plain" leaves as optax.MaskedNode, at init and update.
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  _assert_gc_applied(updates, grads, scale=-0.5, only={"dense/kernel", "attn/out/kernel"})


def test_multi_steps_centralizes_the_accumulated_gradient():
  k = 3
  tx = optax.MultiSteps(optax.chain(optax_gc.centralize(), optax.sgd(1.0)), every_k_schedule=k)
  params = _tree(0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = [_tree(10 + i, offset=0.3 * i) for i in range(k)]
  for i, g in enumerate(grads):
    updates, state = step(g, state, params)
    if i < k - 1:
      assert all(not np.any(u) for u in jax.tree.leaves(updates))
  mean_grad = jax.tree.map(lambda *gs: sum(np.asarray(g, np.float64) for g in gs) / k, *grads)
  _assert_gc_applied(updates, mean_grad, scale=-1.0)


def test_inject_hyperparams_schedules_strength_without_recompiling():
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  tx = optax.inject_hyperparams(optax_gc.centralize)(strength=schedule)
  params = _tree(0)
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(grads, state):
    return tx.update(grads, state, params)

  for t in range(6):
    grads = _tree(20 + t)
    updates, state = step(grads, state)
    # inject_hyperparams records, after each update, the value that update used.
    strength = min(t / 4, 1.0)
    assert float(state.hyperparams["strength"]) == pytest.approx(strength)
    _assert_gc_applied(updates, grads, strength=strength)


def test_apply_if_finite_skips_non_finite_and_centralizes_finite():
  tx = optax.apply_if_finite(
    optax.chain(optax_gc.centralize(), optax.sgd(1.0)), max_consecutive_errors=3
  )
  params = _tree(0)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = _tree(1)
  updates, state = step(grads, state, params)
  _assert_gc_applied(updates, grads, scale=-1.0)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _tree(2))
  updates, state = step(bad, state, params)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  grads = _tree(3)
  updates, state = step(grads, state, params)
  _assert_gc_applied(updates, grads, scale=-1.0)
  assert int(state.notfinite_count) == 0


def test_lookahead_fast_steps_are_gc_and_slow_weights_sync():
  lr, alpha = 0.1, 0.5
  tx = optax.lookahead(
    optax.chain(optax_gc.centralize(), optax.sgd(lr)), sync_period=2, slow_step_size=alpha
  )
  params = optax.LookaheadParams.init_synced(_tree(0))
  state = tx.init(params)
  step = jax.jit(tx.update)
  start = flat(params.slow, numpy=True)
  g1, g2 = _tree(1), _tree(2)

  updates, state = step(g1, state, params)
  params = optax.apply_updates(params, updates)
  fast1 = {p: start[p] - lr * r for p, r in _gc_tree(g1).items()}
  _assert_tree_close(params.fast, fast1)
  _assert_tree_close(params.slow, start)

  updates, state = step(g2, state, params)
  params = optax.apply_updates(params, updates)
  fast2 = {p: fast1[p] - lr * r for p, r in _gc_tree(g2).items()}
  synced = {p: start[p] + alpha * (fast2[p] - start[p]) for p in start}
  _assert_tree_close(params.slow, synced)
  _assert_tree_close(params.fast, synced)


@pytest.mark.parametrize(
  "make",
  [
    # estim_lr0: prodigy's first steps are otherwise too small (1e-6) to tell apart.
    lambda: optax.contrib.prodigy(1.0, estim_lr0=1e-2),
    lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=2),
  ],
  ids=["prodigy", "schedule_free_adamw"],
)
def test_contrib_optimizer_chained_after_gc(make):
  # The chain must behave exactly as the contrib optimizer fed the reference
  # GC, and differently from the contrib optimizer fed the raw gradient.
  def run(tx, centre):
    params = _tree(0)
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(3):
      grads = _tree(30 + t)
      if centre:
        grads = nest({p: jnp.asarray(v, jnp.float32) for p, v in _gc_tree(grads).items()})
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return flat(params, numpy=True)

  with_gc = run(optax.chain(optax_gc.centralize(), make()), centre=False)
  reference = run(make(), centre=True)
  without_gc = run(make(), centre=False)
  _assert_tree_close(with_gc, reference, rtol=1e-4, atol=1e-5)
  assert max(np.max(np.abs(with_gc[p] - without_gc[p])) for p in FAN_IN) > 1e-3


def test_flatten_is_rejected_at_init_with_the_fix_in_the_message():
  # optax.flatten hands its inner transform one 1-D vector: the neurons are
  # gone, so GC inside it would silently do nothing.
  params = _tree(0)
  with pytest.raises(ValueError, match=r"optax\.flatten") as error:
    optax.flatten(optax_gc.centralize()).init(params)
  assert "optax.chain(optax_gc.centralize(), optax.flatten(" in str(error.value)


def test_gc_outside_flatten_works():
  tx = optax.chain(optax_gc.centralize(), optax.flatten(optax.sgd(1.0)))
  params, grads = _tree(0), _tree(1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  _assert_gc_applied(updates, grads, scale=-1.0)
