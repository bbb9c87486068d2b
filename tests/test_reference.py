"""Where optax_gc differs from the reference implementation, each point in float64.

The reference (github.com/Yonghongwei/Gradient-Centralization) is PyTorch code
on ``(out, in, ...)`` weights; its arithmetic is written again here in NumPy
float64, in its layout, from the update rules its code publishes. Each test
checks that a difference the optimizers' docs list (optax_gc/_src/optimizers.py,
"Where this differs") is real, and what optax_gc does instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from helpers import flat, nest, random_params, step_grads

import optax_gc

# float32 optax against a float64 reference over 20 steps of size ~1e-2.
TOL = 2e-5
# A difference the docs call real must be far outside that.
REAL = 100 * TOL
STEPS = 20
SHAPES = {
  "Conv_0": {"kernel": (3, 3, 2, 4), "bias": (4,)},
  "Dense_0": {"kernel": (5, 3), "bias": (3,)},
}


def to_torch(x):
  """A Flax ``(..., in, out)`` array in the reference's ``(out, in, ...)`` layout."""
  x = np.asarray(x, np.float64)
  return np.moveaxis(x, (-1, -2), (0, 1)) if x.ndim >= 2 else x


def to_flax(x):
  """The inverse of :func:`to_torch`."""
  return np.moveaxis(x, (0, 1), (-1, -2)) if x.ndim >= 2 else x


def ref_gc(g, more_than=1):
  """The reference's GC: a tensor of more than ``more_than`` dims loses its mean over dims 1+.

  ``more_than=1`` is its GC, ``3`` its conv-only GCC.
  """
  if g.ndim <= more_than:
    return g
  return g - g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)


def init_params(seed=0):
  return random_params(SHAPES, seed)


def ref_adamw(rule, params, *, lr, wd, eps=1e-8, b1=0.9, b2=0.999, decay_if=None):
  """AdamW with the reference's GC, in its layout and float64; the final Flax-layout params.

  ``rule``: ``"optax"`` (optax.adamw's step), ``"cifar"`` (the reference's
  CIFAR ``AdamW_GC``) or ``"algorithm_gc"`` (its algorithm-GC AdamW). ``lr`` and
  ``wd`` may be schedules of the 0-based step; ``decay_if(path)`` masks the decay.
  """
  p = {k: to_torch(v) for k, v in flat(params, numpy=True).items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t in range(1, STEPS + 1):
    grads = flat(step_grads(nest({k: to_flax(x) for k, x in p.items()}), t - 1), numpy=True)
    lr_t = float(lr(t - 1)) if callable(lr) else lr
    wd_t = float(wd(t - 1)) if callable(wd) else wd
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    for k in p:
      g = ref_gc(to_torch(grads[k]))
      decay = wd_t if decay_if is None or decay_if(k) else 0.0
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      if rule == "optax":
        m_hat, v_hat = m[k] / bc1, v[k] / bc2
        p[k] = p[k] - lr_t * (m_hat / (np.sqrt(v_hat) + eps) + decay * p[k])
      elif rule == "cifar":
        denom = np.sqrt(v[k]) + eps
        step_size = lr_t * np.sqrt(bc2) / bc1
        p[k] = p[k] - step_size * (decay * p[k] + m[k] / denom)
      else:
        denom = np.sqrt(v[k]) / np.sqrt(bc2) + eps
        p[k] = p[k] - (lr_t / bc1) * (m[k] / denom + decay * p[k])
  return {k: to_flax(x) for k, x in p.items()}


def run_optax(tx, params):
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(STEPS):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), step_grads(params, t))
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return flat(params, numpy=True)


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in b)


def assert_close(ours, want):
  for k in want:
    np.testing.assert_allclose(ours[k], want[k], rtol=TOL, atol=TOL, err_msg=k)


# (a) The CIFAR AdamW_GC: decay scaled by sqrt(bc2) / bc1, eps outside the bias
# correction. With eps=1e-8 only the decay tells them apart; with no decay and a
# large eps only eps does.
@pytest.mark.parametrize("wd, eps", [(0.1, 1e-8), (0.0, 1e-2)], ids=["decay", "eps"])
def test_adamw_gc_follows_optax_and_reference_cifar_takes_the_reference_step(wd, eps):
  params = init_params()
  want_optax = ref_adamw("optax", params, lr=1e-2, wd=wd, eps=eps)
  want_cifar = ref_adamw("cifar", params, lr=1e-2, wd=wd, eps=eps)
  ours = run_optax(optax_gc.adamw_gc(1e-2, eps=eps, weight_decay=wd), params)
  option = run_optax(optax_gc.adamw_gc(1e-2, eps=eps, weight_decay=wd, reference="cifar"), params)
  assert_close(ours, want_optax)
  assert max_diff(ours, want_cifar) > REAL
  assert_close(option, want_cifar)


def test_reference_cifar_keeps_mask_and_schedules():
  params = init_params(1)
  lr = optax.linear_schedule(1e-2, 2e-3, STEPS)
  wd = optax.exponential_decay(0.2, 1, 0.9)
  want = ref_adamw("cifar", params, lr=lr, wd=wd, decay_if=lambda path: "kernel" in path)
  tx = optax_gc.adamw_gc(
    lr,
    weight_decay=wd,
    mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    reference="cifar",
  )
  ours = run_optax(tx, params)
  assert_close(ours, want)
  # Without the mask the biases decay too: the mask is what made them match.
  unmasked = ref_adamw("cifar", params, lr=lr, wd=wd)
  assert max(np.max(np.abs(ours[k] - unmasked[k])) for k in ours if "bias" in k) > REAL


# (b) The algorithm-GC AdamW: decay scaled by 1 / bc1, eps inside the bias
# correction (as optax). Offered as reference="algorithm_gc".
def test_reference_algorithm_gc_differs_from_optax_and_cifar_and_is_offered():
  params = init_params(2)
  want = {r: ref_adamw(r, params, lr=1e-2, wd=0.1) for r in ("optax", "cifar", "algorithm_gc")}
  assert max_diff(want["optax"], want["algorithm_gc"]) > REAL
  assert max_diff(want["cifar"], want["algorithm_gc"]) > REAL
  tx = optax_gc.adamw_gc(1e-2, weight_decay=0.1, reference="algorithm_gc")
  assert_close(run_optax(tx, params), want["algorithm_gc"])


@pytest.mark.parametrize("reference", [None, "cifar", "algorithm_gc"])
def test_every_reference_keeps_optax_adamws_state(reference):
  """Same tree, shapes and dtypes, so a checkpoint restores across ``reference``."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init_params())
  kwargs = dict(mu_dtype=jnp.bfloat16, weight_decay=optax.linear_schedule(0.1, 0.0, 10))
  kwargs["mask"] = {n: {"kernel": True, "bias": False} for n in SHAPES}
  tx = optax_gc.adamw_gc(1e-2, **kwargs, reference=reference)
  state = tx.init(params)
  want = optax.adamw(1e-2, **kwargs).init(params)
  assert jax.tree.structure(state) == jax.tree.structure(want)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), want
  )
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert jax.tree.structure(state) == jax.tree.structure(want)


def test_reference_arguments_it_cannot_take_fail_when_built():
  with pytest.raises(ValueError, match=r"reference='CIFAR'"):
    optax_gc.adamw_gc(1e-2, reference="CIFAR")  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"reference=True"):
    optax_gc.adamw_gc(1e-2, reference=True)  # type: ignore[arg-type]
  with pytest.raises(ValueError, match=r"nesterov=True"):
    optax_gc.adamw_gc(1e-2, nesterov=True, reference="cifar")
  with pytest.raises(ValueError, match=r"eps_root=1e-08"):
    optax_gc.adamw_gc(1e-2, 0.9, 0.999, 1e-8, 1e-8, reference="algorithm_gc")


# (c) Conv-only GC: the reference's GCC centres tensors of more than 3 dims.
def test_gcc_centres_3d_conv_kernels_which_the_reference_skips_and_4d_ones_alike():
  rng = np.random.default_rng(3)
  grads = {
    "Conv1d": {"kernel": rng.normal(size=(5, 2, 4)), "bias": rng.normal(size=4)},
    "Conv2d": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
  }
  grads = jax.tree.map(lambda x: jnp.asarray(x + 0.5, jnp.float32), grads)  # a mean to remove
  plan = optax_gc.explain(grads, preset="flax_conv")
  assert not plan["Conv1d/kernel"].guess and not plan["Conv2d/kernel"].guess  # the bias told
  gcc = optax_gc.centralize(preset="flax_conv")
  ours = flat(gcc.update(grads, gcc.init(grads))[0], numpy=True)

  g1 = to_torch(grads["Conv1d"]["kernel"])  # (out, in, k)
  np.testing.assert_array_equal(ref_gc(g1, more_than=3), g1)  # the reference skips it
  np.testing.assert_allclose(to_torch(ours["Conv1d/kernel"]), ref_gc(g1), atol=1e-6)
  assert np.max(np.abs(ref_gc(g1) - g1)) > 0.1  # and centring it changes it

  g2 = to_torch(grads["Conv2d"]["kernel"])  # (out, in, kh, kw)
  assert np.max(np.abs(ref_gc(g2, more_than=3) - g2)) > 0.1
  np.testing.assert_allclose(to_torch(ours["Conv2d/kernel"]), ref_gc(g2, more_than=3), atol=1e-6)


# (d) Embeddings and single-input weights: the reference's GC centres every
# tensor of 2 or more dims.
class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 6, rngs=rngs)
    self.lin = nnx.Linear(1, 4, rngs=rngs)

  def __call__(self, tokens, x):
    return self.embed(tokens).sum() + self.lin(x).sum()


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, tokens, x):
    return nn.Embed(10, 6)(tokens).sum() + nn.Dense(4)(x).sum()


def nnx_case():
  model = NnxModel(nnx.Rngs(0))
  rules = optax_gc.rules_for(model, jnp.zeros((2,), jnp.int32), jnp.ones((2, 1)))
  return nnx.state(model, nnx.Param), rules, "embed/embedding", "lin/kernel"


def linen_case():
  tokens, x = jnp.zeros((2,), jnp.int32), jnp.ones((2, 1))
  model = LinenModel()
  params = model.init(jax.random.key(0), tokens, x)["params"]
  rules = optax_gc.rules_for(model, tokens, x)
  return params, rules, "Embed_0/embedding", "Dense_0/kernel"


def preset_case():
  params = {
    "Embed_0": {"embedding": jnp.zeros((10, 6))},
    "Dense_0": {"kernel": jnp.zeros((1, 4)), "bias": jnp.zeros(4)},
  }
  return params, (), "Embed_0/embedding", "Dense_0/kernel"


@pytest.mark.parametrize("case", [nnx_case, linen_case, preset_case], ids=["nnx", "linen", "flax"])
def test_embeddings_and_single_input_weights_are_left_alone_where_the_reference_changes_them(case):
  params, rules, embedding, kernel = case()
  rng = np.random.default_rng(4)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) + 0.5, p.dtype), params)
  gc = optax_gc.centralize(rules)
  ours = flat(gc.update(grads, gc.init(params))[0], numpy=True)
  g = flat(grads, numpy=True)
  assert g[embedding].shape == (10, 6) and g[kernel].shape == (1, 4)

  # Flax's and PyTorch's embedding tables are both (vocab, dim).
  table = g[embedding].astype(np.float64)
  assert np.max(np.abs(ref_gc(table) - table)) > 0.1  # each row loses its mean over dim
  np.testing.assert_array_equal(ours[embedding], g[embedding])

  single = to_torch(g[kernel])  # (out, 1)
  assert np.max(np.abs(single)) > 0.1
  np.testing.assert_array_equal(ref_gc(single), np.zeros_like(single))  # never trains
  np.testing.assert_array_equal(ours[kernel], g[kernel])
