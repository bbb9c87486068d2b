"""The paper's optimizers against NumPy float64 versions of the reference algorithms."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import np_centre, random_params, step_grads

import optax_gc

SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "dense": {"kernel": (5, 3)}}
FAN_IN = {"conv/kernel": (0, 1, 2), "conv/bias": None, "dense/kernel": (0,)}


def init_params(seed=0):
  return random_params(SHAPES, seed)


class NumpyReference:
  """The reference implementation's update rules, one leaf at a time, in float64."""

  def __init__(self, kind, lr, momentum=0.0, nesterov=False, wd=0.0, on="gradient"):
    self.kind, self.lr, self.mom, self.nesterov, self.wd, self.on = (
      kind, lr, momentum, nesterov, wd, on)  # fmt: skip
    self.state = {}
    self.t = 0

  def step(self, name, p, g, axes):
    lr, wd = self.lr, self.wd
    st = self.state.setdefault(name, {"buf": None, "m": np.zeros_like(p), "v": np.zeros_like(p)})
    if self.kind in ("sgd", "adam") and wd:
      g = g + wd * p  # coupled L2
    if self.on == "gradient":
      g = np_centre(g, axes)
    if self.kind == "sgd":
      d = g
      if self.mom:
        st["buf"] = g.copy() if st["buf"] is None else self.mom * st["buf"] + g
        d = g + self.mom * st["buf"] if self.nesterov else st["buf"]
      delta = -lr * d
    else:
      b1, b2, eps = 0.9, 0.999, 1e-8
      st["m"] = b1 * st["m"] + (1 - b1) * g
      st["v"] = b2 * st["v"] + (1 - b2) * g * g
      m_hat = st["m"] / (1 - b1**self.t)
      v_hat = st["v"] / (1 - b2**self.t)
      direction = m_hat / (np.sqrt(v_hat) + eps)
      if self.kind == "adamw":
        direction = direction + wd * p  # decoupled decay
      delta = -lr * direction
    if self.on == "update":
      delta = np_centre(delta, axes)
    return p + delta

  def run(self, params, steps):
    params = {f"{n}/{k}": v.copy() for n, d in params.items() for k, v in d.items()}
    for t in range(steps):
      self.t = t + 1
      nested = {n: {} for n in SHAPES}
      for path, v in params.items():
        n, k = path.split("/")
        nested[n][k] = v
      grads = step_grads(nested, t)
      for path in params:
        n, k = path.split("/")
        params[path] = self.step(path, params[path], grads[n][k], FAN_IN[path])
    return params


def run_optax(tx, params, steps):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  history = [params]
  for t in range(steps):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), step_grads(params, t))
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


CASES = [
  ("sgd", dict(momentum=0.0), {}),
  ("sgd", dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, wd=1e-2)),
  ("sgd", dict(momentum=0.9, nesterov=True), dict(momentum=0.9, nesterov=True)),
  ("adam", dict(weight_decay=1e-2), dict(wd=1e-2)),
  ("adamw", dict(weight_decay=1e-1), dict(wd=1e-1)),
  ("adam", dict(on="update"), dict(on="update")),
  ("adamw", dict(weight_decay=1e-1, on="update"), dict(wd=1e-1, on="update")),
]
FACTORIES = {"sgd": optax_gc.sgd_gc, "adam": optax_gc.adam_gc, "adamw": optax_gc.adamw_gc}


@pytest.mark.parametrize("kind, kwargs, ref_kwargs", CASES)
def test_matches_numpy_reference_for_20_steps(kind, kwargs, ref_kwargs):
  lr = 0.05 if kind == "sgd" else 1e-2
  params = init_params()
  ours = run_optax(FACTORIES[kind](lr, **kwargs), params, 20)[-1]
  ref = NumpyReference(kind, lr, **ref_kwargs).run(params, 20)
  for path, want in ref.items():
    n, k = path.split("/")
    np.testing.assert_allclose(ours[n][k], want, rtol=2e-5, atol=2e-5, err_msg=path)


def fan_in_means(params):
  return {
    n: np.asarray(d["kernel"], np.float64).mean(axis=FAN_IN[f"{n}/kernel"])
    for n, d in params.items()
  }


def max_drift(history):
  first, last = fan_in_means(history[0]), fan_in_means(history[-1])
  return max(np.abs(last[n] - first[n]).max() for n in first)


@pytest.mark.parametrize(
  "tx",
  [
    optax_gc.sgd_gc(0.05, momentum=0.9, weight_decay=1e-2),
    optax_gc.sgd_gc(0.05, momentum=0.9, nesterov=True),
    optax_gc.adam_gc(1e-2, weight_decay=1e-2, on="update"),
    optax_gc.adamw_gc(1e-2, weight_decay=1e-1, on="update"),
    optax_gc.with_centralization(optax.lion(1e-3, weight_decay=0.1), on="update"),
  ],
  ids=["sgd_gc", "sgd_gc_nesterov", "adam_gc2", "adamw_gc2", "lion_gc2"],
)
def test_fan_in_mean_of_weights_stays_fixed_for_200_steps(tx):
  assert max_drift(run_optax(tx, init_params(), 200)) < 2e-5


def test_adam_with_gc_on_the_gradient_does_not_fix_the_fan_in_mean():
  """Adam rescales each coordinate of the centred gradient: the mean drifts (documented)."""
  assert max_drift(run_optax(optax_gc.adam_gc(1e-2), init_params(), 200)) > 1e-2


def test_gcc_preset_centres_conv_kernels_only():
  params = init_params()
  history = run_optax(optax_gc.sgd_gc(0.05, preset="flax_conv"), params, 50)
  first, last = fan_in_means(history[0]), fan_in_means(history[-1])
  assert np.abs(last["conv"] - first["conv"]).max() < 2e-5
  assert np.abs(last["dense"] - first["dense"]).max() > 1e-2


OPTAX = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}


@pytest.mark.parametrize("kind", list(OPTAX))
def test_positional_arguments_are_optaxs(kind):
  def positional(f):
    return [
      (p.name, p.default)
      for p in inspect.signature(f).parameters.values()
      if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]

  assert positional(FACTORIES[kind]) == positional(OPTAX[kind])
  # The same positional call is the same optimizer: with strength 0, the same steps
  # (up to XLA's float32 rounding; a misplaced argument moves them by far more).
  args = {
    "sgd": (0.05, 0.9, True),
    "adam": (1e-2, 0.8, 0.99, 1e-6, 1e-9),
    "adamw": (1e-2, 0.8, 0.99, 1e-6, 1e-9, None, 0.05),
  }[kind]
  ours = run_optax(FACTORIES[kind](*args, strength=0.0), init_params(), 5)
  theirs = run_optax(OPTAX[kind](*args), init_params(), 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours[-1], theirs[-1])
  params = init_params()
  assert jax.tree.structure(FACTORIES[kind](*args).init(params)) == jax.tree.structure(
    OPTAX[kind](*args).init(params)
  )


@pytest.mark.parametrize("kind", list(OPTAX))
def test_strength_and_rules_reach_gc(kind):
  rules = [(r"dense/kernel$", None)]
  ours = run_optax(FACTORIES[kind](1e-2, rules=rules, strength=0.5), init_params(), 3)
  gc = optax_gc.centralize(rules, strength=0.5)
  theirs = run_optax(optax.chain(gc, OPTAX[kind](1e-2)), init_params(), 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
  with pytest.raises(ValueError, match=r"rules\[0\] 'dens/kernel\$': matched no leaf"):
    FACTORIES[kind](1e-2, rules=[(r"dens/kernel$", None)], strict=True).init(init_params())


@pytest.mark.parametrize("kind", list(OPTAX))
def test_bad_arguments_fail_when_the_optimizer_is_built(kind):
  with pytest.raises(ValueError, match=r"on='grads'"):
    FACTORIES[kind](1e-2, on="grads")
  with pytest.raises(TypeError, match=r"strength='high'"):
    FACTORIES[kind](1e-2, strength="high")
  with pytest.raises(TypeError, match=r"positional"):
    FACTORIES[kind](1e-2, 0.9, False, None, 0.0, None, 1e-4, None, "extra")
