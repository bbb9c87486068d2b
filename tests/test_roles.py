"""Axis roles exported to other optimizers: Muon, GaLore, Adafactor's moment, PSGD, muP.

The block of test_stacks.py (attention with DenseGeneral projections, a conv,
a Dense) is built as L separately named layers and stacked by nn.scan at axes
0, 1 and 2, by nnx.vmap and by eqx.filter_vmap. The same per-layer gradients
go to the unrolled model and, stacked along the stack axis, to the stacked
one: Muon with the exported dimension numbers and the factored second moment
must give each layer of the stack the update the unrolled layer gets. The
unrolled updates are checked against NumPy float64 references written from
the hand tables of test_stacks.py (matrices built by transposing and
reshaping, not by the keepdims reductions the library uses).
"""

import functools
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import flat
from optax.contrib import GaLoreDimensionNumbers, MuonDimensionNumbers
from test_stacks import KEY, STACKED, UNROLLED, L, Model

import optax_gc

LR = 0.1
# One Newton-Schulz step already couples every entry of a matrix (its Frobenius norm, X X^T X)
# and compiles in half the time of optax's five.
NS_STEPS = 1
# Stacked models (test_stacks.py) and the unrolled model each must agree with.
PAIRS = [
  item
  for item in STACKED
  if item[0].name
  in (
    "linen_scan_axis0_no_bias",
    "linen_scan_axis1_no_bias",
    "linen_scan_axis2_no_bias",
    "nnx_vmap_scan_axis1",
    "eqx_filter_vmap_lax_scan",
  )
]
UNROLLED_USED = [UNROLLED[name] for name in ("linen_no_bias", "nnx", "equinox")]


def _id(item):
  return item[0].name if isinstance(item, tuple) else item.name


@functools.cache
def _rules(model: Model):
  net, inputs = model.built
  return optax_gc.rules_for(net, *inputs)


@functools.cache
def _tree(model: Model):
  tree = model.params()
  return nnx.to_pure_dict(tree) if model.framework == "nnx" else tree


def _exports(tree) -> dict:
  """{path: exported value} as helpers.flat names paths, keeping None and tuples whole."""
  is_leaf = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
  out = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath]
    out["/".join(names[:-1] if names[-1:] == ["value"] else names)] = leaf
  return out


def _hand_roles(model: Model, rel: str, ndim: int):
  """(fan-in, fan-out) of one unrolled layer's leaf from the hand table; None if not contracted."""
  fan_in = model.table[rel]
  if fan_in is None:
    return None
  return tuple(fan_in), tuple(a for a in range(ndim) if a not in fan_in)


def _unrolled_grads(model: Model, seed: int):
  """Random float32 gradients for every leaf of the unrolled model, as {path: array}."""
  rng = np.random.default_rng(seed)
  return {
    p: rng.standard_normal(np.shape(x)).astype(np.float32) for p, x in flat(_tree(model)).items()
  }


def _as_tree(model: Model, by_path: dict):
  tree = _tree(model)
  return jax.tree.unflatten(jax.tree.structure(tree), [by_path[p] for p in flat(tree)])


def _stacked(stacked: Model, unrolled: Model, by_path: dict) -> dict:
  """The unrolled layers' arrays, stacked along the stack axis under the stacked model's paths."""
  prefix = stacked.prefix + "/"
  return {
    p: np.stack(
      [by_path[f"{unrolled.layer(i)}/{p[len(prefix) :]}"] for i in range(L)], stacked.axis
    )
    for p in flat(_tree(stacked))
  }


def _steps(tx, params, grads: list) -> list[dict]:
  """{path: update} after each step of ``tx``: init and the steps compiled as one program."""

  def run(params, grads):
    state, out = tx.init(params), []
    for g in grads:
      updates, state = tx.update(g, state, params)
      out.append(updates)
    return out

  return [flat(updates, numpy=True) for updates in jax.jit(run)(params, grads)]


def _run(tx, model: Model, grads_seq: list[dict], params: dict) -> list[dict]:
  return _steps(tx, _as_tree(model, params), [_as_tree(model, g) for g in grads_seq])


def _layer_errors(stacked: Model, unrolled: Model, got: dict, want: dict) -> dict:
  """{path: largest error of a layer relative to its largest entry} of stacked vs unrolled."""
  prefix = stacked.prefix + "/"
  errors = {}
  for p, x in got.items():
    for i in range(L):
      ref = np.asarray(want[f"{unrolled.layer(i)}/{p[len(prefix) :]}"], np.float64)
      layer = np.take(np.asarray(x, np.float64), i, axis=stacked.axis)
      errors[f"{p}[{i}]"] = float(np.max(np.abs(layer - ref)) / np.max(np.abs(ref)))
  return errors


# ------------------------------------------------------ NumPy references ---


def _as_matrix(x, fan_in, fan_out):
  moved = np.transpose(x, (*fan_in, *fan_out))
  rows = math.prod(x.shape[a] for a in fan_in)
  return moved.reshape(rows, -1), moved.shape


def _from_matrix(m, shape, fan_in, fan_out):
  return np.transpose(m.reshape(shape), np.argsort((*fan_in, *fan_out)))


def np_newton_schulz(m, coeffs=(3.4445, -4.7750, 2.0315), steps=NS_STEPS, eps=1e-8):
  """Muon's quintic Newton-Schulz iteration on one matrix, in float64."""
  x = m.T if m.shape[0] > m.shape[1] else m
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = coeffs
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if m.shape[0] > m.shape[1] else x


def np_muon(grads, roles, beta=0.95):
  """optax.contrib.muon's updates (Nesterov) of one leaf whose layer is one matrix."""
  mu, out = 0.0, []
  for t, g in enumerate(grads, 1):
    g = np.asarray(g, np.float64)
    mu = beta * mu + (1 - beta) * g
    mu_hat = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
    m, shape = _as_matrix(mu_hat, *roles)
    o = np_newton_schulz(m) * np.sqrt(max(1.0, m.shape[1] / m.shape[0]))
    out.append(-LR * _from_matrix(o, shape, *roles))
  return out


def np_factored(grads, roles, clip=None, eps=1e-30):
  """Adafactor's factored second-moment scaling of one layer's leaf, as a 2-D matrix."""
  row = col = full = 0.0
  out = []
  for t, g in enumerate(grads):
    g = np.asarray(g, np.float64)
    decay = 1 - (t + 1) ** -0.8
    if roles is None:
      full = decay * full + (1 - decay) * (g**2 + eps)
      u = g / np.sqrt(full)
    else:
      m, shape = _as_matrix(g, *roles)
      row = decay * row + (1 - decay) * np.mean(m**2 + eps, axis=1)
      col = decay * col + (1 - decay) * np.mean(m**2 + eps, axis=0)
      u = _from_matrix(m / np.sqrt(np.outer(row, col) / np.mean(row)), shape, *roles)
    if clip is not None:
      u = u / max(1.0, np.sqrt(np.mean(u**2)) / clip)
    out.append(u)
  return out


# ---------------------------------------------------------------- roles ---


@pytest.mark.parametrize("model", UNROLLED_USED, ids=_id)
def test_each_unrolled_layers_exports_are_its_hand_written_roles(model):
  tree = _tree(model)
  rules = _rules(model)
  exports = {
    "muon": _exports(optax_gc.muon_dimension_numbers(rules)(tree)),
    "galore": _exports(optax_gc.galore_dimension_numbers(rules)(tree)),
    "sizes": _exports(optax_gc.fan_sizes(rules)(tree)),
    "scanned": _exports(optax_gc.scanned_layers(rules)(tree)),
  }
  shapes = {p: np.shape(x) for p, x in flat(tree).items()}
  for i in range(L):
    prefix = model.layer(i) + "/"
    for rel in model.table:
      path, shape = prefix + rel, shapes[prefix + rel]
      roles = _hand_roles(model, rel, len(shape))
      sizes = None if roles is None else tuple(math.prod(shape[a] for a in r) for r in roles)
      assert exports["muon"][path] == (roles and MuonDimensionNumbers(*roles)), path
      assert exports["galore"][path] == (roles and GaLoreDimensionNumbers(*roles)), path
      assert exports["sizes"][path] == sizes, path
      assert exports["scanned"][path] is False, path


def test_every_contracted_kernels_roles_are_disjoint_nonempty_and_cover_its_axes():
  models = [*UNROLLED_USED, *(item[0] for item in PAIRS)]
  contracted = [r for m in models for r in _rules(m) if r.kind == "contraction"]
  contracted += [r for r in _decoder_rules() if r.kind == "contraction"]
  assert len(contracted) > 40
  for rule in contracted:
    roles = [set(rule.axes or ()), set(rule.fan_out), set(rule.kept)]
    assert roles[0] and roles[1], rule
    assert sum(map(len, roles)) == len(rule.shape), rule
    assert set.union(*roles) == set(range(len(rule.shape))), rule


def _muon_exported(model: Model):
  numbers = optax_gc.muon_dimension_numbers(_rules(model))
  return optax.contrib.muon(LR, ns_steps=NS_STEPS, muon_weight_dimension_numbers=numbers)


def _factored(model: Model):
  return optax_gc.scale_by_factored_rms(_rules(model), min_dim_size_to_factor=1)


TRANSFORMS = {"muon": _muon_exported, "factored": _factored, "adamw": lambda _: optax.adamw(LR)}
# The gradients of each step, then the params. Muon and AdamW keep per-element state; the
# factored statistics are read back at the second step (the first step's decay is 0).
SEEDS = {"muon": (1, 3), "factored": (4, 5, 6), "adamw": (1, 3)}


def _inputs(unrolled: Model, kind: str):
  *steps, params = (_unrolled_grads(unrolled, seed) for seed in SEEDS[kind])
  return steps, params


@functools.cache
def _unrolled_updates(unrolled: Model, kind: str) -> list[dict]:
  """The unrolled model's updates, shared by every stack of its layers."""
  grads, params = _inputs(unrolled, kind)
  return _run(TRANSFORMS[kind](unrolled), unrolled, grads, params)


def _stacked_updates(stacked: Model, unrolled: Model, kind: str, tx=None) -> list[dict]:
  grads, params = _inputs(unrolled, kind)
  stack = functools.partial(_stacked, stacked, unrolled)
  tx = TRANSFORMS[kind](stacked) if tx is None else tx
  return _run(tx, stacked, [stack(g) for g in grads], stack(params))


def _assert_each_layer_agrees(item, kind: str):
  stacked, unrolled = item[0], UNROLLED[item[1]]
  want = _unrolled_updates(unrolled, kind)
  got = _stacked_updates(stacked, unrolled, kind)
  for step in range(len(got)):
    errors = _layer_errors(stacked, unrolled, got[step], want[step])
    assert max(errors.values()) < 1e-5, (step, errors)


@pytest.mark.parametrize("item", PAIRS, ids=_id)
def test_muon_gives_each_layer_of_a_stack_its_own_update_and_adamw_does_too(item):
  _assert_each_layer_agrees(item, "muon")
  _assert_each_layer_agrees(item, "adamw")  # the control: elementwise
  stacked, unrolled = item[0], UNROLLED[item[1]]
  # Muon's default (2-D leaves to Muon, the rest to Adam) does not keep the layers apart.
  default = _stacked_updates(stacked, unrolled, "muon", optax.contrib.muon(LR, ns_steps=NS_STEPS))
  errors = _layer_errors(stacked, unrolled, default[0], _unrolled_updates(unrolled, "muon")[0])
  assert max(errors.values()) > 0.5, errors


@pytest.mark.parametrize("item", PAIRS, ids=_id)
def test_factored_rms_gives_each_layer_of_a_stack_its_own_update(item):
  _assert_each_layer_agrees(item, "factored")


@pytest.mark.parametrize("model", UNROLLED_USED, ids=_id)
def test_unrolled_updates_are_numpy_muon_and_adafactor_of_each_layers_matrix(model):
  shapes = {p: np.shape(x) for p, x in flat(_tree(model)).items()}
  for kind, reference in (("muon", np_muon), ("factored", np_factored)):
    grads, _ = _inputs(model, kind)
    got = _unrolled_updates(model, kind)
    for i in range(L):
      for rel in model.table:
        path = f"{model.layer(i)}/{rel}"
        roles = _hand_roles(model, rel, len(shapes[path]))
        if roles is None and kind == "muon":
          continue  # Muon's Adam: the same in every layout (the adamw control)
        want = reference([g[path] for g in grads], roles)
        for step in range(len(grads)):
          np.testing.assert_allclose(
            got[step][path], want[step], rtol=1e-5, atol=1e-5 * np.max(np.abs(want[step]))
          )


def test_factored_rms_clips_each_layer_of_a_stack_as_its_own_block():
  """A stack at axis 1 longer than the layer: optax's factoring takes the stack as an axis."""
  layers, d = 6, 4

  def fn(p, x):
    return jax.lax.scan(lambda h, w: (h @ w, None), x, jnp.moveaxis(p["w"], 1, 0))[0]

  params = {"w": np.zeros((d, layers, d), np.float32)}
  rules = optax_gc.rules_for(fn, params, jax.ShapeDtypeStruct((2, d), jnp.float32))
  rng = np.random.default_rng(7)
  first = rng.standard_normal((d, layers, d))
  # Each layer's gradient changes scale differently at the second step: RMS per layer differs.
  second = rng.standard_normal((d, layers, d)) * np.logspace(-1, 1, layers)[:, None]
  grads = [{"w": g.astype(np.float32)} for g in (first, second)]

  def run(tx):
    return [u["w"].astype(np.float64) for u in _steps(tx, params, grads)]

  clip = 0.9
  got = run(
    optax_gc.scale_by_factored_rms(rules, min_dim_size_to_factor=1, clipping_threshold=clip)
  )
  own = run(optax.adafactor(1.0, min_dim_size_to_factor=1, multiply_by_parameter_scale=False))
  rms = []
  for i in range(layers):
    layer_grads = [g[:, i] for g in (first, second)]
    want = np_factored(layer_grads, ((0,), (1,)), clip)
    for step in range(2):
      np.testing.assert_allclose(got[step][:, i], want[step], rtol=1e-5, atol=1e-6)
    rms.append(np.sqrt(np.mean(np_factored(layer_grads, ((0,), (1,)))[1] ** 2)))
    # optax.adafactor (its update negated back): the layers mixed in its statistics.
    assert np.max(np.abs(-own[1][:, i] - want[1])) > 0.1 * np.max(np.abs(want[1])), i
  assert min(rms) < clip < max(rms)  # some layers clipped, some not: one block would differ


def _attention_kernel(d_model, layers, heads, head_dim):
  """Rules and the abstract params of a stacked query kernel (d_model, layers, heads, head_dim)."""

  def fn(p, x):
    def layer(h, w):
      return jnp.einsum("bd,dhk->bhk", h, w).reshape(h.shape), None

    return jax.lax.scan(layer, x, jnp.moveaxis(p["query"], 1, 0))[0]

  params = {"query": jax.ShapeDtypeStruct((d_model, layers, heads, head_dim), jnp.float32)}
  x = jax.ShapeDtypeStruct((2, d_model), jnp.float32)
  return optax_gc.rules_for(fn, params, x), params


def _state_size(tx, params) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


def test_factored_state_of_a_stacked_attention_kernel_is_fan_in_plus_fan_out_per_layer():
  d_model, layers, heads, head_dim = 1024, 24, 16, 64
  rules, params = _attention_kernel(d_model, layers, heads, head_dim)
  (rule,) = rules
  assert (rule.axes, rule.fan_out, rule.kept) == ((0,), (2, 3), (1,))
  ours = _state_size(optax_gc.scale_by_factored_rms(rules), params)
  assert ours == (d_model + heads * head_dim) * layers + 2  # and the count and v's placeholder
  full = d_model * layers * heads * head_dim
  assert _state_size(optax.adafactor(1e-3), params) >= full  # head_dim < 128: not factored
  factored = _state_size(optax.adafactor(1e-3, min_dim_size_to_factor=32), params)
  assert factored > 8 * ours  # d_model against head_dim: per layer and head


# --------------------------------------------------------------- GaLore ---


def test_galore_takes_unstacked_kernels_and_names_a_stacked_one_it_cannot_express():
  unrolled = UNROLLED["linen_no_bias"]
  tree = _tree(unrolled)
  numbers = optax_gc.galore_dimension_numbers(_rules(unrolled))
  tx = optax.contrib.galore(LR, rank=2, weight_dimension_numbers=numbers)
  state = jax.eval_shape(tx.init, tree)
  projector = flat(optax.tree.get(state, "projector"))
  assert projector["layers_0/query/kernel"].shape == (4, 2)  # (D, heads * head_dim), rank 2
  assert projector["layers_0/q_norm/scale"].shape == (0, 0)  # not projected

  stacked = next(item[0] for item in PAIRS if item[0].name == "linen_scan_axis1_no_bias")
  with pytest.raises(ValueError) as e:
    optax_gc.galore_dimension_numbers(_rules(stacked))(_tree(stacked))
  message = str(e.value)
  assert "'layers/conv/kernel'" in message and "kept (1,)" in message and "*rules]" in message


# ----------------------------------------------------------------- PSGD ---


def test_scanned_layers_flags_a_stack_at_axis_0_and_refuses_another_axis():
  at_0 = next(item[0] for item in STACKED if item[0].name == "nnx_vmap_scan_axis0")
  flags = flat(optax_gc.scanned_layers(_rules(at_0))(_tree(at_0)))
  assert flags["layers/attn/query/kernel"] is True and flags["layers/conv/kernel"] is True
  # A stacked bias or norm scale is a stack of layers too: flagged with its kernels.
  assert flags["layers/attn/query/bias"] is True
  assert all(flags.values()), [p for p, f in flags.items() if not f]

  at_1 = next(item[0] for item in STACKED if item[0].name == "nnx_vmap_scan_axis1")
  with pytest.raises(
    ValueError, match=r"'layers/attn/key/bias' \(2, 2, 2\) keeps axes \(1,\).*'params': 0"
  ):
    optax_gc.scanned_layers(_rules(at_1))(_tree(at_1))


# ------------------------------------------------------------------ muP ---


@pytest.mark.parametrize("item", PAIRS, ids=_id)
def test_fan_sizes_of_a_stack_are_one_layers(item):
  stacked, unrolled = item[0], UNROLLED[item[1]]
  got = _exports(optax_gc.fan_sizes(_rules(stacked))(_tree(stacked)))
  want = _exports(optax_gc.fan_sizes(_rules(unrolled))(_tree(unrolled)))
  prefix = stacked.prefix + "/"
  for path, sizes in got.items():
    assert sizes == want[f"{unrolled.layer(0)}/{path[len(prefix) :]}"], path


# -------------------------------------------------------------- checks ---


def test_exporters_check_their_rules_patterns_and_leaves():
  unrolled = UNROLLED["linen_no_bias"]
  rules, tree = _rules(unrolled), _tree(unrolled)
  for export in (
    optax_gc.muon_dimension_numbers,
    optax_gc.galore_dimension_numbers,
    optax_gc.scanned_layers,
    optax_gc.fan_sizes,
    optax_gc.scale_by_factored_rms,
  ):
    with pytest.raises(ValueError, match="no rule from optax_gc.rules_for"):
      export([(r"kernel$", (0,))])
  with pytest.raises(ValueError, match=r"adam\[1\]: invalid regular expression '\('"):
    optax_gc.muon_dimension_numbers(rules, adam=[r"mlp", "("])
  with pytest.raises(ValueError, match="adam='mlp'"):
    optax_gc.muon_dimension_numbers(rules, adam="mlp")
  with pytest.raises(ValueError, match=r"adam\[0\] 'mpl/kernel\$' matched no leaf"):
    optax_gc.muon_dimension_numbers(rules, adam=[r"mpl/kernel$"])(tree)
  numbers = _exports(optax_gc.muon_dimension_numbers(rules, adam=[r"layers_1/mlp/kernel$"])(tree))
  assert numbers["layers_1/mlp/kernel"] is None
  assert numbers["layers_0/mlp/kernel"] == MuonDimensionNumbers((0,), (1,))
  # A leaf of another model: no rule knows it.
  with pytest.raises(ValueError, match=r"no rule knows these leaves:\n  'head' \(4, 2\)"):
    optax_gc.fan_sizes(rules)({**tree, "head": jnp.zeros((4, 2))})
  with pytest.raises(ValueError, match="clipping_threshold=0"):
    optax_gc.scale_by_factored_rms(rules, clipping_threshold=0)


# --------------------------------------------------------- MaxText-style ---

EMBED, HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = 8, 2, 4, 6, 5, 3


def _boxed(*names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class DecoderLayer(nn.Module):
  """MaxText's decoder layer, small: its names, its kernels' layouts, logical axis names."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(name="pre_self_attention_layer_norm")(x)
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
      (HEADS, HEAD_DIM), use_bias=False, kernel_init=_boxed("embed", "heads", "kv"), name=name
    )
    attention = nn.dot_product_attention(proj("query")(h), proj("key")(h), proj("value")(h))
    out = nn.DenseGeneral(
      EMBED, axis=(-2, -1), use_bias=False, kernel_init=_boxed("heads", "kv", "embed"), name="out"
    )
    x = x + out(attention)
    h = nn.RMSNorm(name="post_self_attention_layer_norm")(x)
    dense = lambda n, names, name: nn.Dense(  # noqa: E731
      n, use_bias=False, kernel_init=_boxed(*names), name=name
    )
    gated = nn.silu(dense(MLP, ("embed", "mlp"), "wi_0")(h)) * dense(MLP, ("embed", "mlp"), "wi_1")(
      h
    )
    return x + dense(EMBED, ("mlp", "embed"), "wo")(gated), None


class Decoder(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, EMBED, name="token_embedder")(ids)
    layers = nn.scan(
      DecoderLayer,
      variable_axes={"params": 1},
      split_rngs={"params": True},
      length=LAYERS,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = layers(name="layers")(x, None)
    x = nn.RMSNorm(name="decoder_norm")(x)
    return nn.Dense(VOCAB, use_bias=False, name="logits_dense")(x)


IDS = jax.ShapeDtypeStruct((2, 3), jnp.int32)


@functools.cache
def _decoder_rules():
  return optax_gc.rules_for(Decoder(), IDS)


def maxtext_numbers(path: str, ndim: int) -> MuonDimensionNumbers | None:
  """What MaxText's muon_utils writes by hand for a scanned decoder, by path, axes normalized."""
  if any(name in path for name in ("scale", "embedding", "logits_dense")):
    return None
  if "/out/" in path:
    reduction, output = (0, -2), (-1,)
  elif any(f"/{name}/" in path for name in ("query", "key", "value")):
    reduction, output = (0,), (-2, -1)
  else:
    reduction, output = (0,), (-1,)
  return MuonDimensionNumbers(
    tuple(a % ndim for a in reduction), tuple(sorted(a % ndim for a in output))
  )


def test_maxtext_style_decoder_scanned_at_axis_1_gets_what_maxtext_writes_by_hand():
  variables = jax.eval_shape(Decoder().init, KEY, IDS)
  numbers = optax_gc.muon_dimension_numbers(_decoder_rules(), adam=[r"logits_dense"])
  got = _exports(numbers(variables))
  shapes = {p: np.shape(x) for p, x in flat(variables).items()}
  assert shapes["params/layers/query/kernel"] == (EMBED, LAYERS, HEADS, HEAD_DIM)
  assert got["params/layers/query/kernel"] == MuonDimensionNumbers((0,), (2, 3))
  assert got["params/layers/out/kernel"] == MuonDimensionNumbers((0, 2), (3,))
  assert got["params/layers/wo/kernel"] == MuonDimensionNumbers((0,), (2,))
  assert got == {p: maxtext_numbers(p, len(s)) for p, s in shapes.items()}


# ------------------------------------------------- in the frameworks ---


def _muon(rules, **kwargs):
  numbers = optax_gc.muon_dimension_numbers(rules, **kwargs)
  return optax.contrib.muon(LR, muon_weight_dimension_numbers=numbers)


def _random(tree, seed=0):
  """Random float32 arrays in place of every leaf (boxes and Variables kept)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), tree)


class NnxTiny(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.proj(x).reshape(x.shape))


def test_muon_steps_under_nnx_optimizer_on_a_linen_dict_and_on_an_equinox_tree():
  # nnx: nnx.Optimizer hands init Variables and update plain arrays.
  abstract = nnx.eval_shape(lambda: NnxTiny(nnx.Rngs(0)))
  rules = optax_gc.rules_for(abstract, jax.ShapeDtypeStruct((2, 4), jnp.float32))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, _random(params)), rest)
  optimizer = nnx.Optimizer(model, _muon(rules, adam=[r"head/kernel"]), wrt=nnx.Param)
  before = flat(nnx.state(model, nnx.Param), numpy=True)
  nnx.jit(lambda opt, m, g: opt.update(m, g))(optimizer, model, _random(params, 1))
  after = flat(nnx.state(model, nnx.Param), numpy=True)
  assert all(np.all(after[p] != x) for p, x in before.items())
  mu = flat(optimizer.opt_state.inner_states["muon"].inner_state[0].mu)
  assert set(mu) == {"proj/kernel"}  # the head and the biases went to Adam
  # The other exports take the same Variables.
  galore = optax.contrib.galore(
    LR, rank=2, weight_dimension_numbers=optax_gc.galore_dimension_numbers(rules)
  )
  projector = optax.tree.get(jax.eval_shape(galore.init, nnx.state(model, nnx.Param)), "projector")
  assert projector["proj"]["kernel"].shape == (4, 2)
  moment = jax.eval_shape(optax_gc.scale_by_factored_rms(rules).init, nnx.state(model, nnx.Param))
  assert isinstance(moment.v["proj"]["kernel"], nnx.Param)

  # linen: the whole variables dict, kernels in LogicallyPartitioned boxes.
  variables = _random(jax.eval_shape(Decoder().init, KEY, IDS))
  assert isinstance(variables["params"]["layers"]["query"]["kernel"], nn.LogicallyPartitioned)
  tx = _muon(_decoder_rules(), adam=[r"logits_dense"])
  (updates,) = _steps(tx, variables, [_random(variables, 1)])
  assert set(updates) == set(flat(variables))
  assert all(np.all(np.isfinite(u)) and np.any(u != 0) for u in updates.values())
  factored = optax_gc.scale_by_factored_rms(_decoder_rules(), min_dim_size_to_factor=1)
  moment = jax.eval_shape(factored.init, variables)
  assert moment.v_in["params"]["layers"]["out"]["kernel"].value.shape == (
    HEADS,
    LAYERS,
    HEAD_DIM,
    1,
  )

  # Equinox: the filtered tree holds None where the module holds no array; its steps ran above.
  (updates,) = _unrolled_updates(UNROLLED["equinox"], "muon")
  assert set(updates) == set(flat(eqx.filter(UNROLLED["equinox"].built[0], eqx.is_inexact_array)))
  assert all(np.all(np.isfinite(u)) and np.any(u != 0) for u in updates.values())
