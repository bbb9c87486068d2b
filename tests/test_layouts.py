"""The presets on real models: every layout of DESIGN.md's table, from real gradients."""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import fan_in_sums, flat, np_centre

import optax_gc

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (2, 6, 6, 3))
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])


def loss_of(apply):
  """A loss whose gradient reaches every parameter with a generic, non-degenerate value."""
  return lambda p: jnp.sum(jnp.sin(apply(p) * 1.7 + 0.3) ** 2)


def grad_of(apply, params):
  # Jitted: op by op, the models' many small ops compile one by one (seconds each test).
  return jax.jit(jax.grad(loss_of(apply)))(params)


def centred(grads, preset="flax"):
  tx = optax_gc.centralize(preset=preset)
  return tx.update(grads, tx.init(grads))[0]


def check(grads, expected, preset="flax"):
  """``expected``: {path suffix: fan-in axes or None}; every leaf must be listed."""
  before, after = flat(grads), flat(centred(grads, preset))
  seen = set()
  for path, g in before.items():
    matches = [s for s in expected if path.endswith(s)]
    assert matches, f"{path} {g.shape} has no expectation"
    suffix = max(matches, key=len)
    seen.add(suffix)
    axes = expected[suffix]
    out = np.asarray(after[path], np.float64)
    if axes is None:
      np.testing.assert_array_equal(out, g, err_msg=path)
      continue
    assert np.abs(fan_in_sums(g, axes)).max() > 1e-4, f"{path}: gradient already centred"
    scale = np.abs(g).max()
    np.testing.assert_allclose(
      fan_in_sums(out, axes), 0.0, atol=1e-5 * scale * g.size, err_msg=path
    )
    np.testing.assert_allclose(out, np_centre(g, axes), atol=1e-6 * scale, err_msg=path)
  assert seen == set(expected), f"no leaf for {set(expected) - seen}"


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, tokens):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.LayerNorm()(x)
    x = x.reshape(x.shape[0], -1, 8)[:, :4] + nn.Embed(10, 8)(tokens)
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)
    return nn.Dense(5)(x.mean(1))


FLAX_EXPECTED = {
  "Conv_0/kernel": (0, 1, 2),
  "Conv_0/bias": None,
  "LayerNorm_0/scale": None,
  "LayerNorm_0/bias": None,
  "Embed_0/embedding": None,
  "query/kernel": (0,),
  "key/kernel": (0,),
  "value/kernel": (0,),
  "query/bias": None,
  "key/bias": None,
  "value/bias": None,
  "out/kernel": (0, 1),
  "out/bias": None,
  "Dense_0/kernel": (0,),
  "Dense_0/bias": None,
}


@pytest.fixture(scope="module")
def linen_grads():
  model = LinenNet()
  params = jax.jit(model.init)(KEY, X, TOKENS)
  return grad_of(lambda p: model.apply(p, X, TOKENS), params)


def test_linen_model(linen_grads):
  grads = linen_grads
  assert grads["params"]["MultiHeadDotProductAttention_0"]["query"]["bias"].ndim == 2
  check(grads, FLAX_EXPECTED)


def test_optax_centralize_is_wrong_on_a_flax_dense_kernel():
  """The bug this library exists for: optax.centralize keeps axis 0 (PyTorch layout)."""
  g = jax.grad(lambda k: jnp.sum(jnp.sin(X.reshape(2, -1)[:, :12] @ k)))(
    jax.random.normal(KEY, (12, 5))
  )
  theirs, _ = optax.centralize().update(g, optax.EmptyState())
  ours, _ = optax_gc.centralize().update({"kernel": g}, optax.EmptyState())
  assert np.abs(fan_in_sums(theirs, (0,))).max() > 1e-2  # fan-in sums not zero
  np.testing.assert_allclose(fan_in_sums(ours["kernel"], (0,)), 0.0, atol=1e-5)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)
    self.lin = nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, x, tokens):
    x = self.norm(self.conv(x))
    x = x.reshape(x.shape[0], -1, 8)[:, :4] + self.embed(tokens)
    return self.lin(self.attn(x).mean(1))


def test_nnx_model():
  model = NnxNet(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def apply(p):
    return nnx.merge(graphdef, p)(X, TOKENS)

  grads = grad_of(apply, params)
  check(
    nnx.to_pure_dict(grads),
    {
      "conv/kernel": (0, 1, 2),
      "conv/bias": None,
      "norm/scale": None,
      "norm/bias": None,
      "embed/embedding": None,
      "query/kernel": (0,),
      "key/kernel": (0,),
      "value/kernel": (0,),
      "query/bias": None,
      "key/bias": None,
      "value/bias": None,
      "out/kernel": (0, 1),
      "out/bias": None,
      "lin/kernel": (0,),
      "lin/bias": None,
    },
  )
  # nnx.Optimizer calls init on Variables: the paths must be the same as on arrays.
  plan_vars = optax_gc.explain(nnx.state(model, nnx.Param))
  plan_arrays = optax_gc.explain(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert [(r.path, r.axes) for r in plan_vars] == [(r.path, r.axes) for r in plan_arrays]


def test_linen_logically_partitioned_boxes_keep_their_paths():
  class Boxed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(4, kernel_init=init)(x)

  params = Boxed().init(KEY, jnp.ones((1, 3)))
  assert isinstance(params["params"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  assert optax_gc.explain(params)["params/Dense_0/kernel"].axes == (0,)


def test_haiku_model_with_flax_preset():
  def forward(x, tokens):
    h = hk.Conv2D(8, 3)(x)
    h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(h)
    h = h.reshape(h.shape[0], -1, 8)[:, :4] + hk.Embed(10, 8)(tokens)
    h = hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling(1.0))(h, h, h)
    return hk.Linear(5)(h.mean(1))

  model = hk.without_apply_rng(hk.transform(forward))
  params = jax.jit(model.init)(KEY, X, TOKENS)
  grads = grad_of(lambda p: model.apply(p, X, TOKENS), params)
  check(
    grads,
    {
      "conv2_d/w": (0, 1, 2),
      "conv2_d/b": None,
      "layer_norm/scale": None,
      "layer_norm/offset": None,
      "embed/embeddings": None,
      "query/w": (0,),
      "key/w": (0,),
      "value/w": (0,),
      "query/b": None,
      "key/b": None,
      "value/b": None,
      "multi_head_attention/linear/w": (0,),
      "multi_head_attention/linear/b": None,
      "linear/w": (0,),
      "linear/b": None,
    },
  )


class EqxNet(eqx.Module):
  conv: eqx.nn.Conv2d
  norm: eqx.nn.LayerNorm
  embed: eqx.nn.Embedding
  linear: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv = eqx.nn.Conv2d(3, 8, 3, key=k1)
    self.norm = eqx.nn.LayerNorm(8)
    self.embed = eqx.nn.Embedding(10, 8, key=k2)
    self.linear = eqx.nn.Linear(8, 5, key=k3)

  def __call__(self, x, token):
    h = self.conv(x).mean((1, 2))  # (8,)
    return self.linear(self.norm(h) + self.embed(token))


def test_equinox_model_with_torch_preset():
  model = EqxNet(KEY)
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def apply(p):
    m = eqx.combine(p, static)
    return jax.vmap(m)(jnp.moveaxis(X, -1, 1), TOKENS[:, 0])

  grads = grad_of(apply, params)
  assert grads.conv.bias.shape == (8, 1, 1)  # a bias of rank 3 must stay unchanged
  check(
    grads,
    {
      "conv/weight": (1, 2, 3),
      "conv/bias": None,
      "norm/weight": None,
      "norm/bias": None,
      "embed/weight": None,
      "linear/weight": (1,),
      "linear/bias": None,
    },
    preset="torch",
  )


def test_conv_only_presets_leave_dense_and_attention_alone(linen_grads):
  expected = {k: None for k in FLAX_EXPECTED} | {"Conv_0/kernel": (0, 1, 2)}
  check(linen_grads, expected, preset="flax_conv")


@pytest.mark.parametrize("stack", ["linen_scan", "nnx_vmap"])
def test_scan_stacked_layers_keep_the_layer_axis_with_a_rule(stack):
  rules = [(r"(Dense_0|mlp)/kernel$", (-2,))]
  if stack == "linen_scan":

    class Block(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        h = nn.MultiHeadDotProductAttention(num_heads=2)(x)
        return x + nn.Dense(8)(nn.LayerNorm()(h)), None

    Stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x = jnp.ones((2, 4, 8))
    params = jax.eval_shape(lambda: Stack().init(KEY, x, None))
    plan = optax_gc.explain(params, rules)
    prefix = "params/"
  else:

    class Block(nnx.Module):
      def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return Block(nnx.Rngs(key))

    stacked = make(jax.random.split(KEY, 3))
    plan = optax_gc.explain(nnx.state(stacked, nnx.Param), rules)
    prefix = ""
  rows = {r.path.removeprefix(prefix): r for r in plan}
  names = {
    "linen_scan": ("MultiHeadDotProductAttention_0", "Dense_0", "LayerNorm_0"),
    "nnx_vmap": ("attn", "mlp", "norm"),
  }[stack]
  attn, dense, norm = names
  assert rows[f"{attn}/query/kernel"].shape == (3, 8, 2, 4)
  assert rows[f"{attn}/query/kernel"].axes == (1,)  # the input axis: not L, not heads
  assert rows[f"{attn}/out/kernel"].axes == (1, 2)
  assert rows[f"{dense}/kernel"].shape == (3, 8, 8) and rows[f"{dense}/kernel"].axes == (1,)
  assert rows[f"{norm}/scale"].shape == (3, 8) and rows[f"{norm}/scale"].axes is None
  assert all(r.axes is None or 0 not in r.axes for r in plan), str(plan)
