"""What a user may hand the API: checked at once, taken as optax takes it, never half-applied."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import np_centre

import optax_gc

OPTIMIZERS = [
  (optax_gc.sgd_gc, {"momentum": 0.9}),
  (optax_gc.adam_gc, {}),
  (optax_gc.adamw_gc, {"weight_decay": 0.0}),
]


@pytest.mark.parametrize("factory, kwargs", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
def test_inject_hyperparams_takes_the_papers_optimizers_as_it_takes_optax_own(factory, kwargs):
  params = {"kernel": jnp.ones((3, 2))}
  grads = {"kernel": jnp.arange(6.0).reshape(3, 2)}
  tx = optax.inject_hyperparams(factory)(learning_rate=0.1, **kwargs)
  state = tx.init(params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
  updates, state = jax.jit(tx.update)(grads, state, params)
  # The first step of each is along the centred gradient.
  direction = np.asarray(updates["kernel"])
  centred = np_centre(np.asarray(grads["kernel"]), (0,))
  np.testing.assert_allclose(direction.sum(axis=0), 0.0, atol=1e-6)
  assert np.all(np.sign(direction) == -np.sign(centred))
  # A scheduled coupled weight decay is a hyperparameter too.
  kwargs = {**kwargs, "weight_decay": optax.linear_schedule(0.0, 1e-4, 10)}
  tx = optax.inject_hyperparams(factory)(learning_rate=0.1, **kwargs)
  jax.jit(tx.update)(grads, tx.init(params), params)


@pytest.mark.parametrize(
  "rules, error, says",
  [
    (3, TypeError, r"rules=3: give a sequence of \(pattern, axes\) pairs"),
    ("kernel", ValueError, r"rules is the string 'kernel'"),
    ([("k", (True,))], ValueError, r"invalid axes \(True,\)"),
    ([("k", (1.0,))], ValueError, r"invalid axes \(1.0,\)"),
  ],
)
def test_bad_rules_are_refused_when_built_whatever_was_built_before(rules, error, says):
  optax_gc.centralize([("k", (1,))])  # (True,) == (1,) to a cache: it must not matter
  with pytest.raises(error, match=says):
    optax_gc.centralize(rules)


def test_no_rules_and_numpy_integer_axes_are_taken():
  g = {"kernel": jnp.arange(6.0).reshape(3, 2)}
  out = optax_gc.centralize(None).update(g, None)[0]["kernel"]
  np.testing.assert_allclose(out, np_centre(np.asarray(g["kernel"]), (0,)), atol=1e-6)
  out = optax_gc.centralize([("kernel", (np.int64(1),))]).update(g, None)[0]["kernel"]
  np.testing.assert_allclose(out, np_centre(np.asarray(g["kernel"]), (1,)), atol=1e-6)


@pytest.mark.parametrize("strength", [jnp.array(1.5), jnp.array(float("nan")), float("nan"), -0.1])
def test_strength_out_of_range_is_refused_as_an_array_too(strength):
  with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
    optax_gc.centralize(strength=strength)
  with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
    optax_gc.with_centralization(optax.sgd(0.1), strength=strength)


def test_a_concrete_strength_array_in_range_scales_the_mean():
  g = jnp.arange(6.0).reshape(3, 2)
  out = optax_gc.centralize(strength=jnp.array(0.25)).update({"kernel": g}, None)[0]["kernel"]
  expected = np.asarray(g) - 0.25 * np.asarray(g).mean(0, keepdims=True)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_float8_leaves_are_left_unchanged_and_listed_not_a_crash():
  g = {"kernel": jnp.ones((3, 2), jnp.float8_e4m3fn), "dense": jnp.ones((3, 2))}
  plan = optax_gc.explain(g)
  assert plan["kernel"].axes is None and "float16 or wider" in plan["kernel"].decided_by
  out = optax_gc.centralize().update(g, None)[0]
  assert out["kernel"].dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(out["kernel"], np.float32), 1.0)
  with pytest.raises(ValueError, match=r"'kernel' \(3, 2\) float8_e4m3fn: undecided"):
    optax_gc.centralize(strict=True).init(g)


def test_numpy_float64_gradients_raise_no_warning_plain_sgd_does_not():
  grads = {"kernel": np.random.default_rng(0).normal(size=(4, 3))}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    optax.sgd(0.1).update(grads, optax.sgd(0.1).init(grads))
    tx = optax.chain(optax_gc.centralize(), optax.sgd(0.1))
    out = tx.update(grads, tx.init(grads))[0]["kernel"]
  np.testing.assert_allclose(out, -0.1 * np_centre(grads["kernel"], (0,)), rtol=1e-5, atol=1e-6)


def test_linear_transpose_of_gc_is_gc_a_symmetric_projection():
  rng = np.random.default_rng(0)
  g = {"conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)}
  g["lin"] = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)

  def gc(tree):
    return optax_gc.centralize(strength=0.5).update(tree, None)[0]

  (transposed,) = jax.linear_transpose(gc, g)(g)
  for path in g:
    np.testing.assert_allclose(transposed[path], gc(g)[path], atol=1e-6, err_msg=path)
  # and still saturates instead of overflowing
  big = {"lin": jnp.array([[3e38, 1.0], [-3e38, 2.0], [3e38, 3.0]], jnp.float32)}
  assert bool(jnp.all(jnp.isfinite(optax_gc.centralize().update(big, None)[0]["lin"])))


def test_explains_footer_sends_a_user_where_the_answer_is():
  """Undecided leaves from rules_for need rules of one's own; the preset's, rules_for."""

  def fn(p, x):
    return jnp.tanh(x @ p["tied"]) @ p["tied"].T  # two uses that disagree: undecided

  params = {"tied": jnp.zeros((4, 3))}
  derived = str(optax_gc.explain(params, optax_gc.rules_for(fn, params, jnp.ones((2, 4)))))
  assert "?: 1 leaves left unchanged, undecided" in derived
  assert "give them rules of your own" in derived and "reads them" not in derived
  preset = str(optax_gc.explain({"gating_einsum": jnp.zeros((2, 4, 8))}))
  assert "?: 1 leaves left unchanged, undecided" in preset
  assert "optax_gc.rules_for(model) reads them" in preset
