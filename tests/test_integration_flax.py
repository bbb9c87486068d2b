"""optax_gc inside Flax training: nnx.Optimizer and linen TrainState.

Each test trains a real model and checks the applied update, leaf by leaf,
against Gradient Centralization computed in NumPy float64 (tests/helpers.py)
with the fan-in axes written down here by hand, not asked of the library.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state
from helpers import assert_update_is_gc, flat, param_step_atol

import optax_gc

VOCAB, SEQ, D, HEADS, LAYERS, CLASSES, BATCH = 13, 6, 8, 2, 3, 3, 8


def _data(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
  labels = (tokens.sum(axis=1) % CLASSES).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(labels)


def _assert_first_step_is_gc(before, after, grads, fan_in, others, lr):
  """The first momentum step of every leaf, ``after - before``, is ``-lr * GC(gradient)``."""
  assert set(grads) == set(fan_in) | others
  for path, grad in grads.items():
    step = after[path].astype(np.float64) - before[path]
    assert_update_is_gc(
      step,
      grad,
      fan_in.get(path),
      path=path,
      scale=-lr,
      atol_floor=param_step_atol(before[path]),
    )


# ---------------------------------------------------------------- nnx ------


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.lin = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    # The nonlinearity sits between the norm and the Linear: straight after a
    # LayerNorm (zero mean over features) the kernel gradient is already
    # centred and GC would have nothing to remove.
    return x + self.lin(jax.nn.gelu(self.norm(x)))


class NnxModel(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.conv = nnx.Conv(D, D, kernel_size=(3,), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return NnxBlock(rngs)

    self.blocks = make_blocks(rngs)
    self.head = nnx.Linear(D, CLASSES, rngs=rngs)

  def __call__(self, tokens):
    x = self.conv(self.embed(tokens))
    x = self.attn(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run_blocks(x, block):
      return block(x)

    return self.head(run_blocks(x, self.blocks).mean(axis=1))


def _nnx_loss(model, tokens, labels):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def _nnx_step(model, optimizer, tokens, labels):
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, tokens, labels)
  optimizer.update(model, grads)
  return loss, grads


# The fan-in of every nnx parameter, written by hand from the layer definitions.
# (in, heads, head_dim) attention inputs average over `in` alone; the
# (heads, head_dim, out) output projection over heads and head_dim; the stacked
# (layers, in, out) kernel over `in` only; embeddings, biases and norm
# parameters (also the stacked (layers, D) ones) are left alone.
NNX_FAN_IN = {
  "attn/query/kernel": (0,),
  "attn/key/kernel": (0,),
  "attn/value/kernel": (0,),
  "attn/out/kernel": (0, 1),
  "blocks/lin/kernel": (1,),
  "conv/kernel": (0, 1),
  "head/kernel": (0,),
}
NNX_OTHER = {
  "attn/query/bias",
  "attn/key/bias",
  "attn/value/bias",
  "attn/out/bias",
  "blocks/lin/bias",
  "blocks/norm/scale",
  "blocks/norm/bias",
  "conv/bias",
  "embed/embedding",
  "head/bias",
}
STACK_RULES = ((r"blocks/lin/kernel$", (-2,)),)


@pytest.fixture(scope="module")
def nnx_model():
  """A model the tests below only read (building one eagerly takes seconds)."""
  return NnxModel(nnx.Rngs(0))


def test_nnx_plan_matches_the_hand_written_fan_in(nnx_model):
  # The stacked kernel keeps its layer axis with the anchored rule.
  state = nnx.state(nnx_model, nnx.Param)
  plan = optax_gc.explain(state, STACK_RULES)
  assert {r.path: r.axes for r in plan} == {
    p: NNX_FAN_IN.get(p) for p in NNX_FAN_IN | dict.fromkeys(NNX_OTHER)
  }
  # The preset alone reads the stack from the kernel's sibling bias (layers, out).
  assert optax_gc.explain(state)["blocks/lin/kernel"].axes == (1,)


def test_nnx_optimizer_applies_gc_of_the_gradient_with_strict_anchored_rules_and_trains():
  # nnx.Optimizer calls init on nnx.Variables (paths end in `.value`) and
  # update on plain arrays: `$`-anchored rules must match both, and strict mode
  # must find every rule used at init.
  rules = ((r"lin/kernel$", (-2,)), (r"head/kernel$", (0,)), (r"out/kernel$", (-3, -2)))
  lr = 0.05
  model = NnxModel(nnx.Rngs(0))
  tx = optax.chain(optax_gc.centralize(rules, strict=True), optax.sgd(lr, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens, labels = _data()
  before = flat(nnx.state(model, nnx.Param), numpy=True)
  loss0, grads = _nnx_step(model, optimizer, tokens, labels)
  grads = flat(grads, numpy=True)
  after = flat(nnx.state(model, nnx.Param), numpy=True)
  _assert_first_step_is_gc(before, after, grads, NNX_FAN_IN, NNX_OTHER, lr)
  losses = [float(loss0)] + [
    float(_nnx_step(model, optimizer, tokens, labels)[0]) for _ in range(30)
  ]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_nnx_optimizer_strict_rejects_a_rule_that_matches_nothing(nnx_model):
  model = nnx_model
  typo = optax_gc.centralize(STACK_RULES + ((r"lni/kernel$", (-2,)),), strict=True)
  with pytest.raises(ValueError, match=r"lni/kernel"):
    nnx.Optimizer(model, optax.chain(typo, optax.sgd(0.1)), wrt=nnx.Param)


def test_nnx_optimizer_strict_lists_undecided_leaves_by_their_paths(nnx_model):
  model = nnx_model
  only_head = optax_gc.centralize(((r"head/kernel$", (0,)),), preset=None, strict=True)
  with pytest.raises(ValueError) as error:
    nnx.Optimizer(model, optax.chain(only_head, optax.sgd(0.1)), wrt=nnx.Param)
  message = str(error.value)
  for path in ("conv/kernel", "blocks/lin/kernel", "attn/out/kernel", "embed/embedding"):
    assert path in message
  assert "head/kernel" not in message.replace("head/kernel$", "")


# -------------------------------------------------------------- linen ------


def _boxed(init, names):
  return nn.with_logical_partitioning(init, names)


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(
      scale_init=_boxed(nn.initializers.ones, ("embed",)),
      bias_init=_boxed(nn.initializers.zeros, ("embed",)),
    )(x)
    h = nn.gelu(h)  # see NnxBlock: a Dense straight after a norm has centred gradients.
    h = nn.Dense(
      D,
      kernel_init=_boxed(nn.initializers.lecun_normal(), ("embed", "mlp")),
      bias_init=_boxed(nn.initializers.zeros, ("mlp",)),
    )(h)
    return x + h, None


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, embedding_init=_boxed(nn.initializers.normal(1.0), ("vocab", "embed")))(
      tokens
    )
    x = nn.Conv(
      D, (3,), kernel_init=_boxed(nn.initializers.lecun_normal(), (None, "embed", "mlp"))
    )(x)
    x = nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)
    stack = nn.scan(
      LinenBlock,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=LAYERS,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(name="stack")(x, None)
    return nn.Dense(CLASSES)(x.mean(axis=1))


LINEN_FAN_IN = {
  "Conv_0/kernel": (0, 1),
  "MultiHeadDotProductAttention_0/query/kernel": (0,),
  "MultiHeadDotProductAttention_0/key/kernel": (0,),
  "MultiHeadDotProductAttention_0/value/kernel": (0,),
  "MultiHeadDotProductAttention_0/out/kernel": (0, 1),
  "stack/Dense_0/kernel": (1,),
  "Dense_0/kernel": (0,),
}
LINEN_OTHER = {
  "Embed_0/embedding",
  "Conv_0/bias",
  "MultiHeadDotProductAttention_0/query/bias",
  "MultiHeadDotProductAttention_0/key/bias",
  "MultiHeadDotProductAttention_0/value/bias",
  "MultiHeadDotProductAttention_0/out/bias",
  "stack/Dense_0/bias",
  "stack/LayerNorm_0/scale",
  "stack/LayerNorm_0/bias",
  "Dense_0/bias",
}
LINEN_RULES = ((r"stack/Dense_0/kernel$", (-2,)),)


def _linen_loss(params, apply_fn, tokens, labels):
  logits = apply_fn({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def _linen_step(state, tokens, labels):
  loss, grads = jax.value_and_grad(_linen_loss)(state.params, state.apply_fn, tokens, labels)
  return state.apply_gradients(grads=grads), loss, grads


def _linen_state(tx, seed=0):
  model = LinenModel()
  tokens, _ = _data(seed)
  params = model.init(jax.random.key(seed), tokens)["params"]
  assert isinstance(params["stack"]["Dense_0"]["kernel"], nn.LogicallyPartitioned)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def test_linen_train_state_with_boxed_scan_params_applies_gc_of_the_gradient_and_trains():
  # nn.with_logical_partitioning boxes every parameter (LogicallyPartitioned,
  # whose `.value` is dropped from the path), nn.scan stacks the block, and
  # strict mode checks every rule and leaf at init, on the boxed tree.
  lr = 0.05
  tx = optax.chain(optax_gc.centralize(LINEN_RULES, strict=True), optax.sgd(lr, momentum=0.9))
  state = _linen_state(tx)
  tokens, labels = _data()
  new_state, loss0, grads = _linen_step(state, tokens, labels)
  grads = flat(grads, numpy=True)
  # The boxes, and the logical axis names of the scanned stack, survive the
  # step, and resolve to PartitionSpecs for the optimizer state too (what a
  # pjit user derives its shardings from).
  kernel = new_state.params["stack"]["Dense_0"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned)
  assert kernel.names == ("layers", "embed", "mlp")
  trace = nn.get_partition_spec(new_state.opt_state)[1][0].trace
  assert trace["stack"]["Dense_0"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
  before, after = flat(state.params, numpy=True), flat(new_state.params, numpy=True)
  _assert_first_step_is_gc(before, after, grads, LINEN_FAN_IN, LINEN_OTHER, lr)
  state, losses = new_state, [float(loss0)]
  for _ in range(30):
    state, loss, _ = _linen_step(state, tokens, labels)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
