"""orbax checkpoints of optimizer states with GC, and switching GC on mid-training.

A run that is saved, restored and continued must match the run that never
stopped; a plain adamw checkpoint restores into ``with_centralization(adamw)``
(same state layout), and the steps after it are adamw on the GC'd gradient,
checked against adamw fed gradients centred in NumPy float64 with the fan-in
axes written down here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import flat, nest, np_centre

import optax_gc

FAN_IN = {"Dense_0/kernel": (0,), "Dense_1/kernel": (0,)}


def _params():
  rng = np.random.default_rng(0)
  return {
    "Dense_0": {"kernel": jnp.asarray(rng.normal(0, 0.3, (6, 8)), jnp.float32)},
    "Dense_1": {
      "kernel": jnp.asarray(rng.normal(0, 0.3, (8, 3)), jnp.float32),
      "bias": jnp.zeros((3,), jnp.float32),
    },
  }


def _batch(t):
  # Inputs with a non-zero mean, so the kernels' gradients have a fan-in mean.
  rng = np.random.default_rng(100 + t)
  return jnp.asarray(rng.normal(0.5, 1.0, (16, 6)), jnp.float32), jnp.asarray(
    rng.normal(0.0, 1.0, (16, 3)), jnp.float32
  )


def _loss(params, x, y):
  h = jnp.tanh(x @ params["Dense_0"]["kernel"])
  return jnp.mean((h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"] - y) ** 2)


_grad = jax.jit(jax.grad(_loss))


@functools.partial(jax.jit, static_argnums=0)
def _apply(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def _train(tx, params, state, steps, start=0, centre_by_hand=False):
  """``steps`` jitted steps; ``centre_by_hand`` feeds ``tx`` the NumPy-centred gradient."""
  for t in range(start, start + steps):
    grads = _grad(params, *_batch(t))
    if centre_by_hand:
      grads = nest(
        {p: jnp.asarray(np_centre(g, FAN_IN.get(p)), jnp.float32) for p, g in flat(grads).items()}
      )
    params, state = _apply(tx, params, state, grads)
  return params, state


def _save_restore(tmp_path, tree, target, name="state"):
  """Saves ``tree`` with orbax and restores it into the structure of ``target``."""
  directory = tmp_path / name
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return checkpointer.restore(directory, abstract)


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.chain(optax_gc.centralize(), optax.adamw(1e-2)),
    lambda: optax_gc.with_centralization(optax.adamw(1e-2)),
  ],
  ids=["chain", "with_centralization"],
)
def test_save_restore_continue_matches_the_run_that_never_stopped(tmp_path, make):
  tx = make()
  params = _params()
  params, state = _train(tx, params, tx.init(params), steps=3)
  restored = _save_restore(
    tmp_path,
    {"params": params, "opt_state": state},
    {
      "params": params,
      "opt_state": tx.init(params),
    },
  )
  _assert_trees_equal(restored, {"params": params, "opt_state": state})
  assert int(optax.tree.get(restored["opt_state"], "count")) == 3

  resumed = _train(tx, restored["params"], restored["opt_state"], steps=2, start=3)
  straight = _train(tx, *_train(tx, _params(), tx.init(_params()), steps=3), steps=2, start=3)
  _assert_trees_equal(resumed, straight, rtol=1e-6, atol=1e-7)


def test_with_centralization_checkpoint_restores_into_plain_adamw(tmp_path):
  # GC switched off: the state of with_centralization(adamw) is adamw's own.
  params = _params()
  gc_tx = optax_gc.with_centralization(optax.adamw(1e-2))
  _, state = _train(gc_tx, params, gc_tx.init(params), steps=2)
  restored = _save_restore(tmp_path, state, optax.adamw(1e-2).init(params))
  _assert_trees_equal(restored, state)


def test_switching_gc_on_by_restoring_a_plain_adamw_checkpoint(tmp_path):
  params = _params()
  adamw = optax.adamw(1e-2)
  params, state = _train(adamw, params, adamw.init(params), steps=3)
  gc_tx = optax_gc.with_centralization(optax.adamw(1e-2))
  restored = _save_restore(
    tmp_path,
    {"params": params, "opt_state": state},
    {"params": params, "opt_state": gc_tx.init(params)},
  )
  _assert_trees_equal(restored["opt_state"], state)

  # Training goes on with GC: each step is adamw, from the restored moments,
  # on the gradient centred in float64 by hand.
  with_gc = _train(gc_tx, restored["params"], restored["opt_state"], steps=3, start=3)
  by_hand = _train(adamw, params, state, steps=3, start=3, centre_by_hand=True)
  _assert_trees_equal(with_gc, by_hand, rtol=1e-5, atol=1e-6)
  assert int(optax.tree.get(with_gc[1], "count")) == 6
  # ... and differs from going on without GC.
  without = _train(adamw, params, state, steps=3, start=3)
  kernel = with_gc[0]["Dense_0"]["kernel"] - without[0]["Dense_0"]["kernel"]
  assert float(jnp.max(jnp.abs(kernel))) > 1e-3
