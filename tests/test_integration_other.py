"""optax_gc in Haiku (preset "flax") and Equinox (preset "torch") training loops.

The fan-in of each parameter is written here by hand from the layer
definitions and GC is recomputed in NumPy float64 (helpers.py).
"""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import assert_update_is_gc, flat

import optax_gc

VOCAB, SEQ, D, HEADS, CLASSES, BATCH = 13, 6, 8, 2, 3, 8


def _data(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels = (tokens.sum(axis=1) % CLASSES).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(labels)


def _check_all_leaves(updates, grads, fan_in, others, scale):
  updates, grads = flat(updates, numpy=True), flat(grads, numpy=True)
  assert set(grads) == set(fan_in) | others
  # The gradients are float32 sums over the whole model: rounding at the scale
  # of the largest one (the attention key bias is pure rounding noise).
  floor = 1e-6 * abs(scale) * max(float(np.max(np.abs(g))) for g in grads.values())
  for path, grad in grads.items():
    assert_update_is_gc(
      updates[path], grad, fan_in.get(path), path=path, scale=scale, atol_floor=floor
    )


# -------------------------------------------------------------- haiku ------


def _haiku_forward(tokens):
  x = hk.Embed(VOCAB, D)(tokens)
  x = hk.Conv1D(D, kernel_shape=3)(x)
  x = jax.nn.gelu(hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x))
  x = x + hk.MultiHeadAttention(
    num_heads=HEADS, key_size=D // HEADS, w_init=hk.initializers.VarianceScaling(1.0)
  )(x, x, x)
  x = jax.nn.gelu(hk.Linear(D)(x))
  return hk.Linear(CLASSES)(x.mean(axis=1))


HAIKU = hk.without_apply_rng(hk.transform(_haiku_forward))

# Haiku stores every kernel as (..., in, out): Linear (in, out), Conv1D
# (width, in, out), and its attention projections are plain Linears.
HAIKU_FAN_IN = {
  "conv1_d/w": (0, 1),
  "multi_head_attention/query/w": (0,),
  "multi_head_attention/key/w": (0,),
  "multi_head_attention/value/w": (0,),
  "multi_head_attention/linear/w": (0,),
  "linear/w": (0,),
  "linear_1/w": (0,),
}
HAIKU_OTHER = {
  "embed/embeddings",
  "conv1_d/b",
  "layer_norm/scale",
  "layer_norm/offset",
  "multi_head_attention/query/b",
  "multi_head_attention/key/b",
  "multi_head_attention/value/b",
  "multi_head_attention/linear/b",
  "linear/b",
  "linear_1/b",
}


def _haiku_loss(params, tokens, labels):
  logits = HAIKU.apply(params, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _haiku_step_fn(tx):
  @jax.jit
  def step(params, opt_state, tokens, labels):
    loss, grads = jax.value_and_grad(_haiku_loss)(params, tokens, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads, updates

  return step


def _assert_trains(step, state, opt_state, tokens, labels, loss0):
  """30 more steps of ``step``: the loss stays finite and falls below half its first value."""
  losses = [float(loss0)]
  for _ in range(30):
    state, opt_state, loss, _, _ = step(state, opt_state, tokens, labels)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_haiku_update_is_gc_of_the_gradient_with_flax_preset_and_trains():
  lr = 0.05
  tokens, labels = _data()
  params = HAIKU.init(jax.random.key(0), tokens)
  tx = optax.chain(optax_gc.centralize(preset="flax", strict=True), optax.sgd(lr, momentum=0.9))
  step, opt_state = _haiku_step_fn(tx), tx.init(params)
  params, opt_state, loss0, grads, updates = step(params, opt_state, tokens, labels)
  # The first momentum step is -lr * GC(gradient), leaf by leaf.
  _check_all_leaves(updates, grads, HAIKU_FAN_IN, HAIKU_OTHER, scale=-lr)
  _assert_trains(step, params, opt_state, tokens, labels, loss0)


# ------------------------------------------------------------ equinox ------


class EqxModel(eqx.Module):
  embedding: eqx.nn.Embedding
  conv: eqx.nn.Conv1d
  norm: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  hidden: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 5)
    self.embedding = eqx.nn.Embedding(VOCAB, D, key=k[0])
    self.conv = eqx.nn.Conv1d(D, D, kernel_size=3, padding=1, key=k[1])
    self.norm = eqx.nn.LayerNorm(D)
    self.attn = eqx.nn.MultiheadAttention(HEADS, D, key=k[2])
    self.hidden = eqx.nn.Linear(D, D, key=k[3])
    self.head = eqx.nn.Linear(D, CLASSES, key=k[4])

  def __call__(self, tokens):  # one example: (SEQ,) -> (CLASSES,)
    x = jax.vmap(self.embedding)(tokens)  # (SEQ, D)
    x = self.conv(x.T).T  # Conv1d takes (channels, length)
    x = jax.nn.gelu(jax.vmap(self.norm)(x))
    x = x + self.attn(x, x, x)
    x = jax.nn.gelu(jax.vmap(self.hidden)(x))
    return self.head(x.mean(axis=0))


# Equinox keeps PyTorch's layout: Linear weight (out, in), Conv1d weight
# (out, in, width); the fan-in is every axis but the first. The Conv bias is
# (out, 1): a 2-D bias, which GC must leave alone.
EQX_FAN_IN = {
  "conv/weight": (1, 2),
  "attn/query_proj/weight": (1,),
  "attn/key_proj/weight": (1,),
  "attn/value_proj/weight": (1,),
  "attn/output_proj/weight": (1,),
  "hidden/weight": (1,),
  "head/weight": (1,),
}
EQX_OTHER = {
  "embedding/weight",
  "conv/bias",
  "norm/weight",
  "norm/bias",
  "hidden/bias",
  "head/bias",
}


@eqx.filter_value_and_grad
def _eqx_loss(model, tokens, labels):
  logits = jax.vmap(model)(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _eqx_step_fn(tx):
  @eqx.filter_jit
  def step(model, opt_state, tokens, labels):
    loss, grads = _eqx_loss(model, tokens, labels)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, loss, grads, updates

  return step


def test_equinox_update_is_gc_of_the_gradient_with_torch_preset_and_trains():
  lr = 0.05
  model = EqxModel(jax.random.key(0))
  assert model.conv.bias.shape == (D, 1)
  tokens, labels = _data()
  tx = optax.chain(optax_gc.centralize(preset="torch", strict=True), optax.sgd(lr, momentum=0.9))
  step, opt_state = _eqx_step_fn(tx), tx.init(eqx.filter(model, eqx.is_inexact_array))
  model, opt_state, loss0, grads, updates = step(model, opt_state, tokens, labels)
  # The first momentum step is -lr * GC(gradient), leaf by leaf.
  _check_all_leaves(updates, grads, EQX_FAN_IN, EQX_OTHER, scale=-lr)
  _assert_trains(step, model, opt_state, tokens, labels, loss0)
