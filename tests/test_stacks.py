"""rules_for on one block unrolled and stacked every way the frameworks stack layers.

The block (attention with DenseGeneral projections, a conv, a norm, a Dense) is
built as L separately named layers in a Python loop, and as one stack: linen's
nn.scan with the params at axis 0, 1 or 2; nnx.vmap to create with nnx.scan or
jax.lax.scan (over the split state) to apply; eqx.filter_vmap to create with
jax.lax.scan to apply. A stacked leaf must get the fan-in of the same leaf of
one unrolled layer, moved past the stack axis, and never the stack axis itself.
The unrolled fan-ins come from rules_for on the unrolled model AND are checked
against the tables below, written by hand, so a mistake common to both fails.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import flat, np_centre

import optax_gc

KEY = jax.random.key(0)
# Every size 2 but the model's: a stacked leaf's shape does not show its stack axis.
L, D, HEADS, HEAD_DIM = 2, 4, 2, 2


# ------------------------------------------------------------------ linen ---


class LinenBlock(nn.Module):
  """Without biases every param has 2 or more axes, so it can be stacked at axis 2."""

  use_bias: bool = True

  @nn.compact
  def __call__(self, x, _):
    b = self.use_bias
    h = nn.LayerNorm(name="norm")(x) if b else x
    proj = functools.partial(nn.DenseGeneral, (HEADS, HEAD_DIM), use_bias=b)
    # A per-head norm of the queries: its scale is (heads, head_dim).
    norm_q = nn.LayerNorm(use_bias=False, feature_axes=(-2, -1), name="q_norm")
    q, k, v = norm_q(proj(name="query")(h)), proj(name="key")(h), proj(name="value")(h)
    attn = nn.dot_product_attention(q, k, v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=b, name="out")(attn)
    x = x + nn.Conv(D, (3,), use_bias=b, name="conv")(x)
    return x + nn.Dense(D, use_bias=b, name="mlp")(nn.gelu(x)), None


class LinenUnrolled(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x, _ = LinenBlock(self.use_bias, name=f"layers_{i}")(x, None)
    return x


class LinenScanned(nn.Module):
  use_bias: bool = True
  axis: int = 0

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
      LinenBlock, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L
    )
    x, _ = stack(self.use_bias, name="layers")(x, None)
    return x


def _linen_table(use_bias):
  table = {
    "q_norm/scale": None,  # (heads, head_dim)
    "query/kernel": (0,),  # (D, heads, head_dim)
    "key/kernel": (0,),
    "value/kernel": (0,),
    "out/kernel": (0, 1),  # (heads, head_dim, D): axis=(-2, -1)
    "conv/kernel": (0, 1),  # (3 taps, D in, D out)
    "mlp/kernel": (0,),  # (D, D)
  }
  if use_bias:
    table |= {"norm/scale": None, "norm/bias": None}
    table |= {f"{p}/bias": None for p in ("query", "key", "value", "out", "conv", "mlp")}
  return table


# -------------------------------------------------------------------- nnx ---


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      HEADS, D, qkv_features=HEADS * HEAD_DIM, decode=False, rngs=rngs
    )
    self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
    self.mlp = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm(x))
    x = x + self.conv(x)
    return x + self.mlp(nnx.gelu(x))


class NnxUnrolled(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(L)])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class NnxScanned(nnx.Module):
  """nnx.vmap creates the layers with the params at ``axis``; nnx.scan applies them."""

  def __init__(self, axis, rngs):
    self.axis = axis
    axes = nnx.StateAxes({nnx.Param: axis, ...: 0})

    @nnx.vmap(in_axes=0, out_axes=axes)
    def make(key):
      return NnxBlock(nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), L))

  def __call__(self, x):
    @nnx.scan(
      in_axes=(nnx.StateAxes({nnx.Param: self.axis, ...: 0}), nnx.Carry), out_axes=nnx.Carry
    )
    def run(layer, h):
      return layer(h)

    return run(self.layers, x)


class NnxLaxScanned(nnx.Module):
  """nnx.vmap creates the layers; jax.lax.scan runs over their split state."""

  def __init__(self, rngs):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return NnxBlock(nnx.Rngs(key))

    self.layers = make(jax.random.split(rngs.params(), L))

  def __call__(self, x):
    graphdef, state = nnx.split(self.layers)

    def step(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h), None

    return jax.lax.scan(step, x, state)[0]


# nnx.MultiHeadAttention: query/key/value LinearGeneral (D, heads, head_dim),
# out LinearGeneral (heads, head_dim, D) over axis (-2, -1) (flax/nnx/nn/attention.py).
NNX_TABLE = {
  "norm/scale": None,
  "norm/bias": None,
  "attn/query/kernel": (0,),
  "attn/query/bias": None,  # (heads, head_dim)
  "attn/key/kernel": (0,),
  "attn/key/bias": None,
  "attn/value/kernel": (0,),
  "attn/value/bias": None,
  "attn/out/kernel": (0, 1),
  "attn/out/bias": None,
  "conv/kernel": (0, 1),  # (3 taps, D, D)
  "conv/bias": None,
  "mlp/kernel": (0,),
  "mlp/bias": None,
}


# ---------------------------------------------------------------- Equinox ---


class EqxBlock(eqx.Module):
  norm: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  conv: eqx.nn.Conv1d
  mlp: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.norm = eqx.nn.LayerNorm(D)
    self.attn = eqx.nn.MultiheadAttention(HEADS, D, qk_size=HEAD_DIM, vo_size=HEAD_DIM, key=k1)
    self.conv = eqx.nn.Conv1d(D, D, 3, padding=1, key=k2)
    self.mlp = eqx.nn.Linear(D, D, key=k3)

  def __call__(self, x):  # (T, D)
    h = jax.vmap(self.norm)(x)
    x = x + self.attn(h, h, h)
    x = x + self.conv(x.T).T
    return x + jax.vmap(self.mlp)(jax.nn.gelu(x))


class EqxUnrolled(eqx.Module):
  layers: list

  def __init__(self, key):
    self.layers = [EqxBlock(k) for k in jax.random.split(key, L)]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class EqxScanned(eqx.Module):
  layers: EqxBlock

  def __init__(self, key):
    self.layers = eqx.filter_vmap(EqxBlock)(jax.random.split(key, L))

  def __call__(self, x):
    params, static = eqx.partition(self.layers, eqx.is_array)

    def step(h, layer_params):
      return eqx.combine(layer_params, static)(h), None

    return jax.lax.scan(step, x, params)[0]


# eqx.nn.MultiheadAttention's projections are Linear (out, in), no biases by default.
EQX_TABLE = {
  "norm/weight": None,
  "norm/bias": None,
  "attn/query_proj/weight": (1,),  # (heads*head_dim, D)
  "attn/key_proj/weight": (1,),
  "attn/value_proj/weight": (1,),
  "attn/output_proj/weight": (1,),  # (D, heads*head_dim)
  "conv/weight": (1, 2),  # (D out, D in, 3 taps)
  "conv/bias": None,  # (D, 1)
  "mlp/weight": (1,),
  "mlp/bias": None,
}


# ------------------------------------------------------------------ cases ---


def _seq():
  return np.ones((2, 3, D), np.float32)


def _is_abstract(x):
  return isinstance(x, jax.ShapeDtypeStruct)


def _zeros(model):
  # Real arrays (eqx.is_inexact_array drops ShapeDtypeStructs), built without compiling an init.
  return jax.tree.map(
    lambda x: jnp.zeros(x.shape, x.dtype) if _is_abstract(x) else x, model, is_leaf=_is_abstract
  )


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
  """One model: ``build()`` gives ``(model, inputs)``; ``layer(i)`` the path of layer i
  (unrolled) and ``axis`` the stack axis (stacked)."""

  name: str
  framework: str
  build: Callable[[], tuple[Any, tuple]]
  table: dict
  axis: int | None = None
  prefix: str = "layers"

  def layer(self, i):
    return f"{self.prefix}_{i}" if self.framework == "linen" else f"{self.prefix}/{i}"

  @functools.cached_property
  def built(self):
    return self.build()

  @functools.cached_property
  def variables(self):
    model, inputs = self.built
    return jax.eval_shape(model.init, KEY, *inputs)

  def params(self):
    model, _ = self.built
    if self.framework == "linen":
      return self.variables["params"]
    if self.framework == "nnx":
      return nnx.state(model, nnx.Param)
    return eqx.filter(model, eqx.is_inexact_array)

  def forward(self):
    model, inputs = self.built
    if self.framework == "linen":
      return jax.eval_shape(lambda v: model.apply(v, *inputs), self.variables)
    if self.framework == "nnx":
      graphdef, state = nnx.split(model)
      return jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*inputs), state)
    return eqx.filter_eval_shape(lambda m: m(*inputs), model)


def _linen(model):
  return lambda: (model, (_seq(),))


def _nnx(make):
  return lambda: (nnx.eval_shape(lambda: make(nnx.Rngs(0))), (_seq(),))


def _eqx(make):
  return lambda: (_zeros(eqx.filter_eval_shape(make, KEY)), (np.ones((3, D), np.float32),))


UNROLLED = {
  "linen": Model("linen_unrolled", "linen", _linen(LinenUnrolled(True)), _linen_table(True)),
  "linen_no_bias": Model(
    "linen_unrolled_no_bias", "linen", _linen(LinenUnrolled(False)), _linen_table(False)
  ),
  "nnx": Model("nnx_unrolled", "nnx", _nnx(NnxUnrolled), NNX_TABLE),
  "equinox": Model("eqx_unrolled", "equinox", _eqx(EqxUnrolled), EQX_TABLE),
}

# (stacked model, the unrolled model it must agree with)
STACKED = [
  (Model("linen_scan_axis0", "linen", _linen(LinenScanned(True, 0)), {}, 0), "linen"),
  (Model("linen_scan_axis1", "linen", _linen(LinenScanned(True, 1)), {}, 1), "linen"),
  (
    Model("linen_scan_axis0_no_bias", "linen", _linen(LinenScanned(False, 0)), {}, 0),
    "linen_no_bias",
  ),
  (
    Model("linen_scan_axis1_no_bias", "linen", _linen(LinenScanned(False, 1)), {}, 1),
    "linen_no_bias",
  ),
  (
    Model("linen_scan_axis2_no_bias", "linen", _linen(LinenScanned(False, 2)), {}, 2),
    "linen_no_bias",
  ),
  (Model("nnx_vmap_scan_axis0", "nnx", _nnx(lambda r: NnxScanned(0, r)), {}, 0), "nnx"),
  (Model("nnx_vmap_scan_axis1", "nnx", _nnx(lambda r: NnxScanned(1, r)), {}, 1), "nnx"),
  (Model("nnx_vmap_lax_scan", "nnx", _nnx(NnxLaxScanned), {}, 0), "nnx"),
  (Model("eqx_filter_vmap_lax_scan", "equinox", _eqx(EqxScanned), {}, 0), "equinox"),
]


def _id(item):
  return item[0].name if isinstance(item, tuple) else item.name


@functools.cache
def _axes(model):
  """{path: fan-in axes or None} from rules_for, as the plan reads them."""
  tree = model.params()
  net, inputs = model.built
  # No preset: every leaf is decided by rules_for alone.
  plan = optax_gc.explain(tree, optax_gc.rules_for(net, *inputs), preset=None)
  return {path: plan[path].axes for path in flat(tree)}


def _layer_leaves(model, i):
  """{block-relative path: path} of layer i of an unrolled model."""
  prefix = model.layer(i) + "/"
  return {p[len(prefix) :]: p for p in flat(model.params()) if p.startswith(prefix)}


def _stacked_leaves(model):
  prefix = model.prefix + "/"
  return {p[len(prefix) :]: p for p in flat(model.params()) if p.startswith(prefix)}


def _moved(axes, stack_axis):
  """One layer's fan-in on the stacked leaf: the axes at or after the stack axis move right."""
  return None if axes is None else tuple(a + (a >= stack_axis) for a in axes)


# ------------------------------------------------------------------ tests ---


@pytest.mark.parametrize("model", UNROLLED.values(), ids=_id)
def test_unrolled_model_runs_and_every_layer_has_the_tables_leaves(model):
  assert jax.tree.leaves(model.forward())
  assert set(flat(model.params())) == {
    f"{model.layer(i)}/{p}" for i in range(L) for p in model.table
  }


@pytest.mark.parametrize("item", STACKED, ids=_id)
def test_stacked_model_runs_and_holds_the_layers_with_the_stack_axis(item):
  stacked, unrolled = item[0], UNROLLED[item[1]]
  assert jax.tree.leaves(stacked.forward())
  leaves = flat(stacked.params())
  assert set(_stacked_leaves(stacked).values()) == set(leaves)
  one_layer = flat(unrolled.params())
  for rel, path in _stacked_leaves(stacked).items():
    want = list(np.shape(one_layer[f"{unrolled.layer(0)}/{rel}"]))
    want.insert(stacked.axis, L)
    assert np.shape(leaves[path]) == tuple(want), path


@pytest.mark.parametrize("model", UNROLLED.values(), ids=_id)
def test_unrolled_rules_match_the_table(model):
  axes = _axes(model)
  for i in range(L):
    got = {rel: axes[path] for rel, path in _layer_leaves(model, i).items()}
    assert got == model.table, f"layer {i}"


@pytest.mark.parametrize("item", STACKED, ids=_id)
def test_stacked_rules_are_the_layers_fan_in_past_the_stack_axis(item):
  stacked, unrolled = item[0], UNROLLED[item[1]]
  unrolled_axes = _axes(unrolled)
  per_layer = {rel: unrolled_axes[p] for rel, p in _layer_leaves(unrolled, 0).items()}
  assert per_layer == unrolled.table  # the unrolled rules, checked by hand
  stacked_axes = _axes(stacked)
  wrong = {}
  for rel, path in _stacked_leaves(stacked).items():
    got, want = stacked_axes[path], _moved(per_layer[rel], stacked.axis)
    if got != want or (got is not None and stacked.axis in got):
      wrong[path] = f"got {got}, want {want} (stack axis {stacked.axis})"
  assert not wrong, wrong


@pytest.mark.parametrize("item", STACKED, ids=_id)
def test_stacked_update_is_each_layers_own_update(item):
  stacked, unrolled = item[0], UNROLLED[item[1]]
  net, inputs = stacked.built
  tree = stacked.params()
  if stacked.framework == "nnx":
    tree = nnx.to_pure_dict(tree)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.float32), tree)
  tx = optax_gc.centralize(optax_gc.rules_for(net, *inputs), preset=None)
  # One compiled program for the whole tree, not one per leaf shape.
  out = flat(jax.jit(tx.update)(grads, tx.init(grads))[0], numpy=True)
  g = flat(grads, numpy=True)
  for rel, path in _stacked_leaves(stacked).items():
    axes = unrolled.table[rel]
    for i in range(L):
      np.testing.assert_allclose(
        np.take(out[path], i, axis=stacked.axis),
        np_centre(np.take(g[path], i, axis=stacked.axis), axes),
        atol=1e-5,
        err_msg=f"{path}, layer {i}",
      )
