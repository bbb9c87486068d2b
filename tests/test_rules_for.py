"""rules_for and the tree adapter: stacks, logical names, tree forms, odd leaves, bad input.

Layouts of real models are checked against hand-written tables in test_zoo.py;
these tests pin down how a stack axis is found and what happens where nothing
tells it.
"""

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import flat, np_centre

import optax_gc

KEY = jax.random.key(0)


def axes_of(plan):
  return {row.path: row.axes for row in plan}


class SquareBlock(nn.Module):
  """Dense(8) on 8 features: stacked 8 deep, every axis of its kernel has size 8."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(8, name="square")(x)
    return x + nn.Dense(16, name="wide")(h)[..., :8], None


@pytest.mark.parametrize("axis", [0, 1])
def test_linen_stack_as_long_as_its_kernel_axes_is_settled_by_the_other_leaves(axis):
  # square/kernel (8, 8, 8) and its bias (8, 8) fit a stack at either axis;
  # wide/bias, (8, 16) or (16, 8), fits one.
  stack = nn.scan(
    SquareBlock, variable_axes={"params": axis}, split_rngs={"params": True}, length=8
  )
  x = jnp.ones((2, 8))
  rules = {r.path: r for r in optax_gc.rules_for(stack(), x, None)}
  kernel = rules["params/square/kernel"]
  assert kernel.shape == (8, 8, 8)
  # One layer's kernel is (in, out): the fan-in is the first axis that is not the stack's.
  assert kernel.axes == ((1,) if axis == 0 else (0,)) and not kernel.guess
  assert f"stacked at axis {axis}" in kernel.layer


def test_linen_stack_named_by_logical_axis_names():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(8, kernel_init=init, use_bias=False)(x), None

  stack = nn.scan(
    Block,
    variable_axes={"params": 1},
    split_rngs={"params": True},
    length=8,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  x = jnp.ones((2, 8))
  variables = jax.eval_shape(stack().init, KEY, x, None)
  box = variables["params"]["Dense_0"]["kernel"]
  assert box.names == ("embed", "layers", "mlp") and box.value.shape == (8, 8, 8)
  rules = optax_gc.rules_for(stack(), x, None)
  assert optax_gc.explain(variables, rules)["params/Dense_0/kernel"].axes == (0,)
  # The preset alone reads the stack axis from the names of the boxed leaf.
  row = optax_gc.explain(variables)["params/Dense_0/kernel"]
  assert row.axes == (0,) and not row.guess


class NnxBlock(nnx.Module):
  def __init__(self, use_bias, rngs):
    self.lin = nnx.Linear(4, 4, use_bias=use_bias, rngs=rngs)
    self.wide = nnx.Linear(4, 6, use_bias=use_bias, rngs=rngs)


def nnx_stack(use_bias, out_axis=0, length=4):
  @nnx.vmap(in_axes=0, out_axes=nnx.StateAxes({nnx.Param: out_axis, ...: 0}))
  def make(key):
    return NnxBlock(use_bias, nnx.Rngs(key))

  return make(jax.random.split(KEY, length))


def test_nnx_square_stack_is_settled_by_another_leaf_of_the_same_stack():
  # lin/kernel (4, 4, 4) fits a stack at any axis, wide/kernel (4, 4, 6) and
  # lin/bias (4, 4) at 0 or 1; only wide/bias (6, 4) tells: 1.
  model = nnx_stack(use_bias=True, out_axis=1)
  plan = optax_gc.explain(nnx.state(model, nnx.Param), optax_gc.rules_for(model))
  expected = {"lin/kernel": (0,), "lin/bias": None, "wide/kernel": (0,), "wide/bias": None}
  assert axes_of(plan) == expected
  assert not plan.guesses


def test_nnx_square_stack_with_nothing_to_tell_assumes_axis_0_and_says_so():
  class Square(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

  model = nnx.vmap(lambda k: Square(nnx.Rngs(k)))(jax.random.split(KEY, 4))
  params = nnx.state(model, nnx.Param)
  rules = optax_gc.rules_for(model)
  plan = optax_gc.explain(params, rules)
  row = plan["lin/kernel"]
  assert row.axes == (1,) and row.guess and "assumed" in row.decided_by
  with pytest.raises(ValueError, match=r"'lin/kernel' \(4, 4, 4\) float32: guessed"):
    optax_gc.centralize(rules, strict=True).init(params)


def test_equinox_stack_from_filter_vmap():
  make = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 5, key=k))
  model = make(jax.random.split(KEY, 4))
  assert model.weight.shape == (4, 5, 3)
  rules = optax_gc.rules_for(model)
  params = eqx.filter(model, eqx.is_inexact_array)
  plan = optax_gc.explain(params, rules, preset="torch")
  assert axes_of(plan) == {"weight": (2,), "bias": None}


def test_linen_rules_match_every_tree_form_and_init_needs_dropout_and_train():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(6)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(3)(x)

  x = jnp.ones((2, 5))
  rules = optax_gc.rules_for(Net(), x, train=True)
  variables = jax.eval_shape(lambda: Net().init({"params": KEY, "dropout": KEY}, x, train=True))
  whole = axes_of(optax_gc.explain(variables, rules, preset=None))
  params = axes_of(optax_gc.explain(variables["params"], rules, preset=None))
  assert whole["params/Dense_0/kernel"] == params["Dense_0/kernel"] == (0,)
  assert whole["batch_stats/BatchNorm_0/mean"] is None
  assert {p.removeprefix("params/"): a for p, a in whole.items() if p.startswith("params/")} == (
    params
  )


def test_nnx_rules_match_state_pure_dict_and_the_optimizer():
  model = nnx_stack(use_bias=True)
  rules = optax_gc.rules_for(model)
  state = nnx.state(model, nnx.Param)
  expected = {"lin/kernel": (1,), "lin/bias": None, "wide/kernel": (1,), "wide/bias": None}
  assert axes_of(optax_gc.explain(state, rules, preset=None)) == expected
  assert axes_of(optax_gc.explain(nnx.to_pure_dict(state), rules, preset=None)) == expected
  # nnx.Optimizer: init on Variables, update on plain arrays, one GC step under SGD.
  tx = optax.chain(optax_gc.centralize(rules, preset=None, strict=True), optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  x = jax.random.normal(KEY, (3, 4))

  def loss(m):
    return jnp.sum(jnp.sin(jax.vmap(lambda blk: blk.wide(blk.lin(x)))(m)))

  grads = flat(nnx.to_pure_dict(nnx.grad(loss)(model)))
  optimizer.update(model, nnx.grad(loss)(model))
  after = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for path, axes in expected.items():
    step = np.asarray(after[path], np.float64) - np.asarray(before[path], np.float64)
    np.testing.assert_allclose(step, -np_centre(grads[path], axes), atol=1e-5, err_msg=path)


def test_preset_remembers_logical_names_seen_at_init():
  # nnx.Optimizer calls init on Variables (with their names), update on arrays.
  class Named(nnx.Module):
    def __init__(self, rngs):
      meta = {"out_sharding": ("embed", "mlp"), "eager_sharding": False}
      self.lin = nnx.Linear(5, 6, use_bias=False, kernel_metadata=meta, rngs=rngs)

  @nnx.vmap(
    in_axes=0,
    out_axes=nnx.StateAxes({nnx.Param: 1, ...: 0}),
    transform_metadata={nnx.PARTITION_NAME: "layers"},
  )
  def make(key):
    return Named(nnx.Rngs(key))

  model = make(jax.random.split(KEY, 3))
  state = nnx.state(model, nnx.Param)
  assert optax_gc.explain(state)["lin/kernel"].axes == (0,)  # from the names
  plain = nnx.to_pure_dict(state)
  assert optax_gc.explain(plain)["lin/kernel"].guess  # arrays alone: a guess
  tx = optax_gc.centralize()
  tx.init(state)
  g = np.random.default_rng(0).normal(size=(5, 3, 6)).astype(np.float32)
  out = tx.update({"lin": {"kernel": g}}, optax.EmptyState())[0]["lin"]["kernel"]
  np.testing.assert_allclose(out, np_centre(g, (0,)), atol=1e-6)


def test_float_and_key_leaves_pass_through_explain_strict_and_update():
  class WithDropout(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)
      self.drop = nnx.Dropout(0.1, rngs=rngs)

  model = WithDropout(nnx.Rngs(0))
  plan = optax_gc.explain(model)  # an nnx model is a pytree: RngKey and RngCount leaves
  assert plan["drop/rngs/key"].axes is None and "key" in str(plan["drop/rngs/key"].dtype)
  assert plan["lin/kernel"].axes == (0,)
  state = nnx.state(model)
  out = jax.jit(optax_gc.centralize().update)(state, optax.EmptyState())[0]
  assert jax.tree.structure(out) == jax.tree.structure(state)
  tree = {"kernel": jnp.ones((3, 4)), "lr": 0.5, "key": jax.random.key(1)}
  plan = optax_gc.explain(tree)
  assert plan["lr"].axes is None and plan["key"].axes is None
  tx = optax_gc.centralize(strict=True)
  assert tx.init(tree) == optax.EmptyState()
  out = tx.update(tree, optax.EmptyState())[0]
  assert out["lr"] == 0.5 and jnp.array_equal(
    jax.random.key_data(out["key"]), jax.random.key_data(tree["key"])
  )


def test_user_rules_come_first_and_unknown_parameters_are_left_to_the_preset():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("W", nn.initializers.lecun_normal(), (x.shape[-1], 3))
      kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 3, 3))
      return nn.Dense(4)(x @ w) + kernel.sum()

  x = jnp.ones((2, 5))
  rules = optax_gc.rules_for(Custom(), x)
  params = jax.eval_shape(Custom().init, KEY, x)
  plan = optax_gc.explain(params, rules)
  assert plan["params/W"].axes is None  # not a kernel: the preset leaves it alone
  assert "rules_for: no known layer defines it" in plan["params/W"].decided_by
  assert plan["params/kernel"].guess  # the preset guesses; strict would refuse it
  assert plan["params/Dense_0/kernel"].axes == (0,)
  mine = optax_gc.explain(params, [(r"Dense_0/kernel$", None), *rules])
  assert mine["params/Dense_0/kernel"].axes is None
  assert repr(rules).startswith("LayerRules(") and len(str(rules).splitlines()) == len(rules)


def test_einsum_string_held_or_given_at_call_time():
  class CallTime(nn.Module):
    @nn.compact
    def __call__(self, eqn, x):
      w = self.param("w", nn.initializers.normal(), (2, x.shape[-1], 3))
      return jnp.einsum(eqn, x, w)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = CallTime(name="q")("BTD,NDH->BTNH", x)
      return nn.Einsum((2, 3, 5), "BTNH,NHD->BTD", name="o")(q)

  x = jnp.ones((1, 4, 5))
  plan = optax_gc.explain(jax.eval_shape(Model().init, KEY, x), optax_gc.rules_for(Model(), x))
  assert plan["params/q/w"].axes == (1,) and "'BTD,NDH->BTNH'" in plan["params/q/w"].decided_by
  assert plan["params/o/kernel"].axes == (0, 1)


def test_rules_for_only_reads_the_model():
  model = nnx_stack(use_bias=True)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  optax_gc.rules_for(model)
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_rules_from_another_model_and_unsupported_models_are_refused():
  rules = optax_gc.rules_for(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'kernel' has shape \(5, 4\).*\(3, 4\)"):
    optax_gc.explain({"kernel": jnp.ones((5, 4))}, rules)
  with pytest.raises(TypeError, match=r"Haiku"):
    optax_gc.rules_for(hk.transform(lambda x: hk.Linear(3)(x)))
  with pytest.raises(TypeError, match=r"pass only the model"):
    optax_gc.rules_for(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jnp.ones((1, 3)))
  strict = optax_gc.centralize(rules, preset=None, strict=True)
  with pytest.raises(ValueError, match=r"rules_for: matched no leaf"):
    strict.init({"other": jnp.ones(3)})


def test_conv_only_preset_filters_derived_rules():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.Conv(4, (3,))(x))

  x = jnp.ones((1, 6, 2))
  rules = optax_gc.rules_for(Net(), x)
  params = jax.eval_shape(Net().init, KEY, x)
  plan = axes_of(optax_gc.explain(params, rules, preset="flax_conv"))
  assert plan["params/Conv_0/kernel"] == (0, 1) and plan["params/Dense_0/kernel"] is None
