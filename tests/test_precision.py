"""optax_gc in low precision: bf16 gradients, float32 master weights, a bf16 training run.

References are NumPy float64 with the fan-in axes written down here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import flat, np_centre

import optax_gc

BF16 = jnp.bfloat16
# Relative spacing of bf16 (8 significant bits): a correctly rounded result is
# within half of it, relative to its own magnitude.
BF16_HALF_ULP = 2.0**-8

FAN_IN = {"dense/kernel": (0,), "conv/kernel": (0, 1), "attn/out/kernel": (0, 1)}
SHAPES = {
  "dense": {"kernel": (64, 8), "bias": (8,)},
  "conv": {"kernel": (3, 16, 8)},
  "attn": {"out": {"kernel": (4, 8, 16)}},
}


def _tree(seed, offset, spread, dtype):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(offset, spread, size=s), dtype),
    SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def _within_bf16_rounding(actual, expected, *, tiny):
  """|actual - expected| <= half a bf16 ulp of expected (plus ``tiny`` for float32 sums)."""
  err = np.abs(np.asarray(actual, np.float64) - expected)
  return err <= BF16_HALF_ULP * np.abs(expected) + tiny


def test_bf16_gradients_are_centred_within_bf16_rounding_of_float64():
  # Gradients near 1.3 that differ by about 1%: the centred values are ~100x
  # smaller than the inputs, so a mean taken or subtracted in bf16 (ulp 2**-7
  # at 1.3) would be off by tens of percent.
  grads = _tree(0, offset=1.3, spread=0.01, dtype=BF16)
  out, _ = jax.jit(optax_gc.centralize().update)(grads, optax.EmptyState())
  assert all(leaf.dtype == BF16 for leaf in jax.tree.leaves(out))
  out, grads = flat(out, numpy=True), flat(grads, numpy=True)
  for path, g in grads.items():
    expected = np_centre(g.astype(np.float64), FAN_IN.get(path))
    tiny = 32 * float(np.finfo(np.float32).eps) * float(np.max(np.abs(g.astype(np.float64))))
    assert np.all(_within_bf16_rounding(out[path], expected, tiny=tiny)), path
    if path in FAN_IN:
      # The check can fail: even the best bf16 mean (float64 rounded to bf16),
      # subtracted and rounded in bf16, is outside the tolerance.
      g64 = g.astype(np.float64)
      mean = np.asarray(jnp.asarray(g64.mean(FAN_IN[path], keepdims=True), BF16), np.float64)
      in_bf16 = np.asarray(jnp.asarray(g64 - mean, BF16), np.float64)
      assert not np.all(_within_bf16_rounding(in_bf16, expected, tiny=tiny)), path


def test_bf16_params_through_gc_and_adamw_stay_bf16_and_finite():
  params = _tree(1, offset=0.0, spread=0.1, dtype=BF16)
  tx = optax.chain(optax_gc.centralize(), optax.adamw(1e-3))
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(3):
    params, state = step(params, state, _tree(10 + t, offset=1.3, spread=0.01, dtype=BF16))
  for leaf in jax.tree.leaves((params, state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == BF16
      assert bool(jnp.all(jnp.isfinite(leaf)))


def _mlp_init(seed, dtype):
  rng = np.random.default_rng(seed)
  sizes = [(16, 64), (64, 64), (64, 4)]
  return {
    f"Dense_{i}": {
      "kernel": jnp.asarray(rng.normal(0, 1 / np.sqrt(n_in), (n_in, n_out)), dtype),
      "bias": jnp.zeros((n_out,), dtype),
    }
    for i, (n_in, n_out) in enumerate(sizes)
  }


def _mlp(params, x):
  for i in range(len(params)):
    layer = params[f"Dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _loss(params, x, y):
  logits = _mlp(params, x.astype(params["Dense_0"]["kernel"].dtype)).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data(seed=0, n=128):
  # A teacher MLP labels Gaussian inputs with a shifted mean (so the first
  # layer's kernel gradients have a large fan-in mean for GC to remove).
  rng = np.random.default_rng(seed)
  x = rng.normal(0.5, 1.0, (n, 16)).astype(np.float32)
  teacher = _mlp_init(100 + seed, jnp.float32)
  y = np.asarray(jnp.argmax(_mlp(teacher, jnp.asarray(x)), axis=-1)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def test_float32_master_weights_step_is_gc_of_the_bf16_gradient():
  lr = 0.5
  master = _mlp_init(0, jnp.float32)
  x, y = _data()
  tx = optax.chain(optax_gc.centralize(), optax.sgd(lr))

  @jax.jit
  def step(master, state):
    # Forward and backward in bf16; the gradient is cast up, the optimizer and
    # the weights it updates are float32.
    compute = jax.tree.map(lambda p: p.astype(BF16), master)
    grads = jax.grad(_loss)(compute, x, y)
    assert all(g.dtype == BF16 for g in jax.tree.leaves(grads))
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, state = tx.update(grads, state, master)
    return optax.apply_updates(master, updates), state, grads

  new, _, grads = step(master, tx.init(master))
  before, after, grads = flat(master, numpy=True), flat(new, numpy=True), flat(grads, numpy=True)
  for path, g in grads.items():
    assert after[path].dtype == np.float32
    axes = (0,) if path.endswith("kernel") else None
    expected = before[path] - lr * np_centre(g, axes)
    atol = 4 * float(np.finfo(np.float32).eps) * (np.max(np.abs(before[path])) + 1.0)
    np.testing.assert_allclose(after[path], expected, rtol=1e-6, atol=atol, err_msg=path)
    if axes:
      # GC keeps each neuron's fan-in sum of the master weights (in float32).
      np.testing.assert_allclose(
        after[path].astype(np.float64).sum(0), before[path].astype(np.float64).sum(0), atol=1e-4
      )
      assert np.max(np.abs(g.mean(0))) > 1e-3, f"{path}: GC has nothing to remove"


def test_bf16_training_with_gc_does_not_diverge_where_float32_does_not():
  x, y = _data(1)
  steps = 60

  def train(dtype):
    params = _mlp_init(1, dtype)
    tx = optax.chain(optax_gc.centralize(), optax.adam(3e-3))

    @jax.jit
    def run(params):
      def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

      (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), length=steps)
      return params, losses

    params, losses = run(params)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    return np.asarray(losses)

  f32_gc, bf16_gc = train(jnp.float32), train(BF16)
  assert np.all(np.isfinite(f32_gc)) and f32_gc[-1] < 0.5 * f32_gc[0]
  assert np.all(np.isfinite(bf16_gc))
  assert bf16_gc[-1] < 0.5 * bf16_gc[0]
  assert bf16_gc[-1] < f32_gc[-1] + 0.1, (bf16_gc[-1], f32_gc[-1])
