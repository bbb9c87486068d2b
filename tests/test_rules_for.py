"""rules_for: what each operation of a program says of a parameter, and the framework adapters.

Real model structures are checked leaf by leaf against hand-written tables in
test_zoo.py and test_stacks.py; these tests pin down the reading of single
operations, written as plain JAX functions (``rules_for(fn, params, *inputs)``)
whose answer follows from the operation's definition, and the adapters.
"""

import functools
import string

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
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

import optax_gc

KEY = jax.random.key(0)


def read(fn, params, *inputs, **kwargs):
  """``{path: rule}`` of ``rules_for`` on a function."""
  return {r.path: r for r in optax_gc.rules_for(fn, params, *inputs, **kwargs)}


def axes_of(plan):
  return {row.path: row.axes for row in plan}


def zeros(*shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


# -- contractions ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_einsum_fan_in_is_the_weight_letters_summed_against_the_input(data):
  """A random einsum ``x, w -> y``, ``w`` stored with its axes permuted: the fan-in is the
  letters of ``w`` that are in ``x`` and not in ``y``; batch letters (in all three) are kept,
  the letters of ``w`` alone reach the output."""
  letters = data.draw(st.permutations(string.ascii_lowercase[:7]))
  n_in, n_batch, n_out, n_x = (data.draw(st.integers(lo, 2)) for lo in (1, 0, 0, 0))
  fan_in = letters[:n_in]
  batch = letters[n_in : n_in + n_batch]
  out = letters[n_in + n_batch : n_in + n_batch + n_out]
  x_only = letters[n_in + n_batch + n_out : n_in + n_batch + n_out + n_x]
  w = data.draw(st.permutations(fan_in + batch + out))
  x = data.draw(st.permutations(["z", *fan_in, *batch, *x_only]))  # z: a data batch axis
  y = ["z", *batch, *x_only, *out]
  sizes = {c: 2 + i for i, c in enumerate(letters)} | {"z": 2}
  stored = data.draw(st.permutations(range(len(w))))  # the leaf is w's axes, permuted
  spec = f"{''.join(x)},{''.join(w)}->{''.join(y)}"

  def fn(params, x):
    return jnp.einsum(spec, x, jnp.transpose(params["w"], np.argsort(stored)))

  leaf_shape = tuple(sizes[w[i]] for i in stored)
  rule = read(fn, {"w": zeros(*leaf_shape)}, zeros(*(sizes[c] for c in x)))["w"]
  position = {w[i]: pos for pos, i in enumerate(stored)}  # letter -> axis of the leaf
  assert rule.kind == "contraction", (spec, rule)
  assert rule.axes == tuple(sorted(position[c] for c in fan_in)), (spec, stored, rule)
  assert set(rule.fan_out) == {position[c] for c in out}, (spec, stored, rule)
  assert set(rule.kept) == {position[c] for c in batch}, (spec, stored, rule)


def test_conv_kernels_by_dimension_numbers_groups_dilations_and_transposes():
  def fn(p, x):
    y = jax.lax.conv_general_dilated(x, p["oihw"], (1, 1), "SAME", rhs_dilation=(2, 2))
    y = jax.lax.conv_general_dilated(
      y, p["grouped"], (1, 1), "SAME", feature_group_count=2,
      dimension_numbers=("NCHW", "HWIO", "NCHW"),
    )  # fmt: skip
    return jax.lax.conv_transpose(
      y,
      p["transposed"],
      (2, 2),
      "SAME",
      dimension_numbers=("NCHW", "HWIO", "NCHW"),
      transpose_kernel=True,
    )

  params = {
    "oihw": zeros(4, 3, 3, 3),
    "grouped": zeros(3, 3, 2, 6),
    "transposed": zeros(3, 3, 5, 6),
  }
  rules = read(fn, params, zeros(2, 3, 8, 8))
  assert rules["oihw"].axes == (1, 2, 3) and rules["oihw"].fan_out == (0,)
  assert rules["grouped"].axes == (0, 1, 2) and rules["grouped"].fan_out == (3,)
  # transpose_kernel swaps the kernel's in and out axes: HWIO with O as its input.
  assert rules["transposed"].axes == (0, 1, 3) and rules["transposed"].fan_out == (2,)
  assert all(rules[k].conv for k in params)


def test_ragged_dot_keeps_the_expert_axis():
  def fn(p, x, sizes):
    return jax.lax.ragged_dot(x, p["experts"], sizes)

  rule = read(fn, {"experts": zeros(3, 5, 7)}, zeros(6, 5), zeros(3, dtype=jnp.int32))["experts"]
  assert (rule.axes, rule.kept, rule.fan_out) == ((1,), (0,), (2,))
  assert "expert axis 0" in rule.how


def test_sum_of_shifted_products_is_a_contraction_over_the_shift_axis():
  """A depthwise temporal conv written by hand: ``sum_k x[t - k] * w[k]``."""

  def fn(p, x):
    out = 0.0
    for k in range(3):
      out = out + jnp.roll(x, k, axis=1) * p["w"][k][None, None, :]
    return out + p["b"]

  rules = read(fn, {"w": zeros(3, 6), "b": zeros(6)}, zeros(2, 5, 6))
  assert rules["w"].axes == (0,) and rules["w"].fan_out == (1,)
  assert rules["b"].axes is None and rules["b"].kind == "untouched"


def test_product_summed_over_a_parameter_axis_is_a_contraction_and_a_scale_is_not():
  def fn(p, x):
    h = jnp.sum(x[:, :, None] * p["w"][None], axis=1)  # x @ w, by hand
    h = h * p["scale"]  # a norm's scale
    return h @ p["head"] + (h * p["gate"]).sum(-1, keepdims=True)

  params = {"w": zeros(4, 5), "scale": zeros(5), "head": zeros(5, 2), "gate": zeros(3, 5)}
  rules = read(fn, params, zeros(3, 4))
  assert rules["w"].axes == (0,) and rules["w"].fan_out == (1,)
  assert rules["scale"].axes is None and rules["scale"].kind == "untouched"
  assert rules["gate"].axes == (1,)  # summed over its last axis against h


def test_residual_products_of_stacked_layers_are_not_summed_over_the_stack():
  """LayerScale per layer ``h + g[l] * f(h)``: the products meet the residual stream."""

  def fn(p, x):
    h = x
    for layer in range(3):
      h = h + p["g"][layer] * jnp.tanh(h @ p["w"][layer])
    return h

  rules = read(fn, {"g": zeros(3, 4), "w": zeros(3, 4, 4)}, zeros(2, 4))
  assert rules["g"].axes is None and rules["g"].kind == "untouched"
  assert rules["w"].axes == (1,) and rules["w"].kept == (0,)


# -- following a parameter ---------------------------------------------------


def test_reshapes_split_and_merge_axes_and_a_mixed_reshape_is_a_conflict():
  def fn(p, x):
    q = jnp.einsum("bd,dhk->bhk", x, p["q"].reshape(4, 2, 3))  # stored (d, h*k)
    o = jnp.einsum("bhk,hkd->bd", q, p["o"].reshape(2, 3, 4))  # stored (h*k, d)
    c = x @ p["conv"].reshape(4, 5)  # a (1, 4, 5) kernel: the size-1 axis joins the fan-in
    m = x[:, :2] @ p["mixed"].reshape(2, 6)  # stored (3, 4): rows mix contracted and output
    return o.sum() + c.sum() + m.sum()

  params = {"q": zeros(4, 6), "o": zeros(6, 4), "conv": zeros(1, 4, 5), "mixed": zeros(3, 4)}
  rules = read(fn, params, zeros(2, 4))
  assert rules["q"].axes == (0,) and rules["q"].fan_out == (1,)
  assert rules["o"].axes == (0,) and rules["o"].fan_out == (1,)
  assert rules["conv"].axes == (0, 1)
  assert rules["mixed"].axes is None and rules["mixed"].kind == "conflict"
  assert "mixes" in rules["mixed"].how


def test_slices_of_one_entry_are_stack_axes_and_ranges_keep_their_axis():
  def fn(p, x):
    q, k, v = (p["qkv"][:, i] for i in range(3))  # fused (d, 3, h*k)
    up, gate = jnp.split(p["mlp"], 2, axis=1)  # fused (d, 2*f)
    h = jax.nn.softmax((x @ q) @ (x @ k).T) @ (x @ v)
    return (x @ up) * (x @ gate), h

  rules = read(fn, {"qkv": zeros(4, 3, 6), "mlp": zeros(4, 10)}, zeros(2, 4))
  assert (rules["qkv"].axes, rules["qkv"].kept, rules["qkv"].fan_out) == ((0,), (1,), (2,))
  assert (rules["mlp"].axes, rules["mlp"].fan_out) == ((0,), (1,))


def test_entries_whose_outputs_are_added_into_the_same_neurons_are_summed():
  """Taps of a convolution written as slices: each output sums every tap's products.

  Stacks stay stacks: layers applied one after another (each fed by the last,
  unrolled or scanned with the carry), and experts whose outputs are weighted
  by data before they are added.
  """
  w = zeros(3, 4, 5)  # (taps, in, out)

  def taps(p, x):  # y[t] = sum_k x[t + k] @ w[k]
    return sum(x[:, k : k + 6] @ p["w"][k] for k in range(3))

  def accumulated(p, x):  # the same sum, one tap per trip of a scan
    xs = jnp.stack([x[:, k : k + 6] for k in range(3)])
    return jax.lax.scan(
      lambda a, xw: (a + xw[0] @ xw[1], None), jnp.zeros((2, 6, 5)), (xs, p["w"])
    )[0]

  def cell(p, xs):  # input and recurrent weights stored stacked: [x, h] @ w.reshape(12, 6)
    step = lambda h, x: (jnp.tanh(x @ p["w"][0] + h @ p["w"][1]),) * 2  # noqa: E731
    return jax.lax.scan(step, jnp.zeros((2, 6)), xs)[0]

  def unrolled(p, x):  # a residual stack: layer i + 1 reads layer i's output
    for i in range(3):
      x = x + jnp.tanh(x @ p["v"][i]) @ p["w"][i]
    return x

  def scanned(p, x):  # the same stack scanned: the carry feeds each layer
    body = lambda h, vw: (h + jnp.tanh(h @ vw[0]) @ vw[1], None)  # noqa: E731
    return jax.lax.scan(body, x, (p["v"], p["w"]))[0]

  def experts(p, x, g):  # outputs weighted by a gate: each expert's neurons are its own
    return sum(g[:, e : e + 1] * (x @ p["w"][e]) for e in range(3))

  x = zeros(2, 8, 4)
  for fn in (taps, accumulated):
    rule = read(fn, {"w": w}, x)["w"]
    assert (rule.axes, rule.kept, rule.fan_out) == ((0, 1), (), (2,)), fn.__name__
    assert "entries of axis 0 added" in rule.how
  rule = read(cell, {"w": zeros(2, 6, 6)}, zeros(5, 2, 6))["w"]
  assert (rule.axes, rule.kept) == ((0, 1), ())
  stack = {"v": zeros(3, 6, 6), "w": zeros(3, 6, 6)}
  for fn in (unrolled, scanned):
    rules = read(fn, stack, zeros(2, 6))
    assert {k: (r.axes, r.kept) for k, r in rules.items()} == dict.fromkeys(stack, ((1,), (0,)))
  rule = read(experts, {"w": zeros(3, 6, 4)}, zeros(2, 6), zeros(2, 3))["w"]
  assert (rule.axes, rule.kept) == ((1,), (0,))


def test_scan_fori_loop_while_and_dynamic_index_make_stack_axes():
  def scanned(p, x):
    def body(h, w):
      return jnp.tanh(h @ w), None

    return jax.lax.scan(body, x, jnp.moveaxis(p["w"], 1, 0))[0]  # stacked at axis 1

  def fori(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: h @ p["w"][i], x)

  def while_(p, x):
    def body(c):
      i, h = c
      return i + 1, h @ jax.lax.dynamic_index_in_dim(p["w"], i, 2, keepdims=False)

    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

  x = zeros(2, 4)
  rule = read(scanned, {"w": zeros(4, 3, 4)}, x)["w"]
  assert (rule.axes, rule.kept) == ((0,), (1,)) and "scan body, stack axis 1" in rule.how
  rule = read(fori, {"w": zeros(3, 4, 4)}, x)["w"]
  assert (rule.axes, rule.kept) == ((1,), (0,))
  rule = read(while_, {"w": zeros(4, 4, 3)}, x)["w"]
  assert (rule.axes, rule.kept) == ((0,), (2,)) and "while body" in rule.how


def test_every_sub_program_is_followed():
  @jax.custom_jvp
  def jvp_matmul(x, w):
    return x @ w

  jvp_matmul.defjvp(lambda primals, tangents: (jvp_matmul(*primals), jvp_matmul(*tangents)))

  @jax.custom_vjp
  def vjp_matmul(x, w):
    return x @ w

  vjp_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

  def fn(p, x):
    h = jax.jit(lambda x, w: x @ w)(x, p["jit"])
    h = jax.checkpoint(lambda x, w: x @ w)(h, p["remat"])
    h = jvp_matmul(h, p["jvp"]) + vjp_matmul(h, p["vjp"])
    return jax.lax.cond(h.sum() > 0, lambda: h @ p["cond"], lambda: 2 * h @ p["cond"])

  params = {k: zeros(4, 4) for k in ("jit", "remat", "jvp", "vjp", "cond")}
  rules = read(fn, params, zeros(2, 4))
  assert {k: r.axes for k, r in rules.items()} == dict.fromkeys(params, (0,))
  assert "cond branch" in rules["cond"].how


def test_shard_map_is_followed():
  mesh = jax.make_mesh((1,), ("data",))
  spec = jax.sharding.PartitionSpec

  def fn(p, x):
    inner = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=spec(), out_specs=spec())
    return inner(x, p["w"])

  rule = read(fn, {"w": zeros(4, 3)}, zeros(2, 4))["w"]
  assert rule.axes == (0,) and "shard_map" in rule.how


def test_weight_standardisation_and_weight_norm_are_followed():
  def fn(p, x):
    v = p["v"]
    w = p["g"] * v / jnp.sqrt(jnp.sum(v**2, axis=(0, 1), keepdims=True))
    s = p["s"]
    s = (s - s.mean((0, 1), keepdims=True)) / (s.std((0, 1), keepdims=True) + 1e-5)
    dn = ("NWC", "WIO", "NWC")
    y = jax.lax.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=dn)
    return jax.lax.conv_general_dilated(y, s, (1,), "SAME", dimension_numbers=dn)

  params = {"v": zeros(3, 2, 5), "g": zeros(1, 1, 5), "s": zeros(3, 5, 5)}
  rules = read(fn, params, zeros(2, 6, 2))
  assert rules["v"].axes == (0, 1) and rules["s"].axes == (0, 1)
  assert rules["g"].axes is None


# -- tables, constants, inputs and what cannot be read ----------------------


def test_lookups_by_data_are_tables_and_tied_embeddings_stay_tables():
  def fn(p, ids):
    h = p["embed"][ids] + jax.nn.one_hot(ids, 10) @ p["onehot"]
    h = h + (jax.nn.one_hot(ids, 10) * 0.5) @ p["scaled"]  # a constant keeps it a one-hot
    h = h + jnp.take(p["pos"], jnp.arange(ids.shape[1]), axis=0)  # positions: no data
    return h @ p["embed"].T

  params = {
    "embed": zeros(10, 4),
    "onehot": zeros(10, 4),
    "scaled": zeros(10, 4),
    "pos": zeros(5, 4),
  }
  rules = read(fn, params, zeros(2, 5, dtype=jnp.int32))
  assert rules["embed"].kind == "table" and rules["embed"].axes is None
  for name in ("onehot", "scaled"):
    assert rules[name].kind == "table" and "integer data" in rules[name].how, name
  assert rules["pos"].kind == "untouched"


def test_learned_tokens_are_inputs_and_their_projection_a_weight():
  def fn(p, x):
    latents = jnp.broadcast_to(p["latents"], (x.shape[0], *p["latents"].shape))
    q = latents @ p["proj"]  # Perceiver: learned queries, projected
    cls = jnp.broadcast_to(p["cls"], (x.shape[0], 1, 4))
    return jnp.concatenate([cls, x], axis=1) @ p["head"] + q.sum()

  params = {"latents": zeros(3, 4), "proj": zeros(4, 6), "cls": zeros(1, 1, 4), "head": zeros(4, 2)}
  rules = read(fn, params, zeros(2, 5, 4))
  assert rules["proj"].axes == (0,)
  assert rules["latents"].axes is None and rules["latents"].kind == "untouched"
  assert rules["cls"].axes is None and rules["head"].axes == (0,)


@pytest.mark.parametrize(
  "expand",
  [
    lambda t, n: jnp.tile(t, [n, 1, 1]),  # big_vision's MAP head
    lambda t, n: jnp.repeat(t, n, axis=0),
    lambda t, n: jnp.broadcast_to(t, (n, *t.shape[1:])),
  ],
  ids=["tile", "repeat", "broadcast_to"],
)
def test_a_learned_query_repeated_over_the_batch_is_an_input(expand):
  class MapHead(nn.Module):  # attention pooling: one learned probe attends to the tokens
    @nn.compact
    def __call__(self, x):
      probe = self.param("probe", nn.initializers.normal(), (1, 1, x.shape[-1]))
      return nn.MultiHeadDotProductAttention(num_heads=2, name="mha")(expand(probe, len(x)), x)

  rules = {r.path: r for r in optax_gc.rules_for(MapHead(), zeros(2, 5, 4))}
  assert rules["params/probe"].axes is None and rules["params/probe"].kind == "untouched"
  for name in ("query", "key", "value"):
    assert rules[f"params/mha/{name}/kernel"].axes == (0,), name
  assert rules["params/mha/out/kernel"].axes == (0, 1)


def test_an_opaque_function_of_a_weight_alone_decides_nothing_until_it_meets_data():
  """Glow's 1x1 convolution adds log|det W| to its log-likelihood: W's contraction decides.

  What an opaque kernel makes of a parameter that then multiplies the data
  (``x @ qr(a)``) cannot be read: undecided.
  """

  def fn(p, x):
    y = jnp.einsum("btc,cd->btd", x, p["w"])
    logdet = y.shape[1] * jnp.linalg.slogdet(p["w"])[1]
    q = jnp.linalg.qr(p["a"])[0]  # an orthogonal weight, parametrised
    return (y @ q).sum() + logdet

  rules = read(fn, {"w": zeros(4, 4), "a": zeros(4, 4)}, zeros(2, 5, 4))
  assert rules["w"].axes == (0,) and rules["w"].kind == "contraction"
  assert rules["a"].axes is None and rules["a"].undecided and "cannot be read" in rules["a"].how


def test_what_the_program_cannot_say_is_undecided():
  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = x_ref[...] @ w_ref[...]

  def fn(p, x):
    h = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((2, 4), x.dtype), interpret=True)(
      x, p["pallas"]
    )
    h = h @ p["tied"] @ p["tied"].T  # one use sums axis 0, the other axis 1
    h = h @ (p["a"] @ p["b"])  # a factorised weight: each factor meets only the other
    basis = jnp.cos(jnp.arange(4.0)[:, None] * jnp.arange(4.0))  # a fixed cosine basis
    h = h @ (basis @ p["const"])  # contracted with a constant before the data
    return h

  params = {k: zeros(4, 4) for k in ("pallas", "tied", "a", "b", "const", "unread")}
  params["pallas"] = zeros(3, 4)
  rules = read(fn, params, zeros(2, 3))
  for name in ("pallas", "tied", "a", "b", "const"):
    assert rules[name].kind == "conflict" and rules[name].axes is None, name
  assert "pallas_call" in rules["pallas"].how and "disagree" in rules["tied"].how
  assert rules["unread"].kind == "unread"
  with pytest.raises(ValueError) as e:
    optax_gc.centralize(optax_gc.rules_for(fn, params, zeros(2, 3)), strict=True).init(params)
  for name in ("pallas", "tied", "a", "b", "const", "unread"):
    assert f"'{name}' (" in str(e.value)


def test_uses_under_stop_gradient_or_integers_decide_only_when_alone():
  def fn(p, x):
    sigma = jax.lax.stop_gradient(jnp.linalg.norm(x @ p["w"].T))  # a power-iteration-like use
    route = jnp.argmax(x @ p["router"].T, axis=-1)  # reaches the output as integers only
    return (x @ p["w"]) / sigma + jax.nn.one_hot(route, 4) @ jnp.ones((4, 4)) + x @ p["router"]

  rules = read(fn, {"w": zeros(4, 4), "router": zeros(4, 4)}, zeros(2, 4))
  assert rules["w"].axes == (0,) and rules["router"].axes == (0,)

  def alone(p, x):
    return jax.lax.stop_gradient(x @ p["w"])

  assert read(alone, {"w": zeros(4, 3)}, zeros(2, 4))["w"].axes == (0,)


def test_roles_are_disjoint_and_cover_every_axis_of_a_contracted_leaf():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      x = nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False)(x)
      return nn.Conv(4, (3,), feature_group_count=2, use_bias=False)(x), None

  stack = nn.scan(Block, variable_axes={"params": 2}, split_rngs={"params": True}, length=3)
  rules = optax_gc.rules_for(stack(), zeros(2, 5, 4), None)
  assert len(rules) == 5
  for rule in rules:
    roles = (set(rule.axes), set(rule.fan_out), set(rule.kept))
    assert roles[0] and roles[1] and not (roles[0] & roles[1] | roles[0] & roles[2]), rule
    assert set().union(*roles) == set(range(len(rule.shape))) and 2 in roles[2], rule


# -- the adapters -------------------------------------------------------------


class SquareBlock(nn.Module):
  use_bias: bool

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(8, use_bias=self.use_bias, name="square")(x)
    return x + nn.Dense(16, use_bias=self.use_bias, name="wide")(h)[..., :8], None


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_linen_scan_at_any_axis_even_when_every_axis_has_the_same_size(axis):
  stack = nn.scan(
    SquareBlock, variable_axes={"params": axis}, split_rngs={"params": True}, length=8
  )
  stack = functools.partial(stack, use_bias=axis < 2)  # a bias (8,) has no axis 2
  rules = {r.path: r for r in optax_gc.rules_for(stack(), zeros(2, 8), None)}
  kernel = rules["params/square/kernel"]
  assert kernel.shape == (8, 8, 8)
  per_layer = [a for a in range(3) if a != axis]
  assert kernel.axes == (per_layer[0],) and kernel.kept == (axis,)
  assert f"stack axis {axis}" in kernel.how


def test_linen_nn_jit_and_remat_are_read_after_init():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.jit(nn.Dense)(5, name="jitted")(x)
      return nn.remat(nn.Dense)(3, name="remat")(x)

  rules = optax_gc.rules_for(Net(), zeros(2, 4))
  plan = optax_gc.explain(jax.eval_shape(Net().init, KEY, zeros(2, 4)), rules, preset=None)
  assert plan["params/jitted/kernel"].axes == (0,) and plan["params/remat/kernel"].axes == (0,)


def test_linen_map_variables_applied_as_its_users_apply_it():
  """``nn.map_variables(..., init=True)`` (weight standardisation, as flax's docs show it)
  runs ``init`` again whenever any collection is mutable: the model is applied with none."""

  def standardise(variables):
    def one(k):
      axes = tuple(range(k.ndim - 1))
      return (k - k.mean(axes)) / (k.std(axes) + 1e-5) if k.ndim > 1 else k

    return jax.tree.map(one, variables)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = nn.map_variables(nn.Conv, "params", trans_in_fn=standardise, init=True)
      return nn.Dense(3, name="head")(conv(4, (3, 3), name="ws")(x).mean((1, 2)))

  rules = {r.path: r for r in optax_gc.rules_for(Net(), zeros(2, 6, 6, 2))}
  assert rules["params/ws/kernel"].axes == (0, 1, 2) and rules["params/head/kernel"].axes == (0,)
  # mutable= goes to apply alone (init takes its own).
  rules = {r.path: r for r in optax_gc.rules_for(Net(), zeros(2, 6, 6, 2), mutable=False)}
  assert rules["params/ws/kernel"].axes == (0, 1, 2)


def test_linen_rules_match_every_tree_form_with_dropout_and_batch_norm():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(6)(x)
      x = nn.Dropout(0.5, deterministic=not train)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      return nn.Dense(3)(x)

  x = jnp.ones((2, 5))
  rngs = {"params": KEY, "dropout": KEY}
  rules = optax_gc.rules_for(Net(), x, train=True, rngs=rngs)
  variables = jax.eval_shape(lambda: Net().init(rngs, x, train=True))
  whole = axes_of(optax_gc.explain(variables, rules, preset=None))
  params = axes_of(optax_gc.explain(variables["params"], rules, preset=None))
  assert whole["params/Dense_0/kernel"] == params["Dense_0/kernel"] == (0,)
  assert whole["batch_stats/BatchNorm_0/mean"] is None
  assert {p.removeprefix("params/"): a for p, a in whole.items() if p.startswith("params/")} == (
    params
  )


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)
    self.wide = nnx.Linear(4, 6, rngs=rngs)

  def __call__(self, x):
    return self.wide(self.lin(x))[..., :4]


def nnx_stack(out_axis=0, length=4):
  @nnx.vmap(in_axes=0, out_axes=nnx.StateAxes({nnx.Param: out_axis, ...: 0}))
  def make(key):
    return NnxBlock(nnx.Rngs(key))

  return make(jax.random.split(KEY, length))


def run_nnx_stack(model, x, axis=0):
  @nnx.scan(in_axes=(nnx.StateAxes({nnx.Param: axis, ...: 0}), nnx.Carry), out_axes=nnx.Carry)
  def body(block, h):
    return block(h)

  return body(model, x)


@pytest.mark.parametrize("axis", [0, 1])
def test_nnx_vmap_stack_applied_by_nnx_scan(axis):
  model = nnx_stack(out_axis=axis)
  rules = optax_gc.rules_for(model, zeros(3, 4), method=lambda m, x: run_nnx_stack(m, x, axis))
  plan = optax_gc.explain(nnx.state(model, nnx.Param), rules)
  per_layer = {"lin/kernel": 0, "wide/kernel": 0}
  for path, a in per_layer.items():
    assert plan[path].axes == (a if a < axis else a + 1,), plan[path]
  assert plan["lin/bias"].axes is None and not plan.undecided


def test_nnx_rules_match_state_pure_dict_and_the_optimizer():
  model = nnx_stack()
  x = jax.random.normal(KEY, (3, 4))
  rules = optax_gc.rules_for(model, x, method=run_nnx_stack)
  state = nnx.state(model, nnx.Param)
  expected = {"lin/kernel": (1,), "lin/bias": None, "wide/kernel": (1,), "wide/bias": None}
  assert axes_of(optax_gc.explain(state, rules, preset=None)) == expected
  assert axes_of(optax_gc.explain(nnx.to_pure_dict(state), rules, preset=None)) == expected
  # nnx.Optimizer: init on Variables, update on plain arrays, one GC step under SGD.
  tx = optax.chain(optax_gc.centralize(rules, preset=None, strict=True), optax.sgd(1.0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def loss(m):
    return jnp.sum(jnp.sin(run_nnx_stack(m, x)))

  grads = flat(nnx.to_pure_dict(nnx.grad(loss)(model)))
  optimizer.update(model, nnx.grad(loss)(model))
  after = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  for path, axes in expected.items():
    step = np.asarray(after[path], np.float64) - np.asarray(before[path], np.float64)
    np.testing.assert_allclose(step, -np_centre(grads[path], axes), atol=1e-5, err_msg=path)


def test_equinox_filter_vmap_stack_applied_by_scan():
  model = eqx.filter_vmap(lambda k: eqx.nn.Linear(3, 3, key=k))(jax.random.split(KEY, 4))
  params, static = eqx.partition(model, eqx.is_array)

  def run(model, x):
    def body(h, p):
      return eqx.combine(p, static)(h), None

    return jax.lax.scan(body, x, eqx.filter(model, eqx.is_array))[0]

  rules = optax_gc.rules_for(model, zeros(3), method=run)
  plan = optax_gc.explain(eqx.filter(model, eqx.is_inexact_array), rules)
  assert axes_of(plan) == {"weight": (2,), "bias": None}  # no preset needed


def test_haiku_through_the_function_form():
  def forward(x):
    x = jax.nn.relu(hk.Conv2D(4, 3)(x))
    return hk.Linear(2)(x.mean((1, 2)))

  model = hk.transform(forward)
  x = zeros(2, 6, 6, 3)
  params = jax.eval_shape(model.init, KEY, x)
  plan = optax_gc.explain(params, optax_gc.rules_for(model.apply, params, None, x))
  assert plan["conv2_d/w"].axes == (0, 1, 2) and plan["linear/w"].axes == (0,)
  assert plan["linear/b"].axes is None


def test_rules_for_only_reads_the_model():
  model = nnx_stack()
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  optax_gc.rules_for(model, jnp.ones((3, 4)), method=run_nnx_stack)
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_bad_calls_say_what_to_pass():
  lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"needs its inputs.*rules_for\(model, jnp.ones"):
    optax_gc.rules_for(lin)
  with pytest.raises(TypeError, match=r"rules_for\(model.apply, params, None, x\)"):
    optax_gc.rules_for(hk.transform(lambda x: hk.Linear(3)(x)))
  with pytest.raises(TypeError, match=r"rngs= is linen's"):
    optax_gc.rules_for(lin, zeros(1, 3), rngs=KEY)
  with pytest.raises(TypeError, match=r"give the parameters the function takes first"):
    optax_gc.rules_for(lambda p, x: x)
  rules = optax_gc.rules_for(lin, zeros(2, 3))
  with pytest.raises(ValueError, match=r"'kernel' has shape \(5, 4\).*\(3, 4\)"):
    optax_gc.explain({"kernel": jnp.ones((5, 4))}, rules)
  strict = optax_gc.centralize(rules, preset=None, strict=True)
  with pytest.raises(ValueError, match=r"rules_for: matched no leaf"):
    strict.init({"other": jnp.ones(3)})


def test_an_equinox_call_that_fails_says_how_equinox_models_are_traced():
  """A batch to a per-example module, or a stateful module without its state."""
  mlp = eqx.nn.MLP(3, 2, 4, 1, key=KEY)
  with pytest.raises(TypeError) as e:
    optax_gc.rules_for(mlp, zeros(5, 3))
  assert "method=lambda m, x: jax.vmap(m)(x)" in "\n".join(e.value.__notes__)
  bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")
  with pytest.raises(TypeError) as e:
    optax_gc.rules_for(bn, zeros(4))
  assert "rules_for(eqx.nn.inference_mode(model), x, state)" in "\n".join(e.value.__notes__)
  rules = optax_gc.rules_for(eqx.nn.inference_mode(bn), zeros(4), state)
  assert {r.path: r.axes for r in rules} == {"weight": None, "bias": None}
  # As the note says, a batch through vmap.
  rules = optax_gc.rules_for(mlp, zeros(5, 3), method=lambda m, x: jax.vmap(m)(x))
  assert {r.path: r.axes for r in rules}["layers/0/weight"] == (1,)


def test_user_rules_come_first_and_explain_names_the_operation():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("W", nn.initializers.lecun_normal(), (3, x.shape[-1]))
      return nn.Dense(4)(x @ w.T)  # stored (out, in)

  x = zeros(2, 5)
  rules = optax_gc.rules_for(Custom(), x)
  params = jax.eval_shape(Custom().init, KEY, x)
  plan = optax_gc.explain(params, rules)
  assert plan["params/W"].axes == (1,) and plan["params/W"].decided_by == "dot_general"
  mine = optax_gc.explain(params, [(r"Dense_0/kernel$", None), *rules])
  assert mine["params/Dense_0/kernel"].axes is None
  assert repr(rules).startswith("LayerRules(") and len(str(rules).splitlines()) == len(rules)


def test_conv_only_preset_filters_derived_rules():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.Conv(4, (3,))(x))

  x = zeros(1, 6, 2)
  rules = optax_gc.rules_for(Net(), x)
  params = jax.eval_shape(Net().init, KEY, x)
  plan = axes_of(optax_gc.explain(params, rules, preset="flax_conv"))
  assert plan["params/Conv_0/kernel"] == (0, 1) and plan["params/Dense_0/kernel"] is None


# -- the presets, without a model --------------------------------------------


def test_linen_logical_names_settle_a_stack_for_the_preset():
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
  variables = jax.eval_shape(stack().init, KEY, zeros(2, 8), None)
  box = variables["params"]["Dense_0"]["kernel"]
  assert box.names == ("embed", "layers", "mlp") and box.value.shape == (8, 8, 8)
  row = optax_gc.explain(variables)["params/Dense_0/kernel"]
  assert row.axes == (0,) and not row.guess
  # The gradients of boxed parameters are boxed too: update sees the same names.
  g = jax.tree.map(lambda s: jnp.asarray(np.random.default_rng(0).normal(size=s.shape)), variables)
  out = optax_gc.centralize().update(g, optax.EmptyState())[0]
  kernel = g["params"]["Dense_0"]["kernel"].value
  np.testing.assert_allclose(
    out["params"]["Dense_0"]["kernel"].value, np_centre(kernel, (0,)), atol=1e-6
  )


def test_preset_decides_the_same_on_nnx_variables_and_plain_arrays():
  """nnx.Optimizer calls init on Variables and update on arrays: both get one decision, and
  a transform that never saw init (inject_hyperparams, a restored one) decides the same."""

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

  state = nnx.state(make(jax.random.split(KEY, 3)), nnx.Param)
  plain = nnx.to_pure_dict(state)
  row, plain_row = optax_gc.explain(state)["lin/kernel"], optax_gc.explain(plain)["lin/kernel"]
  assert (row.axes, row.guess) == (plain_row.axes, plain_row.guess) and row.guess
  with pytest.raises(ValueError, match=r"'lin/kernel' \(5, 3, 6\) float32: guessed"):
    optax_gc.centralize(strict=True).init(state)
  g = {"lin": {"kernel": np.random.default_rng(0).normal(size=(5, 3, 6)).astype(np.float32)}}
  fresh = optax_gc.centralize().update(g, optax.EmptyState())[0]
  initialised = optax_gc.centralize()
  initialised.init(state)
  np.testing.assert_array_equal(
    fresh["lin"]["kernel"], initialised.update(g, None)[0]["lin"]["kernel"]
  )


def test_preset_leaves_unknown_names_and_contradicted_layouts_unchanged_and_says_so():
  tree = {
    "gating_einsum": zeros(2, 4, 8),  # a name the preset does not know
    "custom": {"kernel": zeros(3, 5), "bias": zeros(3)},  # bias fits axis 0: stored (out, in)
    "conv": {"kernel": zeros(3, 4, 5), "bias": zeros(7)},  # a bias that fits no split
    "gru": {"weight_ih": zeros(12, 4)},  # torch names
    "lin": {"kernel": zeros(4, 3), "bias": zeros(3)},
    "norm": {"scale": zeros(3)},
    "cls_token": zeros(1, 3),
  }
  plan = optax_gc.explain(tree)
  undecided = {r.path for r in plan.undecided}
  assert undecided == {
    "gating_einsum",
    "custom/kernel",
    "conv/kernel",
    "gru/weight_ih",
    "cls_token",
  }
  assert all(plan[p].axes is None for p in undecided)
  assert plan["lin/kernel"].axes == (0,) and plan["norm/scale"].axes is None
  assert "?" in str(plan).splitlines()[-1]
  with pytest.raises(ValueError, match=r"'gating_einsum' \(2, 4, 8\) float32: undecided"):
    optax_gc.centralize(strict=True).init(tree)
  torch = optax_gc.explain(tree, preset="torch")
  assert "gru/weight_ih" in {r.path for r in torch.undecided}


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


def test_relative_position_table_read_through_a_one_hot_of_positions_is_a_table():
  """T5-style: buckets of relative positions (integers, no data), one-hot, contracted."""

  def fn(p, x):
    pos = jnp.arange(x.shape[1])
    buckets = jnp.clip(pos[None, :] - pos[:, None], -3, 3) + 3
    bias = jnp.einsum("hb,qkb->hqk", p["rel"], jax.nn.one_hot(buckets, 7))
    return jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", x, x)[:, None] + bias)

  rules = read(fn, {"rel": zeros(2, 7)}, zeros(2, 5, 4))
  assert rules["rel"].kind == "table" and rules["rel"].axes is None


def test_features_computed_from_integer_data_are_data_not_a_one_hot():
  """A diffusion model's sinusoidal embedding of an integer timestep, then a Dense."""

  def fn(p, x, t):
    freqs = jnp.exp(-jnp.arange(4.0))
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], axis=-1)
    return x @ p["w"] + emb @ p["time"]

  rules = read(fn, {"w": zeros(3, 5), "time": zeros(8, 5)}, zeros(2, 3), zeros(2, dtype=jnp.int32))
  assert rules["time"].kind == "contraction" and rules["time"].axes == (0,)


def test_explain_shows_the_roles_rules_for_read():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.MultiHeadDotProductAttention(num_heads=2)(x), None

  stack = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
  x = zeros(2, 5, 4)
  params = jax.eval_shape(stack().init, KEY, x, None)
  plan = optax_gc.explain(params, optax_gc.rules_for(stack(), x, None), roles=True)
  out = plan["params/MultiHeadDotProductAttention_0/out/kernel"]  # (heads, L, head_dim, d)
  assert (out.axes, out.fan_out, out.kept) == ((0, 2), (3,), (1,))
  bias = plan["params/MultiHeadDotProductAttention_0/out/bias"]
  assert bias.fan_out is None and bias.kept is None
  header = str(plan).splitlines()[0].split()
  assert header[4:6] == ["fan-out", "kept"]
  assert "fan-out" not in str(optax_gc.explain(params))
